//! The on-disk record format. Every stored value is wrapped in an envelope:
//!
//! ```text
//! magic "KAMI" (4) | format version (1) | kind (1) | payload length u32 LE (4) | CRC32 of payload (4) | payload
//! ```
//!
//! The payload is bincode 1.3 (varint, little endian) with a size limit on decode.
//! bincode is not self-describing, so any change to a stored type must bump
//! [`FORMAT_VERSION`] and keep a decoder for the old version; `tests/golden.rs`
//! checks that records written by every released version still decode.

use bincode::Options;
use serde::{de::DeserializeOwned, Serialize};

use super::legacy::{ArchivedOrderV8, ShardV10, ShardV2, ShardV3, ShardV4, ShardV5, ShardV6, ShardV8, TermsV7};
use crate::domain::shard::ArchivedOrder;
use crate::domain::terms::Terms;
use crate::domain::Shard;

pub const MAGIC: [u8; 4] = *b"KAMI";
/// Version 2: a snapshot keys its payments by `channel/payment_id` (payment ids are
/// unique per channel only) and `Event::RefundCompleted` names its channel. The
/// types' layout is unchanged, so version 1 records decode as they are; a v1
/// snapshot's payments are re-keyed when its indexes are rebuilt.
///
/// Version 3: keys move between the shards of a product. Three events are added at
/// the end of `Event` (older events decode unchanged) and a snapshot ends with the
/// shard's transfers; v1/v2 snapshots decode as [`ShardV2`] (no transfers).
///
/// Version 4: group-buy. Group events, a payment outcome and refund reasons are
/// added at the end of their enums (older records decode unchanged) and a snapshot
/// ends with the shard's groups; v3 snapshots decode as [`ShardV3`] (no groups).
///
/// Version 5: orders leave memory for the archive. A snapshot keeps its orders by
/// sequence (a map, since archived ones are gone) and ends with the count of orders
/// created and what the shard keeps of archived ones; one event
/// (`OrdersArchived`) and one refund reason (`OrderArchived`) are added at the end
/// of their enums; archive records are a new kind. v4 snapshots decode as
/// [`ShardV4`].
///
/// Version 6: the merchant withdraws keys. One event (`KeysWithdrawn`) is added at
/// the end of `Event` and a snapshot ends with the shard's withdrawn keys; v5
/// snapshots decode as [`ShardV5`] (nothing withdrawn).
///
/// Version 7: buyer order lookup. One event (`OrderCreatedWithPassword`) is added
/// at the end of `Event` and a snapshot ends with the query passwords of its
/// orders in memory; v6 snapshots decode as [`ShardV6`] (no passwords). Archived
/// orders' passwords live in a new tree (`lookup/{product}/{shard}`, see
/// `Storage::archive_orders`); archived order records are unchanged.
///
/// Version 8: quantity tiers. A product's terms (`Kind::Terms`) end with its tiers;
/// v5–v7 terms decode as [`TermsV7`] (no tiers). Nothing else changed.
///
/// Version 9: orders keep how they were priced. One event (`OrderCreatedPriced`)
/// is added at the end of `Event`, a snapshot ends with the pricing records of its
/// orders in memory, and an archived order ends with its own; v7/v8 snapshots
/// decode as [`ShardV8`], v5–v8 archived orders as [`ArchivedOrderV8`].
///
/// Version 10: coupons. An order's pricing record names its coupon and hold
/// (`coupon: Option<CouponRef>`; v9 never wrote one, so v9 records decode as they
/// are), one refund reason (`CouponReturned`) is added at the end of its enum, and
/// coupon shards' snapshots are a new kind (`CouponSnapshot`, their journals
/// `journal/coupons/{shard}`).
///
/// Version 11: a snapshot ends with the shard's archived delivered orders that used
/// a coupon, counted by code (the audit checks coupons' uses against them); v9/v10
/// snapshots decode as [`ShardV10`], and storage recounts a v10 snapshot's from
/// the shard's archive ([`SNAPSHOT_WITHOUT_COUPON_COUNTS`]).
pub const FORMAT_VERSION: u8 = 11;
/// The version whose snapshots may have archived coupon orders but do not count
/// them.
pub const SNAPSHOT_WITHOUT_COUPON_COUNTS: u8 = 10;
/// The oldest version still read.
pub const OLDEST_READABLE_VERSION: u8 = 1;
/// Size of the envelope's header.
pub const HEADER_BYTES: usize = 14;

/// What a record holds; checked on decode so a record is never read as another type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    Event = 1,
    Snapshot = 2,
    Product = 3,
    /// (v4) A group-buy deal.
    Deal = 4,
    /// (v4) A points shard's book (`domain::points::PointsBook`).
    PointsSnapshot = 5,
    /// (v5) An archived order (`domain::shard::ArchivedOrder`).
    ArchivedOrder = 6,
    /// (v5, added without changing any earlier kind) A product's terms of sale
    /// (`domain::terms::Terms`).
    Terms = 7,
    /// (v10) A coupon shard's book (`domain::coupon::CouponBook`).
    CouponSnapshot = 8,
    /// (added in v11 without changing any earlier kind) A merchant webhook
    /// endpoint added at run time, or one of its dead letters (`storage::webhooks`).
    Webhook = 9,
}

impl Kind {
    /// Decode limit per kind: a journal event carries at most 4096 keys of 256 bytes.
    fn max_payload_bytes(self) -> u64 {
        match self {
            Kind::Event => 16 << 20,
            Kind::Snapshot | Kind::PointsSnapshot | Kind::CouponSnapshot => 4 << 30,
            Kind::Product | Kind::Deal | Kind::Terms => 64 << 10,
            Kind::Webhook => 1 << 20,
            Kind::ArchivedOrder => 16 << 20,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CodecError {
    #[error("record shorter than its header ({0} bytes)")]
    Truncated(usize),
    #[error("bad magic")]
    BadMagic,
    #[error(
        "unsupported format version {0} (this kami reads versions {min} to {max}; a newer one was written by a newer kami)",
        min = OLDEST_READABLE_VERSION,
        max = FORMAT_VERSION
    )]
    UnsupportedVersion(u8),
    #[error("expected a {expected:?} record, found kind {found}")]
    WrongKind { expected: Kind, found: u8 },
    #[error("payload length {declared} does not match the {actual} bytes present")]
    LengthMismatch { declared: usize, actual: usize },
    #[error("checksum mismatch")]
    BadChecksum,
    #[error("payload does not decode: {0}")]
    Payload(String),
}

fn options(kind: Kind) -> impl Options {
    bincode::DefaultOptions::new().with_limit(kind.max_payload_bytes())
}

pub fn encode<T: Serialize>(kind: Kind, value: &T) -> Vec<u8> {
    let payload = options(kind).serialize(value).expect("in-memory state always serialises within limits");
    let len = u32::try_from(payload.len()).expect("record under 4 GiB");
    let mut out = Vec::with_capacity(HEADER_BYTES + payload.len());
    out.extend_from_slice(&MAGIC);
    out.push(FORMAT_VERSION);
    out.push(kind as u8);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    out
}

/// [`encode`], appended to `out` (no allocation once `out` has room).
pub fn encode_into<T: Serialize>(kind: Kind, value: &T, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&MAGIC);
    out.push(FORMAT_VERSION);
    out.push(kind as u8);
    out.extend_from_slice(&[0; 8]);
    options(kind).serialize_into(&mut *out, value).expect("in-memory state always serialises within limits");
    let payload = start + HEADER_BYTES;
    let len = u32::try_from(out.len() - payload).expect("record under 4 GiB");
    let crc = crc32fast::hash(&out[payload..]);
    out[start + 6..start + 10].copy_from_slice(&len.to_le_bytes());
    out[start + 10..start + 14].copy_from_slice(&crc.to_le_bytes());
}

/// Checks a record's envelope (magic, version, length, checksum) without decoding it.
pub fn check(bytes: &[u8]) -> Result<(), CodecError> {
    header(bytes).map(|_| ())
}

/// The kind byte and payload of a well-formed envelope.
fn header(bytes: &[u8]) -> Result<(u8, &[u8]), CodecError> {
    if bytes.len() < HEADER_BYTES {
        return Err(CodecError::Truncated(bytes.len()));
    }
    if bytes[0..4] != MAGIC {
        return Err(CodecError::BadMagic);
    }
    if !(OLDEST_READABLE_VERSION..=FORMAT_VERSION).contains(&bytes[4]) {
        return Err(CodecError::UnsupportedVersion(bytes[4]));
    }
    let declared = u32::from_le_bytes(bytes[6..10].try_into().expect("4 bytes")) as usize;
    let payload = &bytes[HEADER_BYTES..];
    if declared != payload.len() {
        return Err(CodecError::LengthMismatch { declared, actual: payload.len() });
    }
    let crc = u32::from_le_bytes(bytes[10..14].try_into().expect("4 bytes"));
    if crc32fast::hash(payload) != crc {
        return Err(CodecError::BadChecksum);
    }
    Ok((bytes[5], payload))
}

pub fn decode<T: DeserializeOwned>(kind: Kind, bytes: &[u8]) -> Result<T, CodecError> {
    let (found, payload) = header(bytes)?;
    if found != kind as u8 {
        return Err(CodecError::WrongKind { expected: kind, found });
    }
    // bincode's limit is not enforced when it reads from a slice: the payload's
    // length is the bound (decoded from a slice, nothing takes much more memory).
    if payload.len() as u64 > kind.max_payload_bytes() {
        return Err(CodecError::Payload(format!(
            "{} bytes, at most {} for a {kind:?} record",
            payload.len(),
            kind.max_payload_bytes()
        )));
    }
    options(kind).deserialize(payload).map_err(|e| CodecError::Payload(e.to_string()))
}

/// Decodes a snapshot of any readable version.
pub fn decode_snapshot(bytes: &[u8]) -> Result<Shard, CodecError> {
    match bytes.get(4) {
        Some(1 | 2) => decode::<ShardV2>(Kind::Snapshot, bytes).map(Shard::from),
        Some(3) => decode::<ShardV3>(Kind::Snapshot, bytes).map(Shard::from),
        Some(4) => decode::<ShardV4>(Kind::Snapshot, bytes).map(Shard::from),
        Some(5) => decode::<ShardV5>(Kind::Snapshot, bytes).map(Shard::from),
        Some(6) => decode::<ShardV6>(Kind::Snapshot, bytes).map(Shard::from),
        Some(7 | 8) => decode::<ShardV8>(Kind::Snapshot, bytes).map(Shard::from),
        Some(9 | 10) => decode::<ShardV10>(Kind::Snapshot, bytes).map(Shard::from),
        _ => decode::<Shard>(Kind::Snapshot, bytes),
    }
}

/// Decodes an archived order of any readable version.
pub fn decode_archived(bytes: &[u8]) -> Result<ArchivedOrder, CodecError> {
    match bytes.get(4) {
        Some(..=8) => decode::<ArchivedOrderV8>(Kind::ArchivedOrder, bytes).map(ArchivedOrder::from),
        _ => decode::<ArchivedOrder>(Kind::ArchivedOrder, bytes),
    }
}

/// Decodes a product's terms of any readable version.
pub fn decode_terms(bytes: &[u8]) -> Result<Terms, CodecError> {
    match bytes.get(4) {
        Some(..=7) => decode::<TermsV7>(Kind::Terms, bytes).map(Terms::from),
        _ => decode::<Terms>(Kind::Terms, bytes),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_payload_past_its_kind_limit_is_refused() {
        // A product record is at most 64 KiB (encoding refuses more): a well-formed
        // larger one (written as a webhook record, its kind byte then changed) is
        // refused before it is decoded; one within the limit decodes.
        let big = "p".repeat(100 << 10);
        let mut bytes = encode(Kind::Webhook, &big);
        bytes[5] = Kind::Product as u8;
        assert!(matches!(decode::<String>(Kind::Product, &bytes), Err(CodecError::Payload(_))));
        let fits = "p".repeat(60 << 10);
        assert_eq!(decode::<String>(Kind::Product, &encode(Kind::Product, &fits)).unwrap(), fits);
    }

    #[test]
    fn round_trip_and_corruption() {
        let value = (42u64, "key".to_string(), vec![1u32, 2, 3]);
        let bytes = encode(Kind::Event, &value);
        assert_eq!(decode::<(u64, String, Vec<u32>)>(Kind::Event, &bytes), Ok(value));
        assert!(matches!(decode::<(u64, String, Vec<u32>)>(Kind::Snapshot, &bytes), Err(CodecError::WrongKind { .. })));
        assert_eq!(
            decode::<(u64, String, Vec<u32>)>(Kind::Event, &bytes[..bytes.len() - 1]).unwrap_err(),
            CodecError::LengthMismatch { declared: bytes.len() - 14, actual: bytes.len() - 15 }
        );
        let mut flipped = bytes.clone();
        *flipped.last_mut().unwrap() ^= 1;
        assert_eq!(decode::<(u64, String, Vec<u32>)>(Kind::Event, &flipped), Err(CodecError::BadChecksum));
        let mut old = bytes.clone();
        old[4] = 0;
        assert_eq!(decode::<(u64, String, Vec<u32>)>(Kind::Event, &old), Err(CodecError::UnsupportedVersion(0)));
        assert_eq!(decode::<u8>(Kind::Event, b"KAM"), Err(CodecError::Truncated(3)));
        let mut into = b"prefix".to_vec();
        encode_into(Kind::Event, &(42u64, "key".to_string(), vec![1u32, 2, 3]), &mut into);
        assert_eq!(&into[6..], &bytes[..], "encode_into writes what encode returns");
        assert_eq!(check(&bytes), Ok(()));
        assert_eq!(check(&flipped), Err(CodecError::BadChecksum));
    }
}

//! Opaque page cursors: a listing's position (the last item's key) wrapped so
//! clients treat it as a token. A cursor names the listing it belongs to and
//! carries a checksum, so a cursor from another listing, cut short or edited is
//! refused (400 `invalid_cursor`) instead of silently starting somewhere else.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;

use super::error::ApiError;

/// Longest cursor accepted (a position is an id of at most a few hundred bytes).
const MAX_CURSOR_CHARS: usize = 1024;

/// The cursor for continuing listing `scope` after `position`.
pub fn encode(scope: &str, position: &str) -> String {
    let mut bytes = Vec::with_capacity(position.len() + 4);
    bytes.extend_from_slice(position.as_bytes());
    bytes.extend_from_slice(&checksum(scope, position.as_bytes()).to_le_bytes());
    URL_SAFE_NO_PAD.encode(bytes)
}

/// 400 `invalid_cursor`.
pub fn invalid() -> ApiError {
    ApiError::new(
        axum::http::StatusCode::BAD_REQUEST,
        "invalid_cursor",
        "cursor: not a cursor of this listing (pass the next_cursor of the previous page as it is)",
    )
}

/// The position a cursor of listing `scope` holds.
pub fn decode(scope: &str, cursor: &str) -> Result<String, ApiError> {
    if cursor.len() > MAX_CURSOR_CHARS {
        return Err(invalid());
    }
    let bytes = URL_SAFE_NO_PAD.decode(cursor).map_err(|_| invalid())?;
    if bytes.len() < 4 {
        return Err(invalid());
    }
    let (position, sum) = bytes.split_at(bytes.len() - 4);
    if checksum(scope, position).to_le_bytes() != sum {
        return Err(invalid());
    }
    String::from_utf8(position.to_vec()).map_err(|_| invalid())
}

fn checksum(scope: &str, position: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(scope.as_bytes());
    h.update(&[0]);
    h.update(position);
    h.finalize()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cursor_round_trips_and_anything_else_is_refused() {
        let c = encode("products", "flash-2");
        assert_eq!(decode("products", &c).unwrap(), "flash-2");
        assert_eq!(decode("products", &encode("products", "")).unwrap(), "");
        // Another listing's cursor, an edited one, a cut one, garbage, a huge one.
        assert_eq!(decode("orders", &c).unwrap_err().code, "invalid_cursor");
        let mut edited = c.clone().into_bytes();
        edited[0] = if edited[0] == b'A' { b'B' } else { b'A' };
        let edited = String::from_utf8(edited).unwrap();
        assert_eq!(decode("products", &edited).unwrap_err().code, "invalid_cursor");
        assert_eq!(decode("products", &c[..c.len() - 2]).unwrap_err().code, "invalid_cursor");
        assert_eq!(decode("products", "not a cursor!").unwrap_err().code, "invalid_cursor");
        assert_eq!(decode("products", &"A".repeat(5000)).unwrap_err().code, "invalid_cursor");
    }
}

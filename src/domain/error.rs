use serde::{Deserialize, Serialize};

use super::shard::OrderStatus;

/// A refusal decided by the domain. Nothing changed when one is returned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum DomainError {
    #[error("not enough keys left: {requested} requested, {available} available")]
    SoldOut { requested: u32, available: u64 },
    #[error("per-buyer limit of {limit} reached: buyer already holds {held}")]
    LimitExceeded { limit: u32, held: u32 },
    #[error("this Idempotency-Key was used with a different request body")]
    IdempotencyKeyReused,
    /// A points adjustment's `request_id` reused for the same buyer with another
    /// delta (same stable code as an Idempotency-Key reused).
    #[error("this request_id was already used for this buyer with a different delta")]
    RequestIdReused,
    #[error("order not found")]
    OrderNotFound,
    #[error("order is {status}, the operation needs it to be pending_payment")]
    InvalidState { status: OrderStatus },
    #[error("payment amount {got} does not match the order amount {expected}")]
    AmountMismatch { expected: u64, got: u64 },
    #[error("payment_id was already used for another order")]
    PaymentIdConflict,
    #[error("no payment with this id")]
    PaymentNotFound,
    #[error("this payment owes no refund")]
    NoRefundOwed,
    #[error("not enough points: {needed} needed, {available} available")]
    InsufficientPoints { needed: u64, available: u64 },
    #[error("the balance would exceed the largest number of points")]
    PointsOverflow,
    #[error("no such redemption")]
    RedemptionNotFound,
    #[error("the redemption was settled: its key is delivered")]
    RedemptionSettled,
    #[error("this product has no points price")]
    NotRedeemable,
    #[error("no such group")]
    GroupNotFound,
    #[error("the group has all its members")]
    GroupFull,
    #[error("the group is {state}: it takes no more members")]
    GroupClosed { state: String },
    #[error("the buyer already holds a seat in this group")]
    AlreadyInGroup,
    #[error("the buyer left this group twice and cannot take a seat in it again")]
    LeftTooOften,
    #[error("no such group deal")]
    DealNotFound,
    #[error("a group deal with this id exists with other terms")]
    DealExists,
    #[error("the product is off the shelf: it takes no new orders")]
    ProductRetired,
    #[error("the product is on sale: take it off the shelf first")]
    ProductOnSale,
    #[error("the product has orders still open ({} waiting for payment, {} paid seats of open groups, {} owed a refund)", open.pending_payment, open.paid, open.refund_pending)]
    OpenOrders { open: super::shelf::OpenOrders },
    #[error("the product was deleted")]
    ProductDeleted,
    #[error("the sale has not started: it opens at {}", super::terms::rfc3339(*starts_at_ms))]
    SaleNotStarted { starts_at_ms: u64, ends_at_ms: Option<u64> },
    #[error("the sale has ended: it closed at {}", super::terms::rfc3339(*ends_at_ms))]
    SaleEnded { starts_at_ms: Option<u64>, ends_at_ms: u64 },
    #[error("the order's amount would exceed the largest amount")]
    AmountTooLarge,
    #[error("no such coupon")]
    CouponUnknown,
    #[error("the coupon was disabled")]
    CouponDisabled,
    #[error("the coupon is not valid yet")]
    CouponNotStarted,
    #[error("the coupon has expired")]
    CouponExpired,
    #[error("the coupon does not apply to this order (its products or its minimum amount)")]
    CouponNotApplicable,
    #[error("the coupon has no uses left")]
    CouponExhausted,
    #[error("this buyer has used the coupon the {limit} times it allows")]
    CouponLimitPerBuyer { limit: u32 },
    #[error("the coupon's hold for this request expired; send the order again (with a new Idempotency-Key)")]
    CouponHoldExpired,
    #[error("a coupon with this code exists with other terms")]
    CouponExists,
    #[error("no more coupons fit in this coupon shard")]
    CouponsFull,
}

impl DomainError {
    /// The stable snake_case code clients match on.
    pub fn code(&self) -> &'static str {
        match self {
            DomainError::SoldOut { .. } => "sold_out",
            DomainError::LimitExceeded { .. } => "limit_exceeded",
            DomainError::IdempotencyKeyReused | DomainError::RequestIdReused => "idempotency_key_reused",
            DomainError::OrderNotFound => "order_not_found",
            DomainError::InvalidState { .. } => "invalid_state",
            DomainError::AmountMismatch { .. } => "amount_mismatch",
            DomainError::PaymentIdConflict => "payment_id_conflict",
            DomainError::PaymentNotFound => "payment_not_found",
            DomainError::NoRefundOwed => "no_refund_owed",
            DomainError::InsufficientPoints { .. } => "insufficient_points",
            DomainError::PointsOverflow => "points_overflow",
            DomainError::RedemptionNotFound => "redemption_not_found",
            DomainError::RedemptionSettled => "redemption_settled",
            DomainError::NotRedeemable => "not_redeemable",
            DomainError::GroupNotFound => "group_not_found",
            DomainError::GroupFull => "group_full",
            DomainError::GroupClosed { .. } => "group_closed",
            DomainError::AlreadyInGroup => "already_in_group",
            DomainError::LeftTooOften => "left_group_too_often",
            DomainError::DealNotFound => "deal_not_found",
            DomainError::DealExists => "deal_exists",
            DomainError::ProductRetired => "product_retired",
            DomainError::ProductOnSale => "product_on_sale",
            DomainError::OpenOrders { .. } => "product_has_open_orders",
            DomainError::ProductDeleted => "product_deleted",
            DomainError::SaleNotStarted { .. } => "sale_not_started",
            DomainError::SaleEnded { .. } => "sale_ended",
            DomainError::AmountTooLarge => "amount_too_large",
            DomainError::CouponUnknown => "coupon_unknown",
            DomainError::CouponDisabled => "coupon_disabled",
            DomainError::CouponNotStarted => "coupon_not_started",
            DomainError::CouponExpired | DomainError::CouponHoldExpired => "coupon_expired",
            DomainError::CouponNotApplicable => "coupon_not_applicable",
            DomainError::CouponExhausted => "coupon_exhausted",
            DomainError::CouponLimitPerBuyer { .. } => "coupon_limit_per_buyer",
            DomainError::CouponExists => "coupon_exists",
            DomainError::CouponsFull => "coupons_full",
        }
    }
}

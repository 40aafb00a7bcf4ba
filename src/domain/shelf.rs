//! Whether a product is sold: on sale, off the shelf (retired), or deleted.
//!
//! A merchant takes a product off the shelf to stop new orders (orders already
//! made go on: they are paid, delivered, expire or are refunded as before) and may
//! put it back. A product off the shelf with no open order may be deleted: it is
//! gone from the shop for buyers and for the status page, for good, and its id is
//! never given to another product. Its orders stay readable and its history stays
//! in the audit: a deletion removes a product from sale, not from the books.

use serde::{Deserialize, Serialize};

use super::DomainError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Shelf {
    #[default]
    OnSale,
    Retired,
    Deleted,
}

/// A product's orders that keep it from being deleted, over all its shards.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenOrders {
    /// Waiting for their payment (their keys are reserved).
    pub pending_payment: u64,
    /// Paid seats of groups still open.
    pub paid: u64,
    /// Paid after they expired or were cancelled: a refund is owed.
    pub refund_pending: u64,
}

impl OpenOrders {
    pub fn total(&self) -> u64 {
        self.pending_payment + self.paid + self.refund_pending
    }

    pub fn add(&mut self, other: &OpenOrders) {
        self.pending_payment += other.pending_payment;
        self.paid += other.paid;
        self.refund_pending += other.refund_pending;
    }
}

impl Shelf {
    /// Whether new orders (and group seats and redemptions) are taken.
    pub fn sells(self) -> bool {
        self == Shelf::OnSale
    }

    /// Off the shelf (again: a repeat is not an error).
    pub fn retire(self) -> Result<Shelf, DomainError> {
        match self {
            Shelf::OnSale | Shelf::Retired => Ok(Shelf::Retired),
            Shelf::Deleted => Err(DomainError::ProductDeleted),
        }
    }

    /// Back on sale (again: a repeat is not an error).
    pub fn relist(self) -> Result<Shelf, DomainError> {
        match self {
            Shelf::OnSale | Shelf::Retired => Ok(Shelf::OnSale),
            Shelf::Deleted => Err(DomainError::ProductDeleted),
        }
    }

    /// Deleted, if it is off the shelf and `open` holds no order (a repeat is not an error).
    pub fn delete(self, open: &OpenOrders) -> Result<Shelf, DomainError> {
        match self {
            Shelf::OnSale => Err(DomainError::ProductOnSale),
            Shelf::Retired if open.total() > 0 => Err(DomainError::OpenOrders { open: *open }),
            Shelf::Retired | Shelf::Deleted => Ok(Shelf::Deleted),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Shelf::OnSale => "on_sale",
            Shelf::Retired => "retired",
            Shelf::Deleted => "deleted",
        }
    }

    pub fn to_u8(self) -> u8 {
        match self {
            Shelf::OnSale => 0,
            Shelf::Retired => 1,
            Shelf::Deleted => 2,
        }
    }

    pub fn from_u8(v: u8) -> Option<Shelf> {
        match v {
            0 => Some(Shelf::OnSale),
            1 => Some(Shelf::Retired),
            2 => Some(Shelf::Deleted),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_product_off_the_shelf_with_no_open_order_is_deleted() {
        let none = OpenOrders::default();
        let one_pending = OpenOrders { pending_payment: 1, ..none };
        let one_refund = OpenOrders { refund_pending: 1, ..none };
        assert_eq!(Shelf::OnSale.delete(&none), Err(DomainError::ProductOnSale));
        assert_eq!(Shelf::Retired.delete(&one_pending), Err(DomainError::OpenOrders { open: one_pending }));
        assert_eq!(Shelf::Retired.delete(&one_refund), Err(DomainError::OpenOrders { open: one_refund }));
        assert_eq!(Shelf::Retired.delete(&none), Ok(Shelf::Deleted));
        assert_eq!(Shelf::Deleted.delete(&one_pending), Ok(Shelf::Deleted), "a repeat");
    }

    #[test]
    fn retiring_and_relisting_repeat_and_a_deleted_product_stays_deleted() {
        assert_eq!(Shelf::OnSale.retire(), Ok(Shelf::Retired));
        assert_eq!(Shelf::Retired.retire(), Ok(Shelf::Retired));
        assert_eq!(Shelf::Retired.relist(), Ok(Shelf::OnSale));
        assert_eq!(Shelf::OnSale.relist(), Ok(Shelf::OnSale));
        assert_eq!(Shelf::Deleted.retire(), Err(DomainError::ProductDeleted));
        assert_eq!(Shelf::Deleted.relist(), Err(DomainError::ProductDeleted));
        assert!(Shelf::OnSale.sells() && !Shelf::Retired.sells() && !Shelf::Deleted.sells());
        for s in [Shelf::OnSale, Shelf::Retired, Shelf::Deleted] {
            assert_eq!(Shelf::from_u8(s.to_u8()), Some(s));
        }
    }
}

//! kami — a trading core for virtual goods, built for the flash sale.
//!
//! Start with `ARCHITECTURE.md` for the map. In short: [`domain`] decides, [`actors`]
//! own state and journal it, [`storage`] makes it durable (group commit, snapshots,
//! recovery), [`core`] routes requests to their owners, [`http`] speaks the API.

pub mod actors;
pub mod app;
pub mod audit;
pub mod backup;
pub mod chaos;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod core;
pub mod domain;
pub mod error;
pub mod http;
pub mod load;
pub mod payments;
pub mod sandbox;
pub mod storage;
pub mod telemetry;
pub mod webhooks;

pub use app::{disable_transparent_huge_pages, start, RunningApp};
pub use config::{Settings, Sources};
pub use error::Error;

//! The pipeline between inputs and the database.
//!
//! - `worker`: pinned threads that batch queued messages and commit them.
//! - `linger`: whether a begun batch waits for more messages (pure).
//! - `turns`: whether a batch's commit starts beside another worker's (pure rule + the wait).
//! - `store`: the MySQL side (pool, table check, one transaction per batch, error classes).
//! - `hosts`: failover along the ordered host list (the next host, the round; pure).
//! - `schema`: does a table fit what feedd writes (pure).
//! - `classify`: which records to insert and which message gets which verdict (pure).

pub mod classify;
pub mod hosts;
pub mod linger;
pub mod queue;
pub mod schema;
pub mod store;
pub mod turns;
pub mod worker;

//! The pipeline between inputs and the database.
//!
//! - `worker`: pinned threads that batch queued messages and commit them.
//! - `store`: the MySQL side (schema check, one transaction per batch, retry policy).
//! - `hosts`: the ordered failover host list (parse, which errors move, the next host).
//! - `schema`: does a table fit what feedd writes (pure).
//! - `classify`: which records to insert and which message gets which verdict (pure).

pub mod classify;
pub mod hosts;
pub mod queue;
pub mod schema;
pub mod store;
pub mod worker;

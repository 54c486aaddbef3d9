//! Inputs: where records come from and where their verdicts go back to.
//!
//! - `record`: the wire body → records (pure; shared by every input).
//! - `receiver`: the ZeroMQ ROUTER thread (owns the socket; replies after COMMIT).
//! - `zap`: the CURVE authentication handler thread for the ROUTER.
//! - `amqp`: the AMQP consumer thread (owns its broker channel; acks after COMMIT).

pub mod amqp;
pub mod mailbox;
pub mod receiver;
pub mod record;
pub mod zap;

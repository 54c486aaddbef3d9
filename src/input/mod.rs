//! Inputs: where records come from and where their verdicts go back to.
//!
//! - `driver`: the one loop every input thread runs (mailbox, intake, drain, reload switch);
//! - `zmq`: the ZeroMQ ROUTER as a driver input (owns the socket; replies after COMMIT);
//! - `amqp`: the AMQP consumer as a driver input (owns its channel; acks after COMMIT);
//! - `record`: the wire body → records, and the reply text (pure; shared by every input);
//! - `mailbox`: the eventfd doorbell a driver waits on; `zap`: the CURVE handler thread.

pub mod amqp;
pub mod driver;
pub mod mailbox;
pub mod record;
pub mod zap;
pub mod zmq;

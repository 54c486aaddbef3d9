//! The process around the pipeline: detaching, the pidfile lock, privileges, signals and
//! the supervisor that restarts the serving process and upgrades it (`upgrade`), and the
//! channel over which it hands its serving child listeners (`control`).

pub mod control;
pub mod daemon;
pub mod notify;
pub mod pidfile;
pub mod privileges;
pub mod signals;
pub mod supervisor;
pub mod upgrade;

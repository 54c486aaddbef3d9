//! The integration tests: one binary, one module per capability, all against the real `feedd`
//! binary, real sockets and a real MariaDB (and RabbitMQ, Galera where the capability needs
//! them); `harness` holds what they share. Tests marked `#[ignore = "needs root"]` are run by
//! `make test` (`--include-ignored`), as root on CI.

mod harness;

mod amqp;
mod amqp_cluster;
mod clients;
mod cluster;
mod config;
mod database;
mod database_tls;
mod faults;
mod hostile;
mod ingest;
mod installing;
mod lifecycle;
mod observability;
mod protocol;
mod reload;
mod security;
mod supervisor;
mod table;
mod topology;
mod zero_downtime;

//! AMQP benchmark (filled in below).
fn main() {}

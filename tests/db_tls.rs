//! TLS to the database (SPEC §3 `[mysql] tls*`, §9): a private mariadbd that requires secure
//! transport, with a CA and certificates the test generates.

mod common;

use common::tls::{root_tls, tls_mariadb, Pki};
use mysql::prelude::Queryable;

#[test]
fn tls_harness_server_requires_tls() {
    let pki = Pki::generate();
    let db = tls_mariadb(&pki);
    let mut c = root_tls(&db, &pki);
    let cipher: Option<(String, String)> = c
        .query_first("SHOW SESSION STATUS LIKE 'Ssl_cipher'")
        .unwrap();
    eprintln!("{cipher:?}");
    assert!(!cipher.unwrap().1.is_empty());
}

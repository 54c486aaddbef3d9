//! TLS to the database (SPEC §3 `[mysql] tls*`, §9): a private mariadbd that requires secure
//! transport, with a CA and certificates the test generates (`openssl` CLI).

use crate::harness::database::PrivateMariadb;
use crate::harness::tls::{tls_mariadb, Pki};
use crate::harness::*;

fn path(p: std::path::PathBuf) -> String {
    p.display().to_string()
}

/// A database on the TLS server and a feedd config for it with `overrides`.
fn setup(test: &str, overrides: &[String]) -> (Pki, PrivateMariadb, Db, Feedd) {
    let pki = Pki::generate();
    let server = tls_mariadb(&pki);
    let ssl = mysql::SslOpts::default().with_root_cert_path(Some(pki.ca()));
    let db = Db::create_with(test, server.port, Some(ssl));
    let all: Vec<&str> = overrides.iter().map(String::as_str).collect();
    let f = Feedd::prepare(&db, &all);
    (pki, server, db, f)
}

fn password_account() -> Vec<String> {
    vec![
        "mysql.user = feed".into(),
        "mysql.password = s3cret-pw".into(),
    ]
}

#[test]
fn verify_identity_connects_and_secrets_stay_out_of_the_log() {
    let (pki, _server, db, f) = setup("tls_verify", &[]);
    let mut o = password_account();
    o.push("mysql.tls = verify_identity".into());
    o.push(format!("mysql.tls_ca_file = {}", path(pki.ca())));
    let all: Vec<&str> = o.iter().map(String::as_str).collect();
    let f = f.prepare_in(&db, &all);
    let (status, out, err) = f.command(&["check", "--conf", "feed.ini"]);
    assert!(status.success(), "check: {out}{err}");
    let f = f.spawn_foreground();
    assert_eq!(Req::connect(&f.endpoint()).ask("7,1,2.5"), "TRUE");
    assert_eq!(db.count(), 1);
    let log = f.stderr_log();
    assert!(!log.contains("s3cret-pw"), "password in the log:\n{log}");
}

#[test]
fn tls_off_is_refused_with_a_clear_start_up_error() {
    let (_pki, _server, _db, f) = setup("tls_off", &password_account());
    let (status, out, err) = f.command(&["--conf", "feed.ini"]);
    assert!(!status.success(), "started without TLS: {out}{err}");
    // MariaDB answers a plaintext login under require_secure_transport with 1045 only.
    assert!(
        err.contains("Access denied") && err.contains("require_secure_transport"),
        "the refusal and what to check are shown: {err}"
    );
    assert!(!err.contains("s3cret-pw"), "{err}");
}

#[test]
fn wrong_ca_names_the_certificate_problem() {
    let (pki, _server, db, f) = setup("tls_wrong_ca", &[]);
    let mut o = password_account();
    o.push("mysql.tls = verify_identity".into());
    o.push(format!("mysql.tls_ca_file = {}", path(pki.other_ca())));
    let all: Vec<&str> = o.iter().map(String::as_str).collect();
    let f = f.prepare_in(&db, &all);
    let (status, out, err) = f.command(&["--conf", "feed.ini"]);
    assert!(
        !status.success(),
        "started with a CA that did not sign: {out}{err}"
    );
    assert!(
        err.contains("invalid peer certificate") && err.contains("UnknownIssuer"),
        "{err}"
    );
}

#[test]
fn require_x509_account_works_with_a_client_certificate() {
    let (pki, _server, db, f) = setup("tls_x509", &[]);
    let base = vec![
        "mysql.user = x509".to_string(),
        "mysql.tls = verify_ca".to_string(),
        format!("mysql.tls_ca_file = {}", path(pki.ca())),
    ];
    // Without the certificate the account is refused.
    let all: Vec<&str> = base.iter().map(String::as_str).collect();
    let f = f.prepare_in(&db, &all);
    let (status, _, err) = f.command(&["--conf", "feed.ini"]);
    assert!(!status.success());
    assert!(err.contains("Access denied"), "{err}");
    let mut o = base.clone();
    o.push(format!("mysql.tls_cert_file = {}", path(pki.client_cert())));
    o.push(format!("mysql.tls_key_file = {}", path(pki.client_key())));
    let all: Vec<&str> = o.iter().map(String::as_str).collect();
    let f = f.prepare_in(&db, &all).spawn_foreground();
    assert_eq!(Req::connect(&f.endpoint()).ask("8,1,2.5"), "TRUE");
    assert_eq!(db.count(), 1);
    let key = std::fs::read_to_string(pki.client_key()).unwrap();
    let body = key.lines().nth(1).unwrap();
    assert!(!f.stderr_log().contains(body), "key material in the log");
}

#[test]
fn check_refuses_unreadable_or_wrong_tls_files() {
    let pki = Pki::generate();
    let db = Db::create("tls_check");
    let f = Feedd::prepare(
        &db,
        &[
            "mysql.tls = verify_identity",
            &format!("mysql.tls_ca_file = {}", path(pki.client_key())),
        ],
    );
    let (status, out, err) = f.command(&["check", "--conf", "feed.ini"]);
    assert!(!status.success());
    let text = format!("{out}{err}");
    assert!(
        text.contains("[mysql] tls_ca_file") && text.contains("no PEM certificate"),
        "{text}"
    );
    let key = std::fs::read_to_string(pki.client_key()).unwrap();
    assert!(!text.contains(key.lines().nth(1).unwrap()), "{text}");
    let f = f.prepare_in(
        &db,
        &[
            "mysql.tls = required",
            &format!("mysql.tls_cert_file = {}", path(pki.client_cert())),
            &format!("mysql.tls_key_file = {}", path(pki.ca())),
        ],
    );
    let (status, out, err) = f.command(&["check", "--conf", "feed.ini"]);
    assert!(!status.success());
    assert!(
        format!("{out}{err}").contains("[mysql] tls_key_file")
            && err.contains("no PEM private key"),
        "{out}{err}"
    );
}

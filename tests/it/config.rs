//! Checking the config (SPEC §3, `feedd check`): every mistake named by file, key and reason,
//! secrets never echoed.

use crate::harness::*;

#[test]
fn check_names_file_key_and_reason() {
    let db = Db::create("check");
    let feedd = Feedd::prepare(&db, &[]);
    let (status, stdout, _) = feedd.command(&["check", "--conf", "feed.ini"]);
    assert_eq!((status.code(), stdout.trim()), (Some(0), "ok"));
    std::fs::write(feedd.conf_path(), "[mysql]\ntable = fee;drop\n").unwrap();
    let (status, _, stderr) = feedd.command(&["check", "--conf", "feed.ini"]);
    assert_eq!(status.code(), Some(1));
    assert!(stderr.contains("feed.ini: [mysql] table"), "{stderr}");
    std::fs::write(feedd.conf_path(), "[pipeline]\nbogus = 1\n").unwrap();
    let (_, _, stderr) = feedd.command(&["check", "--conf", "feed.ini"]);
    assert!(stderr.contains("[pipeline] bogus: unknown key"), "{stderr}");
}

#[test]
fn config_mistakes_are_named_and_secrets_never_echoed() {
    let db = Db::create("hostile_config");
    let f = Feedd::prepare(&db, &[]);
    let check = |text: &str| {
        std::fs::write(f.dir.path().join("c.ini"), text).unwrap();
        let (status, out, err) = f.command(&["check", "--conf", "c.ini"]);
        (status.success(), format!("{out}{err}"))
    };
    let (_, secret) = curve_pair();
    let (ok, text) = check(&format!("[zmq]\ncurve_secret_key {secret}\n"));
    assert!(!ok);
    assert!(!text.contains(&secret), "{text}");
    assert!(text.contains("[zmq] curve_secret_key"), "{text}");
    let (ok, text) = check("[mysql]\ntable = a\n\ntable = b\n");
    assert!(!ok);
    assert!(
        text.contains("[mysql] table: set twice, on lines 2 and 4"),
        "{text}"
    );
    let (ok, text) = check("[mysql]\n[zmq]\n[mysql]\n");
    assert!(!ok);
    assert!(
        text.contains("section [mysql] appears twice, on lines 1 and 3"),
        "{text}"
    );
    let (ok, text) = check("\u{feff}[mysql]\ntable = a\n");
    assert!(ok, "{text}");
    let (ok, text) = check(&format!(
        "[zmq]\ncurve_secret_key = \"{}\"\n",
        "#".repeat(40)
    ));
    assert!(!ok);
    assert!(text.contains("not valid Z85"), "{text}");

    let (status, _, err) = f.command(&["check", "--conf", "."]);
    assert!(!status.success());
    assert_eq!(err.matches("os error 21").count(), 1, "{err}");

    let f = f.prepare_in(&db, &["zmq.endpoint = tcp://no-such-host.invalid:5999"]);
    let (status, _, err) = f.command(&["--conf", "feed.ini"]);
    assert!(!status.success());
    assert!(
        err.contains("is not a local address, an interface"),
        "{err}"
    );
    assert!(!err.contains("No such device"), "{err}");
}

#[test]
fn check_fails_naming_both_keys_when_both_inputs_are_off() {
    let db = Db::create("amqp_noinput");
    let feedd = Feedd::prepare(&db, &["zmq.endpoint =", "amqp.url ="]);
    let (status, out, err) = feedd.command(&["check", "--conf", "feed.ini"]);
    assert_eq!(status.code(), Some(1), "{out}{err}");
    assert!(
        err.contains("[zmq] endpoint and [amqp] url are both empty"),
        "{err}"
    );
    let feedd = feedd.prepare_in(&db, &["zmq.endpoint =", "amqp.url = amqp://127.0.0.1"]);
    let (status, out, err) = feedd.command(&["check", "--conf", "feed.ini"]);
    assert_eq!(status.code(), Some(0), "{out}{err}");
}

//! Installing (SPEC §6 unit, §10 package): `systemd-analyze verify` on conf/feedd.service, and the
//! Debian package built with cargo-deb, installed with dpkg on this machine, checked (files,
//! owners, modes, the feedd user, `feedd check` as that user), served from (the installed binary
//! as user feedd, in the foreground, against the test database), then removed and purged.
//!
//! The package test changes the machine (a package, a system user), so it runs only as root
//! and when asked: under CI (`CI` set) or with FEEDD_TEST_PACKAGE=1 (`make test` sets it).
//! Otherwise it says why and passes. It refuses to run over an installed feedd package.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

fn skip(why: &str) {
    eprintln!("SKIPPED: {why}");
}

fn run(program: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn have(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

#[test]
fn the_unit_file_verifies() {
    if !have("systemd-analyze") {
        assert!(
            std::env::var_os("CI").is_none(),
            "systemd-analyze missing (.ci/setup installs systemd)"
        );
        return skip("systemd-analyze not installed (apt install systemd)");
    }
    // `verify` checks that ExecStart= is executable: point it at the binary just built.
    let unit =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("conf/feedd.service"))
            .unwrap();
    assert!(unit.contains("ExecStart=/usr/bin/feedd --conf /etc/feedd/feed.ini"));
    for line in [
        "Type=notify",
        "User=feedd",
        "RuntimeDirectory=feedd",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "Restart=on-failure",
        "WatchdogSec=",
    ] {
        assert!(unit.contains(line), "{line} missing from the unit");
    }
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("feedd.service");
    std::fs::write(&copy, unit.replace("/usr/bin/feedd", feedd_bin())).unwrap();
    let (ok, text) = run("systemd-analyze", &["verify", &path_str(&copy)]);
    eprintln!(
        "systemd-analyze verify: {}",
        if text.is_empty() { "clean" } else { &text }
    );
    assert!(ok && text.is_empty(), "systemd-analyze verify: {text}");
}

fn installed() -> bool {
    run("dpkg-query", &["-W", "-f=${Status}", "feedd"])
        .1
        .contains("install ok installed")
}

/// Purges the package on the way out, also when an assertion failed half-way.
struct Installed;

impl Drop for Installed {
    fn drop(&mut self) {
        let _ = run("dpkg", &["-P", "feedd"]);
    }
}

/// (mode & 0o7777, owner name, group name) of `path`.
fn stat(path: &str) -> (u32, String, String) {
    let m = std::fs::metadata(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let user = nix::unistd::User::from_uid(m.uid().into())
        .unwrap()
        .map_or(m.uid().to_string(), |u| u.name);
    let group = nix::unistd::Group::from_gid(m.gid().into())
        .unwrap()
        .map_or(m.gid().to_string(), |g| g.name);
    (m.permissions().mode() & 0o7777, user, group)
}

/// Processes running the installed binary.
fn installed_processes() -> Vec<i32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read_link(format!("/proc/{pid}/exe"))
                .is_ok_and(|p| p == Path::new("/usr/bin/feedd"))
        })
        .collect()
}

/// `cargo deb`: builds the release binaries and the package; returns the .deb's path.
fn build_package() -> PathBuf {
    let started = std::time::Instant::now();
    let out = Command::new("cargo")
        .args(["deb", "--locked"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdin(Stdio::null())
        .output()
        .expect("cargo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "cargo deb failed:\n{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let deb = PathBuf::from(stdout.lines().last().unwrap_or_default().trim());
    assert!(deb.extension().is_some_and(|e| e == "deb"), "{stdout}");
    eprintln!(
        "cargo deb: {} in {} s",
        deb.display(),
        started.elapsed().as_secs()
    );
    deb
}

#[test]
fn the_debian_package_installs_serves_and_purges() {
    if !nix::unistd::geteuid().is_root() {
        return skip("the package test needs root (dpkg -i)");
    }
    if std::env::var_os("CI").is_none() && std::env::var_os("FEEDD_TEST_PACKAGE").is_none() {
        return skip(
            "the package test installs a package: set FEEDD_TEST_PACKAGE=1 (make test does)",
        );
    }
    if !have("dpkg") {
        return skip("no dpkg on this machine");
    }
    let has_cargo_deb = Command::new("cargo")
        .args(["deb", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !has_cargo_deb {
        assert!(
            std::env::var_os("CI").is_none(),
            "cargo-deb missing (.ci/setup installs it)"
        );
        return skip("cargo-deb not installed (cargo install cargo-deb --locked)");
    }
    assert!(
        !installed(),
        "a feedd package is already installed on this machine; this test would replace and \
         purge it. Remove it first (dpkg -P feedd)."
    );

    let deb = build_package();
    let guard = Installed;
    let (ok, text) = run("dpkg", &["-i", &path_str(&deb)]);
    assert!(ok, "dpkg -i: {text}");
    assert!(installed());
    // No systemd running here: the install succeeded and started nothing.
    assert!(
        installed_processes().is_empty(),
        "the package started feedd"
    );

    // Files, owners and modes.
    for (path, mode, owner, group) in [
        ("/usr/bin/feedd", 0o755, "root", "root"),
        ("/usr/bin/feedd-load", 0o755, "root", "root"),
        ("/etc/feedd/feed.ini", 0o640, "root", "feedd"),
        ("/lib/systemd/system/feedd.service", 0o644, "root", "root"),
        ("/etc/logrotate.d/feedd", 0o644, "root", "root"),
        ("/usr/lib/sysusers.d/feedd.conf", 0o644, "root", "root"),
        ("/var/log/feedd", 0o750, "feedd", "feedd"),
    ] {
        assert_eq!(
            stat(path),
            (mode, owner.to_string(), group.to_string()),
            "{path}"
        );
    }
    let user = nix::unistd::User::from_name("feedd")
        .unwrap()
        .expect("a feedd user");
    assert!(user.uid.as_raw() < 1000, "a system user: {}", user.uid);
    assert_eq!(user.shell, PathBuf::from("/usr/sbin/nologin"));
    assert!(nix::unistd::Group::from_name("feedd").unwrap().is_some());
    let (_, conffiles) = run("dpkg-query", &["-W", "-f=${Conffiles}", "feedd"]);
    for f in ["/etc/feedd/feed.ini", "/etc/logrotate.d/feedd"] {
        assert!(conffiles.contains(f), "{f} is not a conffile: {conffiles}");
    }
    let config = std::fs::read_to_string("/etc/feedd/feed.ini").unwrap();
    assert!(config.contains("pidfile = /run/feedd/feedd.pid"));
    assert!(config.contains("log_file = /var/log/feedd/feedd.log"));
    if have("systemd-analyze") {
        let (ok, text) = run(
            "systemd-analyze",
            &["verify", "/lib/systemd/system/feedd.service"],
        );
        assert!(ok && text.is_empty(), "installed unit: {text}");
    }

    // The packaged config is valid, read as the user the unit runs.
    let (ok, text) = run(
        "runuser",
        &[
            "-u",
            "feedd",
            "--",
            "/usr/bin/feedd",
            "check",
            "--conf",
            "/etc/feedd/feed.ini",
        ],
    );
    assert!(ok && text.trim() == "ok", "feedd check as feedd: {text}");

    // The installed binary, as feedd, in the foreground (as the unit runs it), against the
    // test database: one record in, TRUE out, one row.
    let db = Db::create("p_package");
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let port = free_port();
    let conf = dir.path().join("feed.ini");
    // A foreground run holds its pidfile too: put it where the feedd user may write.
    let pidfile = "daemon.pidfile = /run/feedd/feedd.pid";
    std::fs::write(
        &conf,
        config_text(&db, port, &["daemon.log_level = info", pidfile]),
    )
    .unwrap();
    std::fs::set_permissions(&conf, std::fs::Permissions::from_mode(0o644)).unwrap();
    let log = dir.path().join("stderr.log");
    // setpriv execs (no fork), so the child's pid is feedd's.
    let mut child = Command::new("setpriv")
        .args([
            "--reuid=feedd",
            "--regid=feedd",
            "--init-groups",
            "--",
            "/usr/bin/feedd",
            "--conf",
        ])
        .arg(&conf)
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
    let serving = wait_until(Duration::from_secs(30), || {
        read_log().contains("serving with")
    });
    if !serving {
        let _ = child.kill();
        panic!("the installed feedd did not serve:\n{}", read_log());
    }
    let pid = child.id() as i32;
    assert_eq!(proc_ids(pid, "Uid:")[0], user.uid.as_raw(), "runs as feedd");
    let req = Req::connect(&format!("tcp://127.0.0.1:{port}"));
    req.0.set_rcvtimeo(10_000).unwrap();
    assert_eq!(req.ask("424242,7,12.5"), "TRUE");
    assert_eq!(
        db.rows().get(&424242),
        Some(&(7, "12.5000".to_string(), "Y".to_string()))
    );
    kill(pid, libc::SIGTERM);
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "{}", read_log());

    // remove: the binaries and the unit go; the config and the log stay.
    std::fs::write("/var/log/feedd/feedd.log", "a line\n").unwrap();
    let (ok, text) = run("dpkg", &["-r", "feedd"]);
    assert!(ok, "dpkg -r: {text}");
    for gone in [
        "/usr/bin/feedd",
        "/usr/bin/feedd-load",
        "/lib/systemd/system/feedd.service",
    ] {
        assert!(!Path::new(gone).exists(), "{gone} left after remove");
    }
    for kept in ["/etc/feedd/feed.ini", "/var/log/feedd/feedd.log"] {
        assert!(Path::new(kept).exists(), "{kept} removed by remove");
    }

    // purge: the config and the log go too; the database is untouched.
    let (ok, text) = run("dpkg", &["-P", "feedd"]);
    assert!(ok, "dpkg -P: {text}");
    for gone in ["/etc/feedd", "/var/log/feedd", "/etc/logrotate.d/feedd"] {
        assert!(!Path::new(gone).exists(), "{gone} left after purge");
    }
    assert!(!installed());
    assert_eq!(db.count(), 1, "the database is never touched");
    drop(guard);
}

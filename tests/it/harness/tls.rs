//! TLS to the database in tests: a throwaway PKI made with the `openssl` CLI (a CA, a server
//! certificate for 127.0.0.1/localhost, a client certificate, and an unrelated CA), and a
//! private mariadbd that requires secure transport. No threads.

use std::path::{Path, PathBuf};
use std::process::Command;

use mysql::prelude::Queryable;

use super::database::PrivateMariadb;

/// Certificates and keys in a temp dir (PEM files).
pub struct Pki {
    pub dir: tempfile::TempDir,
}

impl Pki {
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    pub fn ca(&self) -> PathBuf {
        self.path("ca.pem")
    }
    pub fn other_ca(&self) -> PathBuf {
        self.path("other-ca.pem")
    }
    pub fn client_cert(&self) -> PathBuf {
        self.path("client.pem")
    }
    pub fn client_key(&self) -> PathBuf {
        self.path("client.key")
    }

    /// Generates everything (P-256 keys: quick); about 0.1 s.
    pub fn generate() -> Pki {
        let pki = Pki {
            dir: tempfile::tempdir().unwrap(),
        };
        for ca in ["ca", "other-ca"] {
            pki.openssl(&[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-days",
                "2",
                "-subj",
                &format!("/CN=feedd test {ca}"),
                "-keyout",
                &format!("{ca}.key"),
                "-out",
                &format!("{ca}.pem"),
            ]);
        }
        pki.leaf(
            "server",
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n",
        );
        pki.leaf(
            "client",
            "extendedKeyUsage=clientAuth\nbasicConstraints=CA:FALSE\n",
        );
        pki
    }

    /// A key and a certificate `name`.pem signed by ca.pem with the given extensions.
    fn leaf(&self, name: &str, extensions: &str) {
        std::fs::write(self.path(&format!("{name}.ext")), extensions).unwrap();
        self.openssl(&[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-subj",
            &format!("/CN=feedd test {name}"),
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
        ]);
        self.openssl(&[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &format!("{name}.ext"),
            "-out",
            &format!("{name}.pem"),
        ]);
    }

    fn openssl(&self, args: &[&str]) {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .expect("openssl (.ci/setup installs it)");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// A private mariadbd with the PKI's server certificate and `require_secure_transport = ON`,
/// plus two accounts: `feed`@127.0.0.1 (password `s3cret-pw`) and `x509`@127.0.0.1
/// (no password, `REQUIRE X509`), both with all rights.
pub fn tls_mariadb(pki: &Pki) -> PrivateMariadb {
    let mut args = tls_args(pki);
    args.push("--require-secure-transport=ON".into());
    let db = PrivateMariadb::start_with(&args);
    let mut c = root_tls(&db, pki);
    for sql in [
        "CREATE USER feed@'127.0.0.1' IDENTIFIED BY 's3cret-pw'",
        "GRANT ALL ON *.* TO feed@'127.0.0.1'",
        "CREATE USER x509@'127.0.0.1' REQUIRE X509",
        "GRANT ALL ON *.* TO x509@'127.0.0.1'",
    ] {
        c.query_drop(sql).unwrap();
    }
    db
}

/// The server options that give mariadbd the PKI's server certificate (TLS offered, not
/// required).
pub fn tls_args(pki: &Pki) -> Vec<String> {
    let arg = |k: &str, p: &Path| format!("--{k}={}", p.display());
    vec![
        arg("ssl-ca", &pki.ca()),
        arg("ssl-cert", &pki.path("server.pem")),
        arg("ssl-key", &pki.path("server.key")),
    ]
}

/// root over TLS, verifying the server against the PKI's CA.
pub fn root_tls(db: &PrivateMariadb, pki: &Pki) -> mysql::Conn {
    let opts = mysql::OptsBuilder::new()
        .ip_or_hostname(Some("127.0.0.1"))
        .tcp_port(db.port)
        .user(Some("root"))
        .prefer_socket(false)
        .ssl_opts(mysql::SslOpts::default().with_root_cert_path(Some(pki.ca())));
    mysql::Conn::new(opts).expect("root over TLS")
}

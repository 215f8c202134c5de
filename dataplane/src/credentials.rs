//! Replicas' own logins (the paper's R6): which protocol a service speaks, and the
//! secret files that hold each replica's credentials.
//!
//! A secret file is a small TOML file on the middlebox's host, readable by its owner
//! only (mode 0600 or stricter, checked):
//!
//! ```toml
//! user = "ncp_replica"   # optional: the client's own user when left out
//! password = "…"
//! database = "app_copy"  # optional, PostgreSQL: the client's own database when left out
//! ```
//!
//! The configuration and the controller carry only the file's path, so the password
//! never leaves the middlebox's host, is never logged and never shows in an API.

use std::{
    collections::BTreeMap, net::SocketAddrV4, os::unix::fs::PermissionsExt, path::Path,
    path::PathBuf, sync::Arc,
};

use ncp_replication::start::{Protocol, ReplicaCredentials, Secret, StartConfig, StartSpec};
use serde::{Deserialize, Serialize};

/// The protocols whose session start the middlebox can run per replica.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ServiceProtocol {
    /// PostgreSQL: cleartext, MD5 and SCRAM-SHA-256 logins; TLS requests declined.
    Postgres,
    /// Redis: leading `AUTH`/`HELLO … AUTH` replaced by the replica's own.
    Redis,
}

impl From<ServiceProtocol> for Protocol {
    fn from(p: ServiceProtocol) -> Self {
        match p {
            ServiceProtocol::Postgres => Protocol::Postgres,
            ServiceProtocol::Redis => Protocol::Redis,
        }
    }
}

/// The file's fields.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SecretFile {
    user: Option<String>,
    password: Option<String>,
    database: Option<String>,
}

/// Reads one replica's secret file, refusing one that others may read.
pub fn load(path: &Path) -> Result<ReplicaCredentials, String> {
    let meta =
        std::fs::metadata(path).map_err(|e| format!("secret file {}: {e}", path.display()))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "secret file {} has mode {mode:04o}: group and others must not read it (chmod 600 it)",
            path.display()
        ));
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("secret file {}: {e}", path.display()))?;
    // The parser's message could quote the password's line: say only where it failed.
    let file: SecretFile = toml::from_str(&text).map_err(|e| {
        let at = e.span().map_or(String::new(), |s| format!(" at byte {}", s.start));
        format!(
            "secret file {} is not valid{at}: it takes `user = \"…\"`, `password = \"…\"` and `database = \"…\"`",
            path.display()
        )
    })?;
    Ok(ReplicaCredentials {
        user: file.user,
        password: file.password.map(Secret::new),
        database: file.database,
    })
}

/// The session start of a service speaking `protocol` with these replicas, each logging
/// in with the secret file `credentials` names for it (none: the client's user and no
/// password).
pub fn start_spec(
    protocol: Option<ServiceProtocol>,
    replicas: &[SocketAddrV4],
    credentials: &BTreeMap<SocketAddrV4, PathBuf>,
) -> Result<Option<StartSpec>, String> {
    if let Some(unknown) = credentials.keys().find(|a| !replicas.contains(a)) {
        return Err(format!(
            "credentials for {unknown}, which is not one of the replicas"
        ));
    }
    let Some(protocol) = protocol else {
        if credentials.is_empty() {
            return Ok(None);
        }
        return Err("credentials need a protocol (protocol = \"postgres\" or \"redis\")".into());
    };
    let replicas = replicas
        .iter()
        .map(|r| {
            credentials
                .get(r)
                .map_or(Ok(ReplicaCredentials::default()), |p| load(p))
        })
        .collect::<Result<_, _>>()?;
    Ok(Some(Arc::new(StartConfig {
        protocol: protocol.into(),
        replicas,
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    const R: SocketAddrV4 = SocketAddrV4::new(std::net::Ipv4Addr::new(198, 18, 2, 3), 5432);

    fn secret(dir: &Path, name: &str, text: &str, mode: u32) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).expect("write");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).expect("chmod");
        p
    }

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ncp-credentials-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("dir");
        d
    }

    #[test]
    fn a_private_secret_file_gives_the_replicas_login() {
        let d = scratch("ok");
        let p = secret(&d, "r", "user = \"bob\"\npassword = \"s3cret\"\n", 0o600);
        let spec = start_spec(
            Some(ServiceProtocol::Postgres),
            &[R],
            &BTreeMap::from([(R, p)]),
        )
        .expect("valid")
        .expect("a start");
        assert_eq!(spec.replicas[0].user.as_deref(), Some("bob"));
        assert_eq!(
            spec.replicas[0].password.as_ref().map(Secret::expose),
            Some("s3cret")
        );
        assert!(
            !format!("{spec:?}").contains("s3cret"),
            "never in debug output"
        );
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn bad_secret_files_are_clear_errors_that_never_quote_the_password() {
        let d = scratch("bad");
        for (text, mode, why) in [
            ("password = \"s3cret\"\n", 0o644, "mode 0644"),
            ("password = \"s3cret\"\nextra = 1\n", 0o600, "is not valid"),
            ("password = s3cret\n", 0o600, "is not valid"),
        ] {
            let p = secret(&d, "r", text, mode);
            let err = start_spec(
                Some(ServiceProtocol::Postgres),
                &[R],
                &BTreeMap::from([(R, p)]),
            )
            .expect_err(why);
            assert!(err.contains(why), "{err}");
            assert!(!err.contains("s3cret"), "{err}");
        }
        let missing = d.join("missing");
        let err = start_spec(
            Some(ServiceProtocol::Postgres),
            &[R],
            &BTreeMap::from([(R, missing)]),
        )
        .expect_err("missing");
        assert!(err.contains("No such file"), "{err}");
        let other = SocketAddrV4::new(std::net::Ipv4Addr::new(198, 18, 2, 9), 1);
        let err = start_spec(
            Some(ServiceProtocol::Postgres),
            &[R],
            &BTreeMap::from([(other, d.join("x"))]),
        )
        .expect_err("not a replica");
        assert!(err.contains("not one of the replicas"), "{err}");
        let err =
            start_spec(None, &[R], &BTreeMap::from([(R, d.join("x"))])).expect_err("no protocol");
        assert!(err.contains("need a protocol"), "{err}");
        let _ = std::fs::remove_dir_all(d);
    }
}

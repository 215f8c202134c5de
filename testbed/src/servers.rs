//! Real servers started inside test-bed hosts, shared by tests, the demo and benchmarks.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::{Error, Result, Testbed};

/// Where Debian's PostgreSQL 15 keeps its programs.
pub const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// A PostgreSQL cluster running in a test-bed host.
#[derive(Debug, Clone)]
pub struct Postgres {
    /// Host it runs in.
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// Directory of its Unix socket (for local `psql`).
    pub socket_dir: PathBuf,
    /// Its data directory.
    pub data: PathBuf,
}

impl Postgres {
    /// Creates a cluster under `dir` and starts it in `host` on `port`, trusting the test
    /// bed's network (198.18.0.0/15). Trust is deliberate: challenge-response methods (md5,
    /// SCRAM) send a per-server nonce, so a replica could not accept an answer computed
    /// for the primary's.
    pub fn start(bed: &Testbed, host: &str, port: u16, dir: &Path) -> Result<(Postgres, Child)> {
        let data = dir.join(format!("{host}-{port}"));
        let socket_dir = dir.join(format!("sock-{host}-{port}"));
        std::fs::create_dir_all(&socket_dir)
            .map_err(|e| Error::Unknown(format!("{}: {e}", socket_dir.display())))?;
        run_ok(
            Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir),
            "chown",
        )?;
        run_ok(
            Command::new("runuser")
                .args([
                    "-u",
                    "postgres",
                    "--",
                    &format!("{PG_BIN}/initdb"),
                    "-A",
                    "trust",
                    "-U",
                    "postgres",
                    "-D",
                ])
                .arg(&data),
            "initdb",
        )?;
        std::fs::write(
            data.join("pg_hba.conf"),
            "local all all trust\nhost all all 198.18.0.0/15 trust\nhost all all 127.0.0.1/32 trust\n",
        )
        .map_err(|e| Error::Unknown(format!("pg_hba.conf: {e}")))?;
        let data_s = data.to_string_lossy().into_owned();
        let sock_s = socket_dir.to_string_lossy().into_owned();
        let port_s = port.to_string();
        let child = bed
            .command(
                host,
                &[
                    "runuser",
                    "-u",
                    "postgres",
                    "--",
                    &format!("{PG_BIN}/postgres"),
                    "-D",
                    &data_s,
                    "-p",
                    &port_s,
                    "-c",
                    "listen_addresses=*",
                    "-c",
                    "fsync=off",
                    "-c",
                    "synchronous_commit=off",
                    "-k",
                    &sock_s,
                ],
            )?
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(
                std::fs::File::create(dir.join(format!("{host}-{port}.log")))
                    .map_err(|e| Error::Unknown(format!("postgres log: {e}")))?,
            )
            .spawn()
            .map_err(|e| Error::Unknown(format!("starting postgres: {e}")))?;
        let pg = Postgres {
            host: host.to_owned(),
            port,
            socket_dir,
            data,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !pg.ready(bed) {
            if Instant::now() > deadline {
                return Err(Error::Unknown(format!(
                    "postgres on {host}:{port} did not start"
                )));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok((pg, child))
    }

    /// Whether it accepts connections.
    pub fn ready(&self, bed: &Testbed) -> bool {
        let sock = self.socket_dir.to_string_lossy().into_owned();
        bed.command(
            &self.host,
            &[
                &format!("{PG_BIN}/pg_isready"),
                "-h",
                &sock,
                "-p",
                &self.port.to_string(),
            ],
        )
        .ok()
        .and_then(|mut c| c.output().ok())
        .is_some_and(|o| o.status.success())
    }

    /// Makes network clients log in as `user` with `password`, checked by `method`
    /// (`scram-sha-256` or `md5`; local `psql` stays trusted), creating the user as a
    /// superuser if it is new. With `ssl`, the server also offers TLS (a self-signed
    /// certificate), as production servers do.
    pub fn require_password(
        &self,
        bed: &Testbed,
        method: &str,
        user: &str,
        password: &str,
        ssl: bool,
    ) -> Result<()> {
        let encryption = if method == "md5" {
            "md5"
        } else {
            "scram-sha-256"
        };
        let quoted = password.replace('\'', "''");
        let role = user.replace('"', "");
        self.sql(bed, &format!("SET password_encryption = '{encryption}'; DO $$BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{role}') THEN CREATE ROLE \"{role}\" LOGIN SUPERUSER; END IF; END$$; ALTER ROLE \"{role}\" PASSWORD '{quoted}'"))?;
        if ssl {
            let cert = self.data.join("server.crt");
            let key = self.data.join("server.key");
            run_ok(
                Command::new("openssl")
                    .args([
                        "req",
                        "-x509",
                        "-newkey",
                        "rsa:2048",
                        "-nodes",
                        "-days",
                        "2",
                        "-subj",
                        "/CN=ncp-test-primary",
                        "-keyout",
                    ])
                    .arg(&key)
                    .arg("-out")
                    .arg(&cert),
                "openssl req",
            )?;
            run_ok(
                Command::new("chown")
                    .args(["postgres:postgres"])
                    .arg(&cert)
                    .arg(&key),
                "chown",
            )?;
            run_ok(Command::new("chmod").arg("600").arg(&key), "chmod")?;
            self.sql(bed, "ALTER SYSTEM SET ssl = on")?;
        }
        std::fs::write(
            self.data.join("pg_hba.conf"),
            format!("local all all trust\nhost all all 198.18.0.0/15 {method}\nhost all all 127.0.0.1/32 {method}\n"),
        )
        .map_err(|e| Error::Unknown(format!("pg_hba.conf: {e}")))?;
        let reloaded = self.sql(bed, "SELECT pg_reload_conf()")?;
        if reloaded != "t" {
            return Err(Error::Unknown(format!("pg_reload_conf: {reloaded}")));
        }
        Ok(())
    }

    /// Checksums of pgbench's four tables (the history's wall-clock column left out), to
    /// compare a replica's data with the primary's.
    pub fn pgbench_fingerprint(&self, bed: &Testbed) -> Result<String> {
        const QUERIES: [&str; 4] = [
            "SELECT count(*) || ':' || md5(string_agg(aid || ',' || bid || ',' || abalance, ';' ORDER BY aid)) FROM pgbench_accounts",
            "SELECT md5(string_agg(bid || ',' || bbalance, ';' ORDER BY bid)) FROM pgbench_branches",
            "SELECT md5(string_agg(tid || ',' || bid || ',' || tbalance, ';' ORDER BY tid)) FROM pgbench_tellers",
            "SELECT count(*) || ':' || md5(string_agg(tid || ',' || bid || ',' || aid || ',' || delta, ';' ORDER BY tid, bid, aid, delta)) FROM pgbench_history",
        ];
        QUERIES
            .iter()
            .map(|q| self.sql(bed, q))
            .collect::<Result<Vec<_>>>()
            .map(|v| v.join(" "))
    }

    /// Runs one SQL statement locally and returns its unaligned output.
    pub fn sql(&self, bed: &Testbed, sql: &str) -> Result<String> {
        let sock = self.socket_dir.to_string_lossy().into_owned();
        let out = bed.exec(
            &self.host,
            &[
                &format!("{PG_BIN}/psql"),
                "-h",
                &sock,
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-At",
                "-c",
                sql,
            ],
        )?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }
}

/// A Redis server running in a test-bed host: no persistence, reachable from the test
/// bed's network, `DEBUG` allowed from its own host (for `DEBUG DIGEST`).
pub struct Redis;

impl Redis {
    /// Starts `redis-server` in `host` on `port`, logging to `log`, and waits until it
    /// answers `PING`.
    pub fn start(bed: &Testbed, host: &str, port: u16, log: &Path) -> Result<Child> {
        let port_s = port.to_string();
        let log_s = log.to_string_lossy().into_owned();
        let mut child = bed.spawn(
            host,
            &[
                "redis-server",
                "--port",
                &port_s,
                "--bind",
                "0.0.0.0",
                "--protected-mode",
                "no",
                "--save",
                "",
                "--appendonly",
                "no",
                "--enable-debug-command",
                "local",
                "--logfile",
                &log_s,
            ],
        )?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let pong = bed
                .exec(host, &["redis-cli", "-p", &port_s, "PING"])
                .is_ok_and(|o| o.stdout.starts_with(b"PONG"));
            if pong {
                return Ok(child);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(Error::Timeout(format!(
                    "redis on {host}:{port} did not answer PING (log: {log_s})"
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn run_ok(command: &mut Command, what: &str) -> Result<()> {
    let out = command
        .output()
        .map_err(|e| Error::Unknown(format!("{what}: {e}")))?;
    if !out.status.success() {
        return Err(Error::Unknown(format!(
            "{what}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

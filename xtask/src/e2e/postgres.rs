//! The demo's second scene: PostgreSQL 15 replicated with production logins (the
//! paper's R6). The primary checks SCRAM-SHA-256 passwords and offers TLS; the replica
//! has a user and a password of its own. The operator names the protocol and the
//! replica's secret file in `ncpctl add`; the middlebox logs the replica in itself, the
//! client (pgbench, libpq's defaults) never knows, and the tables compare equal.

use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use ncp_testbed::servers::{PG_BIN, Postgres};

use super::{Scene, WORK, consistency_line};
use crate::{cmd::step, middlebox::Middlebox};

const PG_PORT: u16 = 5432;
const PRIMARY_PASSWORD: &str = "primary-scram-pw";
const REPLICA_USER: &str = "ncp_replica";
const REPLICA_PASSWORD: &str = "replica-own-pw";
const TRANSACTIONS: &str = "1000";

impl Scene {
    /// Replication #2: PostgreSQL with SCRAM, run through NCP, then removed again.
    pub(super) fn postgres_scene(
        &mut self,
        middlebox: &Middlebox,
        source: Ipv4Addr,
        mb: Ipv4Addr,
    ) -> anyhow::Result<()> {
        let primary_ip = self.bed.address("primary", "eth0")?;
        let replica_ip = self.bed.address("replica", "eth1")?;
        step(
            "scene 2: PostgreSQL 15, SCRAM-SHA-256 on the primary (which offers TLS) and its own user and password on the replica",
        );
        let dir = std::path::Path::new(WORK).join("pg");
        std::fs::create_dir_all(&dir)?;
        let mut start = |host: &str| -> anyhow::Result<Postgres> {
            let (pg, child) = Postgres::start(&self.bed, host, PG_PORT, &dir)?;
            self.processes.push(child);
            Ok(pg)
        };
        let primary = start("primary")?;
        let replica = start("replica")?;
        primary.require_password(
            &self.bed,
            "scram-sha-256",
            "postgres",
            PRIMARY_PASSWORD,
            true,
        )?;
        replica.require_password(
            &self.bed,
            "scram-sha-256",
            REPLICA_USER,
            REPLICA_PASSWORD,
            false,
        )?;
        let secret = format!("{WORK}/pg-replica.secret");
        std::fs::write(
            &secret,
            format!("user = \"{REPLICA_USER}\"\npassword = \"{REPLICA_PASSWORD}\"\n"),
        )?;
        std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;

        step(
            "ncpctl add --protocol postgres --credentials REPLICA=SECRET-FILE (the controller gets the path, never the password)",
        );
        let replica_addr = format!("{replica_ip}:{PG_PORT}");
        self.ncpctl(&[
            "add",
            "--id",
            "2",
            "--source",
            &source.to_string(),
            "--primary",
            &format!("{primary_ip}:{PG_PORT}"),
            "--middlebox",
            &mb.to_string(),
            "--replica",
            &replica_addr,
            "--protocol",
            "postgres",
            "--credentials",
            &format!("{replica_addr}={secret}"),
        ])?;
        self.wait_for(
            "replication #2 to be installed",
            Duration::from_secs(30),
            |s| {
                let v = s.ncpctl(&["status", "--json"]).ok()?;
                v.as_array()?
                    .iter()
                    .any(|r| r["id"] == 2 && r["installed"] == true)
                    .then_some(())
            },
        )?;
        self.wait_for("the middlebox to serve r2", Duration::from_secs(20), |_| {
            middlebox.services().ok()?.contains("r2").then_some(())
        })?;

        step(
            "pgbench -i and a seeded run from the source through NCP (libpq defaults: sslmode=prefer)",
        );
        let started = Instant::now();
        let pgbench = |args: &[&str]| -> anyhow::Result<String> {
            let password = format!("PGPASSWORD={PRIMARY_PASSWORD}");
            let bin = format!("{PG_BIN}/pgbench");
            let host = primary_ip.to_string();
            let port = PG_PORT.to_string();
            let mut argv = vec!["env", &password, &bin];
            argv.extend_from_slice(args);
            argv.extend(["-h", &host, "-p", &port, "-U", "postgres", "postgres"]);
            let out = self.bed.exec("source", &argv)?;
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        };
        pgbench(&["-i", "-s", "1", "-q"])?;
        let report = pgbench(&[
            "-c",
            "2",
            "-j",
            "1",
            "-t",
            TRANSACTIONS,
            "--random-seed=4242",
        ])?;
        let took = started.elapsed();
        let want = primary.pgbench_fingerprint(&self.bed)?;
        let got = self
            .wait_for(
                "the replica's tables to equal the primary's",
                Duration::from_secs(30),
                |s| {
                    let f = replica.pgbench_fingerprint(&s.bed).ok()?;
                    (f == want).then_some(f)
                },
            )
            .or_else(|_| {
                replica
                    .pgbench_fingerprint(&self.bed)
                    .map_err(anyhow::Error::from)
            });
        let stats = middlebox.stats()?;
        let service = stats["replication"]["services"]
            .as_array()
            .and_then(|s| s.iter().find(|s| s["name"] == "r2"))
            .cloned()
            .context("the middlebox reports no service r2")?;
        let detached = service["replicas"][0]["detached"].clone();
        let state = self.ncpctl(&["status", "--json"]).ok().and_then(|v| {
            v.as_array()?
                .iter()
                .find(|r| r["id"] == 2)
                .and_then(|r| r["replica_states"].get(0).cloned())
        });
        let tps = report
            .lines()
            .find(|l| l.starts_with("tps"))
            .unwrap_or("tps: ?")
            .trim()
            .to_owned();

        println!("\n------------------ scene 2: PostgreSQL + SCRAM ------------------");
        println!(
            "replication #2: tcp {source} -> {primary_ip}:{PG_PORT}, replica {replica_addr} logged in as {REPLICA_USER} with its own password"
        );
        println!(
            "primary: SCRAM-SHA-256, TLS offered ({}); client: pgbench with libpq's defaults",
            primary.sql(&self.bed, "SHOW ssl")?
        );
        println!(
            "pgbench -i -s 1 and -c 2 -t {TRANSACTIONS} through NCP: {:.1} s; {tps}",
            took.as_secs_f64()
        );
        println!("tables, primary: {want}");
        println!(
            "tables, replica: {}",
            got.as_deref().unwrap_or("NOT READABLE")
        );
        println!(
            "middlebox: {} session(s); replica detached: {detached}",
            service["sessions_total"]
        );
        println!(
            "controller: {}",
            consistency_line(&state.context("no consistency entry for replication #2"))
        );
        let login_failed = detached["login_failed"].as_u64().unwrap_or(1);
        println!("=================================================================");
        self.ncpctl(&["rm", "2"])?;
        // The middlebox restarts its workers when its service list changes, which resets
        // the sessions open then: wait for that here, not in the middle of the next drill.
        self.wait_for("the middlebox to drop r2", Duration::from_secs(30), |_| {
            let services = middlebox.services().ok()?;
            (!services.contains("r2")).then_some(())
        })?;
        if got.ok().as_deref() != Some(want.as_str()) || login_failed != 0 {
            bail!("scene 2: the PostgreSQL replica is not in step with the primary (see above)");
        }
        Ok(())
    }
}

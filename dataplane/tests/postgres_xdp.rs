//! Privileged end-to-end test of a relational database replicated by the XDP middlebox:
//! PostgreSQL as primary and as two replicas (two clusters on the replica host, reached
//! over the dedicated replication NIC), a deterministic pgbench workload from the source,
//! and the tables compared afterwards.
//!
//! Two logins:
//! - the clusters trust the test bed's network and the stream is copied as it is (the
//!   client must then not negotiate SSL or GSS: see the comment where pgbench is run);
//! - the paper's R6: every cluster has a password of its own (SCRAM-SHA-256, one replica
//!   MD5 with a different user), the primary offers TLS, the client uses libpq's
//!   defaults, and the middlebox logs each replica in itself (`protocol = "postgres"`,
//!   secret files). A replica with a wrong password is detached with "authentication
//!   failed" and the client never notices.

#![allow(
    clippy::unwrap_used,
    reason = "test code: a failed step should fail the test"
)]

mod support;

use support::{
    XdpMiddlebox, output_ok,
    scene::{paper_bed, steer_to_middlebox},
};

use std::{
    path::PathBuf,
    process::Child,
    time::{Duration, Instant},
};

use ncp_dataplane::control::{self, Request};
use ncp_testbed::{
    Testbed,
    servers::{PG_BIN, Postgres},
};

const PREFIX: &str = "npg";

struct Scene {
    bed: Testbed,
    /// Stopped first on drop, before the databases it talks to.
    middlebox: Option<XdpMiddlebox>,
    children: Vec<Child>,
    dir: PathBuf,
}

impl Drop for Scene {
    fn drop(&mut self) {
        drop(self.middlebox.take());
        for child in self.children.iter_mut().rev() {
            // SAFETY: signals our own child by pid (postgres shuts down on SIGTERM).
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = Testbed::down(PREFIX);
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

impl Scene {
    fn start_postgres(&mut self, host: &str, port: u16) -> Postgres {
        let (pg, child) = Postgres::start(&self.bed, host, port, &self.dir).unwrap();
        self.children.push(child);
        pg
    }

    /// Checksums of pgbench's tables.
    fn fingerprint(&self, pg: &Postgres) -> Result<String, String> {
        pg.pgbench_fingerprint(&self.bed).map_err(|e| e.to_string())
    }
}

/// What a test runs: the services' extra TOML lines, the clusters' logins, the client's
/// environment.
struct Setup<'a> {
    /// Lines added to the service's TOML table (after `replicas`).
    service_toml: String,
    /// pgbench's environment (libpq variables).
    client_env: &'a [&'a str],
    /// The replica clusters' ports; the middlebox copies to every one.
    replica_ports: &'a [u16],
}

const PRIMARY_PORT: u16 = 5432;

impl Scene {
    /// A paper bed with the primary and `replica_ports` clusters running, nothing steered.
    fn new(replica_ports: &[u16]) -> (Self, Postgres, Vec<Postgres>) {
        let bed = paper_bed(PREFIX, 1);
        let dir = PathBuf::from(format!("/tmp/ncp-{PREFIX}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut scene = Scene {
            bed,
            middlebox: None,
            children: Vec::new(),
            dir,
        };
        let primary = scene.start_postgres("primary", PRIMARY_PORT);
        let replicas = replica_ports
            .iter()
            .map(|p| scene.start_postgres("replica", *p))
            .collect();
        (scene, primary, replicas)
    }

    /// Starts the XDP middlebox for the service and steers the primary's traffic to it.
    fn start_middlebox(&mut self, setup: &Setup) -> PathBuf {
        let source = self.bed.address("source", "eth0").unwrap();
        let primary = self.bed.address("primary", "eth0").unwrap();
        let replica = self.bed.address("replica", "eth1").unwrap();
        let mb0 = self.bed.address("middlebox", "eth0").unwrap();
        let mb1 = self.bed.address("middlebox", "eth1").unwrap();
        let socket = self.dir.join("mb.sock");
        let config = self.dir.join("mb.toml");
        let replicas: Vec<String> = setup
            .replica_ports
            .iter()
            .map(|p| format!("\"{replica}:{p}\""))
            .collect();
        std::fs::write(
            &config,
            format!(
                "control_socket = \"{}\"\n\
                 [[interfaces]]\nname = \"eth0\"\naddress = \"{mb0}\"\nqueues = [{{ queue = 0, core = 1 }}]\n\
                 [[interfaces]]\nname = \"eth1\"\naddress = \"{mb1}\"\nqueues = [{{ queue = 0, core = 1 }}]\n\
                 [[services]]\nname = \"postgres\"\nprimary = \"{primary}:{PRIMARY_PORT}\"\nclients = \"{source}/32\"\n\
                 replicas = [{}]\nreplica_interface = \"eth1\"\n\
                 replica_budget_bytes = 67108864\n{}",
                socket.display(),
                replicas.join(", "),
                setup.service_toml,
            ),
        )
        .unwrap();
        let log = self.dir.join("mb.log");
        self.middlebox = Some(XdpMiddlebox::start_with_log(
            &self.bed,
            &config,
            &socket,
            Some(&log),
        ));
        steer_to_middlebox(&self.bed, primary);
        socket
    }

    /// Runs pgbench from the source against the primary's address, as `user`.
    fn pgbench(&self, env: &[&str], user: &str, args: &[&str]) -> String {
        let primary = self.bed.address("primary", "eth0").unwrap();
        let mut argv = vec!["env".to_owned()];
        argv.extend(env.iter().map(|e| (*e).to_owned()));
        argv.push(format!("{PG_BIN}/pgbench"));
        argv.extend(args.iter().map(|a| (*a).to_owned()));
        argv.extend([
            "-h".into(),
            primary.to_string(),
            "-p".into(),
            PRIMARY_PORT.to_string(),
            "-U".into(),
            user.into(),
            "postgres".into(),
        ]);
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        let out = output_ok(
            &mut self.bed.command("source", &argv).unwrap(),
            &format!("pgbench {args:?}"),
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The replicas' counters as the middlebox reports them.
    fn replica_stats(socket: &std::path::Path) -> serde_json::Value {
        match control::call(socket, &Request::Stats) {
            Ok(ncp_dataplane::control::Response::Stats(s)) => s
                .replication
                .map(|r| r["services"][0]["replicas"].clone())
                .unwrap_or_default(),
            other => serde_json::Value::String(format!("{other:?}")),
        }
    }

    /// pgbench's load and a seeded run through the middlebox, then every replica in
    /// `equal` must hold the primary's tables.
    fn run_and_compare(
        &self,
        setup: &Setup,
        socket: &std::path::Path,
        user: &str,
        primary: &Postgres,
        equal: &[&Postgres],
    ) {
        // pgbench -i loads ~20 MB with COPY at full speed; the replica budget is sized so
        // a replica behind the lossy software switch is not cut loose during the burst
        // (that is the right policy in production, and a different test).
        self.pgbench(setup.client_env, user, &["-i", "-s", "2", "-q"]);
        let report = self.pgbench(
            setup.client_env,
            user,
            &["-c", "1", "-j", "1", "-t", "2000", "--random-seed=4242"],
        );
        eprintln!("{report}");
        let want = self.fingerprint(primary).unwrap();
        assert!(
            want.starts_with("200000:"),
            "primary was not loaded: {want}"
        );
        assert!(
            want.contains(" 2000:"),
            "history should hold 2000 transactions: {want}"
        );
        for db in equal {
            // A replica applies on its own schedule; give it a bounded moment.
            let deadline = Instant::now() + Duration::from_secs(30);
            let mut got = self.fingerprint(db);
            while got.as_ref() != Ok(&want) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(500));
                got = self.fingerprint(db);
            }
            assert_eq!(
                got,
                Ok(want.clone()),
                "replica {} differs from the primary; replicas: {}",
                db.port,
                Self::replica_stats(socket)
            );
        }
    }
}

fn postgres_tools_or_skip(test: &str) -> bool {
    ncp_testbed::ready_or_skip(
        test,
        &[
            "runuser",
            "openssl",
            &format!("{PG_BIN}/postgres"),
            &format!("{PG_BIN}/pgbench"),
        ],
    )
}

#[test]
fn postgres_primary_and_two_replicas_compare_equal_after_pgbench() {
    if !postgres_tools_or_skip("postgres replication") {
        return;
    }
    let setup = Setup {
        service_toml: String::new(),
        // No SSL or GSS negotiation: PostgreSQL refuses a client whose next message is
        // already buffered behind its SSLRequest (a defence against injection), and a
        // replica, reading at its own pace, can find exactly that — the client sent the
        // startup message as soon as the *primary* said "no SSL". (With `protocol =
        // "postgres"` the middlebox declines the request itself: see the next test.)
        client_env: &["PGSSLMODE=disable", "PGGSSENCMODE=disable"],
        replica_ports: &[5432, 5433],
    };
    let (mut scene, primary, replicas) = Scene::new(setup.replica_ports);
    let socket = scene.start_middlebox(&setup);
    let equal: Vec<&Postgres> = replicas.iter().collect();
    scene.run_and_compare(&setup, &socket, "postgres", &primary, &equal);
}

/// The paper's R6 with production logins: SCRAM on the primary (which offers TLS) and on
/// one replica with its own password, MD5 with another user on the second replica, and a
/// third replica whose secret file has the wrong password.
#[test]
fn postgres_replicas_with_their_own_passwords_follow_a_scram_primary() {
    if !postgres_tools_or_skip("postgres replication with replica credentials") {
        return;
    }
    let ports = [5432, 5433, 5434];
    let (mut scene, primary, replicas) = Scene::new(&ports);
    primary
        .require_password(&scene.bed, "scram-sha-256", "postgres", "primary-pw", true)
        .unwrap();
    assert_eq!(
        primary.sql(&scene.bed, "SHOW ssl").unwrap(),
        "on",
        "the primary offers TLS"
    );
    replicas[0]
        .require_password(
            &scene.bed,
            "scram-sha-256",
            "postgres",
            "replica-a-pw",
            false,
        )
        .unwrap();
    replicas[1]
        .require_password(&scene.bed, "md5", "ncp_replica", "replica-b-pw", false)
        .unwrap();
    replicas[2]
        .require_password(
            &scene.bed,
            "scram-sha-256",
            "postgres",
            "replica-c-pw",
            false,
        )
        .unwrap();
    let replica = scene.bed.address("replica", "eth1").unwrap();
    let mut credentials = Vec::new();
    for (port, text) in [
        (5432, "password = \"replica-a-pw\"\n"),
        (
            5433,
            "user = \"ncp_replica\"\npassword = \"replica-b-pw\"\n",
        ),
        (5434, "password = \"not-the-replicas-password\"\n"),
    ] {
        let path = scene.dir.join(format!("replica-{port}.secret"));
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        credentials.push(format!("\"{replica}:{port}\" = \"{}\"", path.display()));
    }
    let setup = Setup {
        service_toml: format!(
            "protocol = \"postgres\"\ncredentials = {{ {} }}\n",
            credentials.join(", ")
        ),
        // libpq's defaults (sslmode=prefer): the middlebox declines TLS for the primary.
        client_env: &["PGPASSWORD=primary-pw"],
        replica_ports: &ports,
    };
    let socket = scene.start_middlebox(&setup);
    scene.run_and_compare(
        &setup,
        &socket,
        "postgres",
        &primary,
        &[&replicas[0], &replicas[1]],
    );

    let stats = Scene::replica_stats(&socket);
    let detached = |i: usize, reason: &str| stats[i]["detached"][reason].as_u64().unwrap_or(0);
    for i in 0..2 {
        assert_eq!(
            detached(i, "login_failed"),
            0,
            "replica {i} logged in: {stats}"
        );
    }
    assert!(
        detached(2, "login_failed") >= 1,
        "the wrong password detaches: {stats}"
    );
    let log = scene.middlebox.as_ref().unwrap().log_text();
    assert!(
        log.contains("authentication failed"),
        "the reason is logged"
    );
    assert!(
        !log.contains("replica-a-pw") && !log.contains("not-the-replicas-password"),
        "no secret in the log"
    );
    let untouched = scene.fingerprint(&replicas[2]);
    assert!(
        untouched.is_err() || untouched.as_ref().is_ok_and(|f| !f.starts_with("200000:")),
        "the refused replica got nothing: {untouched:?}"
    );
}

//! Privileged end-to-end test of the paper's R6 for Redis: the primary and the replica
//! have passwords of their own (the replica through an ACL user), the client logs in to
//! the primary (`AUTH`, then `HELLO 3 AUTH`), and the middlebox logs the replica in with
//! its own credentials (`protocol = "redis"`, a secret file). A seeded workload leaves
//! both with the same digest, reply verification finds no difference (the login replies
//! are not compared), and a wrong replica password detaches the replica with
//! "authentication failed" while the client goes on.

#![allow(
    clippy::unwrap_used,
    reason = "test code: a failed step should fail the test"
)]

mod support;

use std::{
    io::Write,
    thread,
    time::{Duration, Instant},
};

use ncp_testbed::workload::redis_writes;
use support::{
    redis::{self, run_pipe},
    scene::{Mode, Scene, Service},
    serial,
};

const PREFIX: &str = "nrc";
const PRIMARY_PASSWORD: &str = "primary-pw";
const REPLICA_USER: &str = "ncp";
const REPLICA_PASSWORD: &str = "replica-pw";

/// Starts redis on `host` with `auth` added to its arguments, waiting until it answers
/// to `login`.
fn start_redis(scene: &mut Scene, host: &str, auth: &[&str], login: &[&str]) {
    let mut argv = redis::server_argv();
    argv.extend(auth.iter().map(|a| (*a).to_owned()));
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    scene.spawn(host, &argv);
    let deadline = Instant::now() + Duration::from_secs(20);
    while cli(scene, host, login, &["PING"]) != "PONG" {
        assert!(Instant::now() < deadline, "redis on {host} did not start");
        thread::sleep(Duration::from_millis(100));
    }
}

/// One command on `host` itself, logged in with `login` (redis-cli options).
fn cli(scene: &Scene, host: &str, login: &[&str], args: &[&str]) -> String {
    let port = redis::PORT.to_string();
    let mut argv = vec![
        "redis-cli",
        "--no-auth-warning",
        "-h",
        "127.0.0.1",
        "-p",
        &port,
    ];
    argv.extend_from_slice(login);
    argv.extend_from_slice(args);
    match scene.bed.exec(host, &argv) {
        Ok(out) => String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        Err(e) => format!("error: {e}"),
    }
}

/// redis-cli from the source to the primary's address (through the middlebox).
fn from_source(scene: &Scene, options: &[&str]) -> std::process::Command {
    let port = redis::PORT.to_string();
    let primary = scene.primary.to_string();
    let mut argv = vec![
        "redis-cli",
        "--no-auth-warning",
        "-h",
        &primary,
        "-p",
        &port,
    ];
    argv.extend_from_slice(options);
    scene.bed.command("source", &argv).unwrap()
}

fn write_secret(scene: &Scene, password: &str) -> std::path::PathBuf {
    let path = scene.dir.join("replica.secret");
    std::fs::write(
        &path,
        format!("user = \"{REPLICA_USER}\"\npassword = \"{password}\"\n"),
    )
    .unwrap();
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    path
}

fn service(scene: &Scene, secret: &std::path::Path) -> Service {
    Service::new("redis", redis::PORT)
        .verify_replies()
        .with_toml(&format!(
            "protocol = \"redis\"\ncredentials = {{ \"{}:{}\" = \"{}\" }}",
            scene.replica,
            redis::PORT,
            secret.display()
        ))
}

#[test]
fn redis_replica_with_its_own_acl_user_follows_a_password_protected_primary() {
    let mode = Mode::Xdp;
    if !mode.ready_or_skip(
        "redis replication with replica credentials",
        &["ping", "redis-server", "redis-cli"],
    ) {
        return;
    }
    let _serial = serial();
    let mut scene = Scene::network(mode, PREFIX, 1);
    let primary_login = ["-a", PRIMARY_PASSWORD];
    let replica_login = ["--user", REPLICA_USER, "--pass", REPLICA_PASSWORD];
    start_redis(
        &mut scene,
        "primary",
        &["--requirepass", PRIMARY_PASSWORD],
        &primary_login,
    );
    let password_rule = format!(">{REPLICA_PASSWORD}");
    start_redis(
        &mut scene,
        "replica",
        // The replica's default user has yet another password: only the ACL user works.
        &[
            "--requirepass",
            "replica-default-pw",
            "--user",
            REPLICA_USER,
            "on",
            &password_rule,
            "~*",
            "&*",
            "+@all",
        ],
        &replica_login,
    );
    let secret = write_secret(&scene, REPLICA_PASSWORD);
    let config = scene.config(&[service(&scene, &secret)], "");
    scene.start_middlebox(&config);

    // A seeded workload, logged in with AUTH (redis-cli -a sends it first).
    let workload = redis_writes(2_000, 7);
    let out = run_pipe(
        from_source(&scene, &["-a", PRIMARY_PASSWORD, "--pipe"]),
        move |mut stdin| stdin.write_all(&workload).unwrap(),
    );
    assert!(out.contains("errors: 0, replies: 2000"), "{out}");
    // A RESP3 client logging in through HELLO 3 AUTH.
    let hello = from_source(
        &scene,
        &[
            "-3",
            "--user",
            "default",
            "--pass",
            PRIMARY_PASSWORD,
            "SET",
            "resp3",
            "yes",
        ],
    )
    .output()
    .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&hello.stdout).trim(),
        "OK",
        "{hello:?}"
    );

    let s = scene.stats_when("both sessions end", |s| {
        s.counters.sessions_total == 2 && s.counters.sessions_active == 0
    });
    let replica = &s.services[0].replicas[0];
    assert_eq!(replica.detached.total(), 0, "{s:#?}");
    let digest = |host: &str, login: &[&str]| cli(&scene, host, login, &["DEBUG", "DIGEST"]);
    let want = digest("primary", &primary_login);
    let deadline = Instant::now() + Duration::from_secs(20);
    while digest("replica", &replica_login) != want && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(digest("replica", &replica_login), want, "{s:#?}");
    assert_eq!(
        cli(&scene, "replica", &replica_login, &["GET", "resp3"]),
        "yes"
    );
    let state = scene.consistency();
    assert!(
        state.iter().all(|c| c.reasons.reply_mismatch == 0),
        "the login replies differ, the rest must not: {state:#?}"
    );
    // The 2000 answers (":0\r\n" and up: at least 4 bytes each) were compared.
    assert!(
        state
            .iter()
            .all(|c| c.verification.bytes_compared >= 2_000 * 4),
        "{state:#?}"
    );

    // The same with a wrong password in the replica's secret: the replica is detached,
    // the client does not notice.
    scene.stop_middlebox();
    let secret = write_secret(&scene, "not-the-replicas-password");
    let config = scene.config(&[service(&scene, &secret)], "");
    scene.start_middlebox(&config);
    let set = from_source(
        &scene,
        &["-a", PRIMARY_PASSWORD, "SET", "after", "wrong-password"],
    )
    .output()
    .unwrap();
    assert_eq!(String::from_utf8_lossy(&set.stdout).trim(), "OK", "{set:?}");
    let s = scene.stats_when("the replica is detached", |s| {
        s.services[0].replicas[0].detached.login_failed == 1
    });
    assert_eq!(s.services[0].replicas[0].detached.total(), 1, "{s:#?}");
    assert_eq!(
        cli(&scene, "replica", &replica_login, &["EXISTS", "after"]),
        "0"
    );
    assert_eq!(
        cli(&scene, "primary", &primary_login, &["GET", "after"]),
        "wrong-password"
    );
}

//! Starting and stopping the Open vSwitch daemons without systemd, and talking to them.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::cmd;
use crate::error::{Error, Result};
use crate::state;

const RUN_DIR: &str = "/var/run/openvswitch";
const LOG_DIR: &str = "/var/log/openvswitch";
const DB_PATH: &str = "/etc/openvswitch/conf.db";
const SCHEMA: &str = "/usr/share/openvswitch/vswitch.ovsschema";
const DB_SOCK: &str = "/var/run/openvswitch/db.sock";

/// Does ovsdb-server answer on its unix socket?
pub fn db_answers() -> bool {
    cmd::succeeds(&["ovs-vsctl", "--no-wait", "--timeout=2", "show"])
}

/// Does ovs-vswitchd answer on its control socket?
pub fn vswitchd_answers() -> bool {
    cmd::succeeds(&["ovs-appctl", "--timeout=2", "-t", "ovs-vswitchd", "version"])
}

fn ovsdb_server_answers() -> bool {
    cmd::succeeds(&["ovs-appctl", "--timeout=2", "-t", "ovsdb-server", "version"])
}

fn pidfile_pid(daemon: &str) -> Option<i32> {
    std::fs::read_to_string(Path::new(RUN_DIR).join(format!("{daemon}.pid")))
        .ok()
        .and_then(|s| s.trim().parse().ok())
}

/// The database file, following the packaged symlink (Debian points
/// /etc/openvswitch/conf.db at /var/lib/openvswitch/conf.db): `ovsdb-tool create` refuses a
/// dangling symlink, so we create the file where the link points.
fn db_file() -> PathBuf {
    let link = Path::new(DB_PATH);
    match std::fs::read_link(link) {
        Ok(target) if target.is_absolute() => target,
        Ok(target) => link.parent().map(|dir| dir.join(&target)).unwrap_or(target),
        Err(_) => link.to_path_buf(),
    }
}

fn mkdir(path: &Path) -> Result<()> {
    std::fs::create_dir_all(path).map_err(|e| Error::State {
        path: path.to_path_buf(),
        message: format!("cannot create directory: {e}"),
    })
}

fn path_str(path: &Path) -> Result<&str> {
    path.to_str().ok_or_else(|| Error::State {
        path: path.to_path_buf(),
        message: "path is not UTF-8".to_string(),
    })
}

/// Makes sure ovsdb-server and ovs-vswitchd run and answer. Records the daemons it started
/// in the state directory so that `down` can stop exactly those. Call with the state lock
/// held.
pub fn ensure_running() -> Result<()> {
    let mut started = state::read_ovs()?;
    if db_answers() && vswitchd_answers() {
        return Ok(());
    }
    mkdir(Path::new(RUN_DIR))?;
    mkdir(Path::new(LOG_DIR))?;

    if !db_answers() {
        if ovsdb_server_answers() {
            // A server is up but not on the socket we use: starting a second one would fight
            // over the database lock, so report instead of guessing.
            return Err(Error::Timeout(format!(
                "ovsdb-server runs but does not answer on {DB_SOCK}"
            )));
        }
        let db = db_file();
        if !db.exists() {
            if let Some(dir) = db.parent() {
                mkdir(dir)?;
            }
            tracing::info!(db = %db.display(), "creating OVS database");
            cmd::run(&["ovsdb-tool", "create", path_str(&db)?, SCHEMA])?;
        } else if cmd::stdout(&["ovsdb-tool", "needs-conversion", path_str(&db)?, SCHEMA])
            .map(|s| s.trim() == "yes")
            .unwrap_or(false)
        {
            tracing::info!(db = %db.display(), "converting OVS database to the installed schema");
            cmd::run(&["ovsdb-tool", "convert", path_str(&db)?, SCHEMA])?;
        }
        let remote = format!("--remote=punix:{DB_SOCK}");
        start_daemon(
            &mut started,
            |d| &mut d.ovsdb_server,
            &["ovsdb-server", path_str(&db)?, &remote],
            Duration::from_secs(10),
            db_answers,
        )?;
        cmd::run(&["ovs-vsctl", "--no-wait", "init"])?;
    }

    if !vswitchd_answers() {
        start_daemon(
            &mut started,
            |d| &mut d.ovs_vswitchd,
            &["ovs-vswitchd"],
            Duration::from_secs(15),
            vswitchd_answers,
        )?;
    }
    Ok(())
}

/// Starts one OVS daemon (`command[0]`) in the background, records its pid in the state
/// directory before waiting (so `down` can stop it even if it never answers) and waits up
/// to `patience` for `answers`.
fn start_daemon(
    started: &mut state::OvsDaemons,
    pid_slot: fn(&mut state::OvsDaemons) -> &mut Option<i32>,
    command: &[&str],
    patience: Duration,
    answers: fn() -> bool,
) -> Result<()> {
    let daemon = command[0];
    tracing::info!("starting {daemon}");
    let mut argv = command.to_vec();
    argv.extend(["--pidfile", "--detach", "--log-file"]);
    cmd::run(&argv)?;
    *pid_slot(started) = pidfile_pid(daemon);
    state::write_ovs(started)?;
    cmd::wait_until(patience, &format!("{daemon} to answer"), answers)
}

/// Kills ovs-vswitchd with SIGKILL (a crash: no clean shutdown, the userspace datapath
/// and every flow table go with it) and starts it again from the database, which still
/// holds the bridges, ports and controllers. Only a daemon the test bed started itself is
/// killed; returns the time from the kill until the new one answers. Call with the state
/// lock held.
pub fn crash_and_restart_vswitchd() -> Result<std::time::Duration> {
    let recorded = state::read_ovs()?;
    let pid = recorded
        .ovs_vswitchd
        .filter(|pid| pidfile_pid("ovs-vswitchd") == Some(*pid) && cmd::alive(*pid))
        .ok_or_else(|| {
            Error::Unknown(
                "ovs-vswitchd was not started by the test bed (or was replaced since); \
                 not killing someone else's switch"
                    .into(),
            )
        })?;
    tracing::info!(pid, "killing ovs-vswitchd (SIGKILL)");
    let killed = std::time::Instant::now();
    cmd::kill(pid, libc::SIGKILL);
    cmd::wait_until(Duration::from_secs(5), "ovs-vswitchd to exit", || {
        !cmd::alive(pid)
    })?;
    ensure_running()?;
    Ok(killed.elapsed())
}

/// Stops the daemons `ensure_running` started, if their pidfiles still name the recorded
/// pids (otherwise someone restarted them and they are not ours to stop). Returns whether
/// anything was stopped. Call with the state lock held.
pub fn stop_started() -> Result<bool> {
    let mut recorded = state::read_ovs()?;
    let mut stopped = false;
    // vswitchd first: it is the database's client.
    for (daemon, slot) in [
        ("ovs-vswitchd", &mut recorded.ovs_vswitchd),
        ("ovsdb-server", &mut recorded.ovsdb_server),
    ] {
        let Some(pid) = *slot else { continue };
        if pidfile_pid(daemon) == Some(pid) && cmd::alive(pid) {
            tracing::info!(daemon, pid, "stopping OVS daemon started by the test bed");
            cmd::terminate(pid, Duration::from_secs(5));
            stopped = true;
        } else {
            tracing::info!(
                daemon,
                pid,
                "recorded OVS daemon is gone or was replaced; leaving it"
            );
        }
        *slot = None;
    }
    state::write_ovs(&recorded)?;
    Ok(stopped)
}

/// All bridge names, or `None` if ovsdb-server does not answer.
pub fn list_bridges() -> Option<Vec<String>> {
    let out = cmd::stdout(&["ovs-vsctl", "--timeout=5", "list-br"]).ok()?;
    Some(out.lines().map(str::to_string).collect())
}

/// The `ofport` OVS assigned to an interface (`-1` or empty while it failed or is pending).
pub fn ofport(ifname: &str) -> Result<i64> {
    let out = cmd::stdout(&[
        "ovs-vsctl",
        "--timeout=5",
        "get",
        "interface",
        ifname,
        "ofport",
    ])?;
    Ok(out.trim().parse().unwrap_or(-1))
}

/// The `error` column of an interface, for diagnostics.
pub fn interface_error(ifname: &str) -> String {
    cmd::stdout(&[
        "ovs-vsctl",
        "--timeout=5",
        "get",
        "interface",
        ifname,
        "error",
    ])
    .map(|s| s.trim().to_string())
    .unwrap_or_default()
}

/// Gives ovs-vswitchd the credentials it presents to `ssl:` controllers and the CA it
/// checks the controller's certificate against.
pub fn set_ssl(ssl: &crate::state::OvsSsl) -> Result<()> {
    cmd::run(&[
        "ovs-vsctl",
        "--timeout=10",
        "set-ssl",
        path_str(&ssl.privkey)?,
        path_str(&ssl.cert)?,
        path_str(&ssl.cacert)?,
    ])
    .map(drop)
}

/// Removes OVS's SSL setting if it points at files under `dir` (about to be deleted), so
/// that OVS does not keep trying to read them. Best effort: OVS may not be running.
pub fn forget_ssl_under(dir: &Path) {
    let Ok(current) = cmd::stdout(&["ovs-vsctl", "--timeout=5", "get-ssl"]) else {
        return;
    };
    // With the separator, so that `/run/x/a-pki` does not match `/run/x/a-pki2/...`.
    if dir
        .to_str()
        .is_some_and(|d| current.contains(&format!("{d}/")))
    {
        tracing::info!(dir = %dir.display(), "removing OVS's SSL setting");
        if let Err(e) = cmd::run(&["ovs-vsctl", "--timeout=5", "del-ssl"]) {
            tracing::warn!(error = %e, "ovs-vsctl del-ssl failed");
        }
    }
}

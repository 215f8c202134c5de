//! A real Prometheus server (Debian's `/usr/bin/prometheus`, installed by
//! `cargo xtask setup`) scraping ncpd's `/metrics`, and its query API read back: shared
//! by the controller's metrics test and the demo.
//!
//! It listens on a free loopback port only, keeps its storage in a directory of its own
//! under the system's temporary directory, scrapes every second, and is killed by pid and
//! its directory removed when the [`Prometheus`] is dropped, whatever path the caller
//! leaves by.

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use crate::{Error, Result};

/// The job name the scraped series carry (`job="ncpd"`).
pub const JOB: &str = "ncpd";

/// How often Prometheus scrapes ncpd.
pub const SCRAPE_INTERVAL: Duration = Duration::from_secs(1);

/// One series of an instant query's answer.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    /// Its labels, `__name__` included.
    pub labels: BTreeMap<String, String>,
    /// Its value at the query's time.
    pub value: f64,
}

impl Sample {
    /// The label `name`, or "" when the series has none.
    pub fn label(&self, name: &str) -> &str {
        self.labels.get(name).map_or("", String::as_str)
    }
}

/// A Prometheus process scraping one ncpd; killed and cleaned up on drop.
#[derive(Debug)]
pub struct Prometheus {
    child: Child,
    dir: PathBuf,
    addr: SocketAddr,
}

impl Prometheus {
    /// Starts Prometheus scraping `ncpd`'s `/metrics` with bearer `token` every
    /// [`SCRAPE_INTERVAL`]. It is up once its query API answers; this does not wait for
    /// the first scrape (use [`Prometheus::wait_for`] on the series wanted).
    pub fn start(ncpd: SocketAddr, token: &str) -> Result<Prometheus> {
        let dir = unique_temp_dir()?;
        let io = |what: &str, e: std::io::Error| Error::Unknown(format!("prometheus {what}: {e}"));
        let token_file = dir.join("token");
        std::fs::write(&token_file, token).map_err(|e| io("token file", e))?;
        let config = dir.join("prometheus.yml");
        std::fs::write(&config, scrape_config(ncpd, &token_file)).map_err(|e| io("config", e))?;
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, free_loopback_port()?));
        let log = std::fs::File::create(dir.join("prometheus.log")).map_err(|e| io("log", e))?;
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|source| Error::Spawn {
                command: "prometheus".into(),
                source,
            });
        let child = match child {
            Ok(child) => child,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e);
            }
        };
        let mut prometheus = Prometheus { child, dir, addr };
        // Dropping `prometheus` on an early return stops it and removes its directory.
        let deadline = Instant::now() + Duration::from_secs(30);
        while prometheus.get("/-/ready").is_err() {
            if let Ok(Some(status)) = prometheus.child.try_wait() {
                return Err(Error::Unknown(format!(
                    "prometheus exited during start-up ({status}); its log: {}",
                    prometheus.log().trim()
                )));
            }
            if Instant::now() > deadline {
                return Err(Error::Timeout(format!(
                    "prometheus on {addr} not ready within 30 s"
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(prometheus)
    }

    /// Its HTTP address (loopback).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Where it keeps its configuration, log and storage.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// What it has logged (warnings and errors).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }

    /// An instant query through the HTTP API (`/api/v1/query`): the series of the answer.
    pub fn query(&self, promql: &str) -> Result<Vec<Sample>> {
        let body = self.get(&format!("/api/v1/query?query={}", url_encode(promql)))?;
        parse_vector(&body)
    }

    /// Polls `promql` until its answer satisfies `ok` (for at most `limit`); returns that
    /// answer and how long it took, or a timeout naming `what` and the last answer.
    pub fn wait_for(
        &self,
        promql: &str,
        what: &str,
        limit: Duration,
        ok: impl Fn(&[Sample]) -> bool,
    ) -> Result<(Vec<Sample>, Duration)> {
        let start = Instant::now();
        let mut last;
        loop {
            match self.query(promql) {
                Ok(samples) if ok(&samples) => return Ok((samples, start.elapsed())),
                Ok(samples) => last = format!("{samples:?}"),
                Err(e) => last = e.to_string(),
            }
            if start.elapsed() > limit {
                return Err(Error::Timeout(format!(
                    "{what}: `{promql}` in Prometheus after {limit:?} (last answer: {last})"
                )));
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// GET `path` on its HTTP API; the body of a 200 answer.
    fn get(&self, path: &str) -> Result<String> {
        let failed = |e: std::io::Error| Error::Unknown(format!("prometheus GET {path}: {e}"));
        let mut stream =
            TcpStream::connect_timeout(&self.addr, Duration::from_secs(2)).map_err(failed)?;
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .map_err(failed)?;
        // HTTP/1.0: the server closes the connection after its answer, so the answer is
        // everything read until then.
        write!(stream, "GET {path} HTTP/1.0\r\nHost: {}\r\n\r\n", self.addr).map_err(failed)?;
        let mut answer = Vec::new();
        stream
            .take(16 * 1024 * 1024)
            .read_to_end(&mut answer)
            .map_err(failed)?;
        let answer = String::from_utf8_lossy(&answer);
        let (head, body) = answer
            .split_once("\r\n\r\n")
            .ok_or_else(|| Error::Unknown(format!("prometheus GET {path}: no HTTP answer")))?;
        let status = head.lines().next().unwrap_or_default();
        if status.split_whitespace().nth(1) != Some("200") {
            return Err(Error::Unknown(format!(
                "prometheus GET {path}: {status}: {}",
                body.trim()
            )));
        }
        Ok(body.to_owned())
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The configuration: ncpd scraped every [`SCRAPE_INTERVAL`] with the token from a file.
fn scrape_config(ncpd: SocketAddr, token_file: &Path) -> String {
    let secs = SCRAPE_INTERVAL.as_secs().max(1);
    format!(
        "global:\n  scrape_interval: {secs}s\n  scrape_timeout: {secs}s\n\
         scrape_configs:\n  - job_name: {JOB}\n    metrics_path: /metrics\n    \
         authorization:\n      credentials_file: {}\n    \
         static_configs:\n      - targets: ['{ncpd}']\n",
        token_file.display()
    )
}

/// A fresh directory under the system's temporary directory.
fn unique_temp_dir() -> Result<PathBuf> {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let dir = std::env::temp_dir().join(format!("ncp-prometheus-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&dir)
        .map_err(|e| Error::Unknown(format!("creating {}: {e}", dir.display())))?;
    Ok(dir)
}

/// A loopback port nobody listens on right now.
fn free_loopback_port() -> Result<u16> {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| Error::Unknown(format!("finding a free loopback port: {e}")))
}

/// `text` as a URL query value: unreserved characters as they are, the rest as %XX.
fn url_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The series of an instant query's JSON answer (`resultType` "vector").
fn parse_vector(body: &str) -> Result<Vec<Sample>> {
    let bad = |why: &str| Error::Unknown(format!("prometheus query answer {why}: {body}"));
    let v: serde_json::Value = serde_json::from_str(body).map_err(|_| bad("is not JSON"))?;
    if v["status"] != "success" {
        return Err(bad("is not a success"));
    }
    let series = v["data"]["result"]
        .as_array()
        .ok_or_else(|| bad("has no result list"))?;
    series
        .iter()
        .map(|s| {
            let labels = s["metric"]
                .as_object()
                .ok_or_else(|| bad("has a series without labels"))?
                .iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                .collect();
            let value = s["value"][1]
                .as_str()
                .and_then(|v| v.parse::<f64>().ok())
                .ok_or_else(|| bad("has a series without a value"))?;
            Ok(Sample { labels, value })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_are_url_encoded() {
        assert_eq!(
            url_encode("ncp_replica_in_step{replica=\"198.18.2.3:6379\"}"),
            "ncp_replica_in_step%7Breplica%3D%22198.18.2.3%3A6379%22%7D"
        );
    }

    #[test]
    fn a_vector_answer_becomes_samples() {
        let body = r#"{"status":"success","data":{"resultType":"vector","result":[
            {"metric":{"__name__":"up","job":"ncpd"},"value":[1.5,"1"]},
            {"metric":{"replica":"a"},"value":[1.5,"0.25"]}]}}"#;
        let samples = parse_vector(body).unwrap();
        assert_eq!(samples.len(), 2);
        assert_eq!(samples[0].label("job"), "ncpd");
        assert_eq!(samples[0].value, 1.0);
        assert_eq!(samples[1].label("job"), "");
        assert_eq!(samples[1].value, 0.25);
    }

    #[test]
    fn errors_and_malformed_answers_are_refused() {
        for body in [
            r#"{"status":"error","error":"parse error"}"#,
            "not json",
            r#"{"status":"success","data":{"result":[{"metric":{},"value":[1,"x"]}]}}"#,
        ] {
            assert!(parse_vector(body).is_err(), "{body}");
        }
    }

    #[test]
    fn the_config_scrapes_ncpd_with_the_token_file() {
        let c = scrape_config("127.0.0.1:8653".parse().unwrap(), Path::new("/t/token"));
        assert!(c.contains("scrape_interval: 1s"), "{c}");
        assert!(c.contains("credentials_file: /t/token"), "{c}");
        assert!(c.contains("targets: ['127.0.0.1:8653']"), "{c}");
        assert!(c.contains("job_name: ncpd"), "{c}");
    }
}

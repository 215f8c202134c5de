//! `cargo xtask fuzz`: runs the coverage-guided fuzz targets in `fuzz/` (cargo-fuzz and
//! libFuzzer on the nightly toolchain) one after the other and reports, per target, the
//! executions, the coverage reached and the crashes found.
//!
//! Each target starts from the seeds committed in `fuzz/seeds/<target>` and grows its own
//! corpus in `fuzz/corpus/<target>` (not committed), so later runs continue where earlier
//! ones stopped. A crash leaves its reproducer in `fuzz/artifacts/<target>/` and fails the
//! task with that path.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context as _, bail};

use crate::cmd::{have, step};

/// The toolchain libFuzzer's instrumentation needs.
const TOOLCHAIN: &str = "+nightly";

/// Build flags, the same for the build and every run so the runs never rebuild.
/// No sanitizer: the targets are safe Rust, where AddressSanitizer finds nothing that
/// bounds checks miss, and it halves the executions per second. Debug assertions on, so
/// integer overflow is a crash like any other panic.
const BUILD_FLAGS: &[&str] = &["--sanitizer", "none", "--debug-assertions"];

/// libFuzzer options of every run: an input that takes 10 s is a hang, and a target that
/// allocates more than 1 GiB for inputs of a few KiB is a bug (the parsers' memory is meant
/// to be bounded).
const LIBFUZZER_FLAGS: &[&str] = &["-timeout=10", "-rss_limit_mb=2048", "-malloc_limit_mb=1024"];

/// What one target's run found.
#[derive(Debug, Default)]
struct Outcome {
    target: String,
    seconds: u64,
    executions: u64,
    coverage: u64,
    features: u64,
    corpus: u64,
    /// The reproducer libFuzzer wrote, when the target crashed (or hung, or ran out of
    /// memory).
    crash: Option<String>,
}

/// Runs `targets` (all of them when empty) for `seconds` each.
pub fn fuzz(targets: &[String], seconds: u64) -> anyhow::Result<()> {
    if !have("cargo-fuzz") {
        bail!("cargo-fuzz is missing: run `cargo xtask setup`");
    }
    let dir = fuzz_dir();
    let known = list_targets(&dir)?;
    let chosen: Vec<String> = if targets.is_empty() {
        known.clone()
    } else {
        for t in targets {
            if !known.contains(t) {
                bail!("no fuzz target `{t}`; there are: {}", known.join(", "));
            }
        }
        targets.to_vec()
    };
    step("building the fuzz targets (cargo fuzz build, nightly)");
    let mut build = cargo_fuzz(&dir, "build");
    build.args(BUILD_FLAGS);
    let status = build.status().context("starting cargo fuzz build")?;
    if !status.success() {
        bail!("cargo fuzz build failed ({status})");
    }
    let mut outcomes = Vec::new();
    for target in &chosen {
        step(&format!("fuzzing {target} for {seconds} s"));
        outcomes.push(run_target(&dir, target, seconds)?);
    }
    print_table(&outcomes);
    let crashed: Vec<String> = outcomes
        .iter()
        .filter_map(|o| {
            o.crash.as_ref().map(|path| {
                format!(
                    "{}: {path} (reproduce: cargo +nightly fuzz run {} {} {path})",
                    o.target,
                    BUILD_FLAGS.join(" "),
                    o.target
                )
            })
        })
        .collect();
    if !crashed.is_empty() {
        bail!(
            "{} target(s) crashed:\n  {}",
            crashed.len(),
            crashed.join("\n  ")
        );
    }
    Ok(())
}

/// `fuzz/` of this repository, wherever the task is started from.
fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap_or(Path::new("."))
        .join("fuzz")
}

/// `cargo +nightly fuzz <sub>` run from the repository root (where cargo-fuzz looks for
/// `fuzz/`).
fn cargo_fuzz(dir: &Path, sub: &str) -> Command {
    let mut cmd = Command::new("cargo");
    cmd.args([TOOLCHAIN, "fuzz", sub])
        .current_dir(dir.parent().unwrap_or(Path::new(".")))
        .stdin(Stdio::null());
    cmd
}

fn list_targets(dir: &Path) -> anyhow::Result<Vec<String>> {
    let out = cargo_fuzz(dir, "list")
        .output()
        .context("starting cargo fuzz list")?;
    if !out.status.success() {
        bail!(
            "cargo fuzz list failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect())
}

fn run_target(dir: &Path, target: &str, seconds: u64) -> anyhow::Result<Outcome> {
    let corpus = dir.join("corpus").join(target);
    let seeds = dir.join("seeds").join(target);
    std::fs::create_dir_all(&corpus).with_context(|| format!("creating {}", corpus.display()))?;
    if !seeds.is_dir() {
        bail!("{} is missing: every target has seeds", seeds.display());
    }
    let log_path = dir.join("artifacts").join(format!("{target}.log"));
    std::fs::create_dir_all(dir.join("artifacts").join(target))?;
    let log = std::fs::File::create(&log_path)
        .with_context(|| format!("creating {}", log_path.display()))?;
    let started = Instant::now();
    let max_time = format!("-max_total_time={seconds}");
    // libFuzzer writes new inputs to the first corpus directory only, so the committed
    // seeds stay as they are.
    let status = cargo_fuzz(dir, "run")
        .args(BUILD_FLAGS)
        .arg(target)
        .arg(&corpus)
        .arg(&seeds)
        .arg("--")
        .args(LIBFUZZER_FLAGS)
        .args([max_time.as_str(), "-print_final_stats=1"])
        .stdout(log.try_clone()?)
        .stderr(log)
        .status()
        .with_context(|| format!("starting cargo fuzz run {target}"))?;
    let text = std::fs::read_to_string(&log_path)?;
    let mut outcome = parse_log(&text);
    outcome.target = target.to_owned();
    outcome.seconds = started.elapsed().as_secs();
    if !status.success() && outcome.crash.is_none() {
        bail!(
            "cargo fuzz run {target} failed ({status}) without a reproducer; see {}",
            log_path.display()
        );
    }
    eprintln!(
        "    {} executions, cov {}, ft {}, corpus {}{}; log {}",
        outcome.executions,
        outcome.coverage,
        outcome.features,
        outcome.corpus,
        outcome
            .crash
            .as_deref()
            .map(|c| format!(", CRASH {c}"))
            .unwrap_or_default(),
        log_path.display()
    );
    Ok(outcome)
}

/// Reads libFuzzer's figures from its output: the last status line (`#N ... cov: C ft: F
/// corp: K/...`), the final stats, and the reproducer's path after a crash.
fn parse_log(text: &str) -> Outcome {
    let mut o = Outcome::default();
    for line in text.lines() {
        if line.starts_with('#') && line.contains(" cov: ") {
            let mut words = line.split_whitespace();
            while let Some(w) = words.next() {
                let value = || -> u64 {
                    words
                        .clone()
                        .next()
                        .and_then(|v| v.split('/').next())
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(0)
                };
                match w {
                    "cov:" => o.coverage = value(),
                    "ft:" => o.features = value(),
                    "corp:" => o.corpus = value(),
                    _ => {}
                }
            }
        } else if let Some(n) = line.strip_prefix("stat::number_of_executed_units:") {
            o.executions = n.trim().parse().unwrap_or(0);
        } else if let Some(rest) = line.split("Test unit written to ").nth(1) {
            o.crash = Some(rest.trim().to_owned());
        }
    }
    o
}

fn print_table(outcomes: &[Outcome]) {
    println!(
        "{:<18} {:>7} {:>12} {:>9} {:>7} {:>7} {:>7}  crash",
        "target", "seconds", "executions", "exec/s", "cov", "ft", "corpus"
    );
    for o in outcomes {
        println!(
            "{:<18} {:>7} {:>12} {:>9} {:>7} {:>7} {:>7}  {}",
            o.target,
            o.seconds,
            o.executions,
            o.executions / o.seconds.max(1),
            o.coverage,
            o.features,
            o.corpus,
            o.crash.as_deref().unwrap_or("-")
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_and_reproducer_are_read_from_libfuzzer_output() {
        let log = "\
INFO: seed corpus: files: 4 min: 20b max: 512b total: 900b rss: 30Mb
#4\tINITED cov: 120 ft: 130 corp: 4/900b exec/s: 0 rss: 31Mb
#65536\tpulse  cov: 410 ft: 1200 corp: 80/9Kb lim: 600 exec/s: 21845 rss: 60Mb
#91000\tDONE   cov: 415 ft: 1250 corp: 84/10Kb lim: 652 exec/s: 22750 rss: 61Mb
==1== ERROR: libFuzzer: deadly signal
artifact_prefix='fuzz/artifacts/t/'; Test unit written to fuzz/artifacts/t/crash-abc
stat::number_of_executed_units: 91012
stat::peak_rss_mb:              61
";
        let o = parse_log(log);
        assert_eq!(
            (o.executions, o.coverage, o.features, o.corpus),
            (91012, 415, 1250, 84)
        );
        assert_eq!(o.crash.as_deref(), Some("fuzz/artifacts/t/crash-abc"));
    }

    #[test]
    fn a_clean_run_has_no_reproducer() {
        let o = parse_log("#10\tDONE   cov: 5 ft: 6 corp: 1/1b exec/s: 10 rss: 1Mb\n");
        assert_eq!((o.coverage, o.crash), (5, None));
    }
}

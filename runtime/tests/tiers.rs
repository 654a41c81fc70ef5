//! `strata generate` with a disk KV tier: the same records as an all-in-memory run with both IO
//! engines; injected faults retried when transient and reported clearly when not, without losing
//! what OUT already holds; disk budgets checked against free space at start.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::{Value, json};

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("strata-tiers-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn input(dir: &Path) -> PathBuf {
    let path = dir.join("in.jsonl");
    let lines: Vec<String> = (0..6).map(|i| json!({"id": i, "input_ids": (0..(5 + 7 * i)).map(|t| (t * 13 + i) % 250).collect::<Vec<u32>>()}).to_string()).collect();
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    path
}

fn generate(dir: &Path, out: &str, extra: &[&str], env: &[(&str, &str)]) -> (Output, PathBuf) {
    let output = dir.join(out);
    let o = Command::new(env!("CARGO_BIN_EXE_strata"))
        .args([
            "generate",
            "--model",
            "synthetic:tiny-llama",
            "--max-new-tokens",
            "40",
            "--batch-size",
            "3",
            "--kv-block-tokens",
            "4",
            "--input",
        ])
        .arg(input(dir))
        .arg("--output")
        .arg(&output)
        .args(extra)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (o, output)
}

fn sorted_records(path: &Path) -> Vec<Value> {
    let mut r: Vec<Value> = std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    r.sort_by_key(|v| v["id"].as_u64());
    r
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn engines() -> Vec<&'static str> {
    match strata_storage::probe_io_uring() {
        Ok(()) => vec!["sync", "uring"],
        Err(e) => {
            eprintln!("io_uring runs skipped: io_uring is unavailable here ({e})");
            vec!["sync"]
        }
    }
}

#[test]
fn disk_tier_gives_the_same_records_with_both_engines() {
    let d = tmpdir("equiv");
    let (o, reference) = generate(&d, "host.jsonl", &[], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    for engine in engines() {
        let stats = d.join(format!("stats-{engine}.json"));
        let disk_dir = d.join(format!("kv-{engine}"));
        let (o, out) = generate(
            &d,
            &format!("disk-{engine}.jsonl"),
            &[
                "--host-mem",
                "48KiB",
                "--disk-dir",
                disk_dir.to_str().unwrap(),
                "--disk-mem",
                "8MiB",
                "--io-engine",
                engine,
                "--stats-json",
                stats.to_str().unwrap(),
            ],
            &[],
        );
        assert!(o.status.success(), "{engine}: {}", stderr(&o));
        assert_eq!(
            sorted_records(&out),
            sorted_records(&reference),
            "{engine}: records differ from the all-in-memory run"
        );
        let s: Value = serde_json::from_str(&std::fs::read_to_string(&stats).unwrap()).unwrap();
        let kv = &s["kv"];
        assert!(
            kv["spilled_blocks"].as_u64().unwrap() > 0,
            "{engine}: nothing spilled: {kv}"
        );
        assert!(
            kv["bytes_disk_to_host"].as_u64().unwrap() > 0,
            "{engine}: storage attention read nothing: {kv}"
        );
        assert!(
            kv["host_blocks_peak"].as_u64() <= kv["host_capacity_blocks"].as_u64(),
            "{kv}"
        );
        assert!(
            kv["disk_blocks_peak"].as_u64() <= kv["disk_capacity_blocks"].as_u64(),
            "{kv}"
        );
        let leftovers: Vec<_> = std::fs::read_dir(&disk_dir).unwrap().collect();
        assert!(
            leftovers.is_empty(),
            "{engine}: KV files left in --disk-dir after exit"
        );
    }
}

#[test]
fn transient_faults_are_retried_and_change_nothing() {
    let d = tmpdir("transient");
    let (o, reference) = generate(&d, "host.jsonl", &[], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    for engine in engines() {
        let disk_dir = d.join(format!("kv-{engine}"));
        let (o, out) = generate(
            &d,
            &format!("faulty-{engine}.jsonl"),
            &[
                "--host-mem",
                "48KiB",
                "--disk-dir",
                disk_dir.to_str().unwrap(),
                "--disk-mem",
                "8MiB",
                "--io-engine",
                engine,
            ],
            &[(
                "STRATA_FAULTS",
                "seed=5,short=0.2,latency_ms=1:0.05,eio=0.02,corrupt=0.02",
            )],
        );
        assert!(
            o.status.success(),
            "{engine}: transient faults must be retried: {}",
            stderr(&o)
        );
        assert_eq!(
            sorted_records(&out),
            sorted_records(&reference),
            "{engine}: a retried fault changed a token"
        );
    }
}

#[test]
fn permanent_faults_fail_clearly_and_keep_existing_output() {
    let d = tmpdir("permanent");
    for (spec, needle) in [
        ("seed=1,eio=1.0", "error"),
        ("seed=1,corrupt=1.0", "checksum"),
        ("seed=1,enospc=1.0", "space"),
    ] {
        let out = d.join("out.jsonl");
        let kept = "{\"id\":\"earlier\",\"output_ids\":[1],\"finish_reason\":\"length\"}\n";
        std::fs::write(&out, kept).unwrap();
        let disk_dir = d.join("kv");
        let (o, out) = generate(
            &d,
            "out.jsonl",
            &[
                "--resume",
                "--host-mem",
                "48KiB",
                "--disk-dir",
                disk_dir.to_str().unwrap(),
                "--disk-mem",
                "8MiB",
                "--io-engine",
                "sync",
            ],
            &[("STRATA_FAULTS", spec)],
        );
        assert_eq!(o.status.code(), Some(1), "{spec}: {}", stderr(&o));
        let err = stderr(&o).to_lowercase();
        assert!(
            err.contains(needle),
            "{spec}: error should mention {needle:?}: {err}"
        );
        assert!(
            std::fs::read_to_string(&out).unwrap().starts_with(kept),
            "{spec}: existing output lost"
        );
    }
}

#[test]
fn a_disk_budget_larger_than_the_free_space_is_refused_at_start() {
    let d = tmpdir("nospace");
    let (o, _) = generate(
        &d,
        "out.jsonl",
        &[
            "--disk-dir",
            d.join("kv").to_str().unwrap(),
            "--disk-mem",
            "900TiB",
        ],
        &[],
    );
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(
        err.contains("missing") && err.contains("--disk-mem"),
        "{err}"
    );
}

#[test]
fn a_full_disk_tier_is_a_clear_error_and_keeps_finished_lines() {
    let d = tmpdir("diskfull");
    let disk_dir = d.join("kv");
    let (o, out) = generate(
        &d,
        "out.jsonl",
        &[
            "--host-mem",
            "48KiB",
            "--disk-dir",
            disk_dir.to_str().unwrap(),
            "--disk-mem",
            "16KiB",
            "--io-engine",
            "sync",
        ],
        &[],
    );
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("--disk-mem"), "{}", stderr(&o));
    // Whatever finished before the tier filled is still in OUT, intact.
    for line in std::fs::read_to_string(&out).unwrap_or_default().lines() {
        serde_json::from_str::<Value>(line).unwrap();
    }
}

//! `generate --policy`: a policy from `strata plan --json` or from `auto` runs, and the run
//! reports the prediction beside what it measured; a policy with several GPU batches, fetched
//! KV and recompute runs and reports the bytes it fetched, stored and recomputed; a policy with
//! weights on disk gives the tokens of the all-in-memory run and reports the disk reads; a
//! policy the executor cannot run yet is refused with the field that needs the missing piece,
//! before any output is written.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

mod common;

use common::ScratchDir as Dir;

/// A scratch folder for test `tag` with three prompts in `in.jsonl`.
fn new_dir(tag: &str) -> Dir {
    let d = Dir::with_reference_profile("policy", tag);
    let lines: Vec<String> = (0..3)
        .map(|i| format!(r#"{{"id": {i}, "input_ids": [{}, 5, 9, 2, 7, 1]}}"#, 10 + i))
        .collect();
    std::fs::write(d.path("in.jsonl"), lines.join("\n") + "\n").unwrap();
    d
}

const MODEL: &str = "synthetic:tiny-llama";

fn strata(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_strata"))
        .args(args)
        .output()
        .unwrap()
}

fn generate(d: &Dir, policy: &Path, out: &str) -> Output {
    generate_with(d, policy, out, &[])
}

/// [`generate`] with `extra` flags after the common ones.
fn generate_with(d: &Dir, policy: &Path, out: &str, extra: &[&str]) -> Output {
    let (input, output) = (d.path("in.jsonl"), d.path(out));
    let (profile, stats) = (d.path("profile.json"), d.path(&format!("{out}.stats.json")));
    let mut args = vec![
        "generate",
        "--model",
        MODEL,
        "--device",
        "cpu",
        "--input",
        input.to_str().unwrap(),
        "--output",
        output.to_str().unwrap(),
        "--max-new-tokens",
        "4",
        "--ignore-eos",
        "--policy",
        policy.to_str().unwrap(),
        "--profile",
        profile.to_str().unwrap(),
        "--stats-json",
        stats.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    strata(&args)
}

/// `strata plan --json` for the job of `in.jsonl` on the reference profile.
fn plan_json(d: &Dir) -> Output {
    let plan = strata(&[
        "plan",
        "--model",
        MODEL,
        "--batch",
        "3",
        "--prompt-len",
        "6",
        "--gen-len",
        "4",
        "--json",
        "--profile",
        d.path("profile.json").to_str().unwrap(),
    ]);
    assert!(plan.status.success(), "{}", stderr(&plan));
    plan
}

/// The policy of [`plan_json`], to edit into the policy a test runs.
fn planned_policy(d: &Dir) -> Value {
    let mut plan: Value = serde_json::from_slice(&plan_json(d).stdout).unwrap();
    plan["policy"].take()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn a_planned_policy_runs_and_reports_prediction_beside_measurement() {
    let d = new_dir("plan");
    let plan = plan_json(&d);
    std::fs::write(d.path("plan.json"), &plan.stdout).unwrap();
    for (policy, out) in [
        (d.path("plan.json"), "a.jsonl"),
        (PathBuf::from("auto"), "b.jsonl"),
    ] {
        let run = generate(&d, &policy, out);
        assert!(run.status.success(), "{}", stderr(&run));
        assert!(
            stderr(&run).contains("policy check: decode step predicted"),
            "{}",
            stderr(&run)
        );
        let stats: Value = serde_json::from_str(
            &std::fs::read_to_string(d.path(&format!("{out}.stats.json"))).unwrap(),
        )
        .unwrap();
        let check = &stats["policy_check"];
        assert!(
            check["predicted_decode_step_s"].as_f64().unwrap() > 0.0,
            "{check}"
        );
        assert!(
            check["measured_decode_step_s"].as_f64().unwrap() > 0.0,
            "{check}"
        );
        // The calibrated lower bound: positive, at most the prediction, and the ratio to it.
        let floor = check["decode_step_lower_bound_s"].as_f64().unwrap();
        let predicted = check["predicted_decode_step_s"].as_f64().unwrap();
        assert!(floor > 0.0 && floor <= predicted, "{check}");
        let over = check["decode_step_over_lower_bound"].as_f64().unwrap();
        let measured = check["measured_decode_step_s"].as_f64().unwrap();
        assert!((over - measured / floor).abs() <= 1e-9 * over, "{check}");
        assert!(stderr(&run).contains("the calibrated lower bound of"));
        // The breakdown per stream: every stream the model times but the shared host memory,
        // GPU compute predicted and untimed, host attention timed on the CPU, the copies not.
        let streams = check["streams"].as_array().unwrap();
        let names: Vec<&str> = streams
            .iter()
            .map(|s| s["stream"].as_str().unwrap())
            .collect();
        assert_eq!(
            names,
            [
                "gpu compute",
                "host→device",
                "device→host",
                "host compute",
                "host attention",
                "host MLP share",
                "disk read",
                "disk write"
            ],
            "{check}"
        );
        assert!(streams[0]["predicted_s"].as_f64().unwrap() > 0.0);
        assert!(streams[0]["measured_s"].is_null());
        assert!(streams[1]["measured_s"].is_null(), "no GPU: {}", streams[1]);
        assert!(streams[3]["measured_s"].as_f64().is_some());
        // Host compute's parts add up to it, predicted and measured.
        for key in ["predicted_s", "measured_s"] {
            let whole = streams[3][key].as_f64().unwrap();
            let parts = streams[4][key].as_f64().unwrap() + streams[5][key].as_f64().unwrap();
            assert!((whole - parts).abs() <= 1e-9 * whole.max(1e-9), "{check}");
        }
        // A step more than 20% off its prediction says where it missed (in the stats and on
        // stderr); one within 20% says nothing.
        let ratio = check["decode_step_ratio"].as_f64().unwrap();
        let missed = !(0.8..=1.2).contains(&ratio);
        assert_eq!(check["miss"].is_string(), missed, "{check}");
        assert_eq!(stderr(&run).contains("where it missed:"), missed);
        assert!(
            stderr(&run).contains("per stream over the job, predicted / measured"),
            "{}",
            stderr(&run)
        );
        assert_eq!(
            stats["kv_block_tokens"].as_u64(),
            check["policy"]["kv_block_tokens"].as_u64()
        );
        let records = std::fs::read_to_string(d.path(out)).unwrap();
        assert_eq!(records.lines().count(), 3);
    }
}

#[test]
fn a_policy_with_several_gpu_batches_runs() {
    let d = new_dir("gpu-batches");
    let mut policy = planned_policy(&d);
    let p = &mut policy;
    p["weights"] = serde_json::json!({"gpu": 1.0, "host": 0.0, "disk": 0.0});
    p["num_gpu_batches"] = serde_json::json!(3);
    p["gpu_batch_size"] = serde_json::json!(1);
    std::fs::write(
        d.path("blocks.json"),
        serde_json::to_string(&policy).unwrap(),
    )
    .unwrap();
    let run = generate(&d, &d.path("blocks.json"), "g.jsonl");
    assert!(run.status.success(), "{}", stderr(&run));
    let records = std::fs::read_to_string(d.path("g.jsonl")).unwrap();
    assert_eq!(records.lines().count(), 3);
}

#[test]
fn a_policy_that_fetches_and_recomputes_runs_and_reports_the_bytes() {
    let d = new_dir("fetch-recompute");
    let mut policy = planned_policy(&d);
    let p = &mut policy;
    p["weights"] = serde_json::json!({"gpu": 1.0, "host": 0.0, "disk": 0.0});
    p["kv"]["cold"] = serde_json::json!({"gpu": 0.0, "host": 1.0, "disk": 0.0});
    p["attention_host"] = serde_json::json!({"kind": "fetch_to_gpu"});
    p["recompute"] = serde_json::json!({"gpu": 0.5, "host": 0.5, "disk": 0.5});
    p["kv_block_tokens"] = serde_json::json!(2);
    p["num_gpu_batches"] = serde_json::json!(3);
    p["gpu_batch_size"] = serde_json::json!(1);
    std::fs::write(d.path("far.json"), serde_json::to_string(p).unwrap()).unwrap();
    let run = generate(&d, &d.path("far.json"), "f.jsonl");
    assert!(run.status.success(), "{}", stderr(&run));
    let stats: Value =
        serde_json::from_str(&std::fs::read_to_string(d.path("f.jsonl.stats.json")).unwrap())
            .unwrap();
    let kv = &stats["kv"];
    for field in [
        "fetched_blocks",
        "hidden_blocks_stored",
        "bytes_hidden_stored",
        "recomputed_tokens",
        "bytes_kv_recomputed",
    ] {
        assert!(kv[field].as_u64().unwrap() > 0, "{field}: {kv}");
    }
    assert_eq!(
        std::fs::read_to_string(d.path("f.jsonl"))
            .unwrap()
            .lines()
            .count(),
        3
    );
}

#[test]
fn a_policy_the_executor_cannot_run_is_refused_naming_the_field() {
    let d = new_dir("refuse");
    let mut policy = planned_policy(&d);
    let p = &mut policy;
    // Each block decides at fill time whether it keeps hidden states, before it knows its tier.
    p["kv"]["cold"] = serde_json::json!({"gpu": 0.0, "host": 0.5, "disk": 0.5});
    p["recompute"] = serde_json::json!({"gpu": 0.0, "host": 0.5, "disk": 0.0});
    std::fs::write(d.path("bad.json"), serde_json::to_string(&policy).unwrap()).unwrap();
    let run = generate(&d, &d.path("bad.json"), "c.jsonl");
    assert!(!run.status.success());
    assert!(
        stderr(&run).contains("recompute.host = 0.5"),
        "{}",
        stderr(&run)
    );
    assert!(
        !d.path("c.jsonl").exists(),
        "nothing is written for a refused policy"
    );

    std::fs::write(d.path("junk.json"), "{\"weights\": 1}").unwrap();
    let run = generate(&d, &d.path("junk.json"), "d.jsonl");
    assert!(!run.status.success());
    assert!(stderr(&run).contains("not a policy"), "{}", stderr(&run));
}

fn output_ids(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap()["output_ids"].clone())
        .collect()
}

#[test]
fn a_policy_with_weights_on_disk_gives_the_in_memory_tokens() {
    let d = new_dir("disk-weights");
    let mut policy = planned_policy(&d);
    let p = &mut policy;
    p["weights"] = serde_json::json!({"gpu": 1.0, "host": 0.0, "disk": 0.0});
    std::fs::write(d.path("mem.json"), serde_json::to_string(p).unwrap()).unwrap();
    p["weights"] = serde_json::json!({"gpu": 0.0, "host": 0.5, "disk": 0.5});
    std::fs::write(d.path("disk.json"), serde_json::to_string(p).unwrap()).unwrap();
    let run = generate(&d, &d.path("mem.json"), "mem.jsonl");
    assert!(run.status.success(), "{}", stderr(&run));

    // Without a disk directory: refused before anything is loaded or written.
    let run = generate(&d, &d.path("disk.json"), "none.jsonl");
    assert!(!run.status.success());
    assert!(stderr(&run).contains("--disk-dir"), "{}", stderr(&run));
    assert!(!d.path("none.jsonl").exists());

    let disk_dir = d.path("disk");
    let dir = disk_dir.to_str().unwrap();
    // Too little --disk-mem for the layers: refused before anything is written.
    let small = generate_with(
        &d,
        &d.path("disk.json"),
        "small.jsonl",
        &["--disk-dir", dir, "--disk-mem", "1MiB"],
    );
    assert!(!small.status.success());
    assert!(stderr(&small).contains("--disk-mem"), "{}", stderr(&small));
    assert!(!d.path("small.jsonl").exists());
    assert!(!disk_dir.join("weights").exists());
    let run = generate_with(
        &d,
        &d.path("disk.json"),
        "disk.jsonl",
        &["--disk-dir", dir, "--disk-mem", "256MiB"],
    );
    assert!(run.status.success(), "{}", stderr(&run));
    assert!(
        stderr(&run).contains("read back for every forward pass"),
        "the run says where the weights go: {}",
        stderr(&run)
    );
    assert_eq!(
        output_ids(&d.path("disk.jsonl")),
        output_ids(&d.path("mem.jsonl"))
    );
    let stats: Value =
        serde_json::from_str(&std::fs::read_to_string(d.path("disk.jsonl.stats.json")).unwrap())
            .unwrap();
    let w = &stats["disk_weights"];
    assert!(w["layer_reads"].as_u64().unwrap() > 0, "{w}");
    assert!(w["bytes_read"].as_u64().unwrap() > 0, "{w}");
    assert!(w["read_seconds"].as_f64().unwrap() > 0.0, "{w}");
    // The planner predicted disk reads for the weights, and the run timed them.
    let disk = stats["policy_check"]["streams"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["stream"] == "disk read")
        .unwrap()
        .clone();
    assert!(disk["predicted_s"].as_f64().unwrap() > 0.0, "{disk}");
    assert!(disk["measured_s"].as_f64().unwrap() > 0.0, "{disk}");
    // The store's files went with the run.
    let left: Vec<_> = std::fs::read_dir(&disk_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(left.iter().all(|p| !p.ends_with("weights")), "{left:?}");
}

/// A policy that puts most older KV on disk gets it there even when `--host-mem` could hold it
/// all (the budget also holds the policy's host weights): the host tier holds the policy's host
/// share, the rest spills to disk, and the tokens are those of the all-in-memory run.
#[test]
fn a_policy_with_kv_on_disk_puts_it_there_whatever_host_memory_is_left() {
    let d = new_dir("disk-kv");
    let mut policy = planned_policy(&d);
    let p = &mut policy;
    p["weights"] = serde_json::json!({"gpu": 1.0, "host": 0.0, "disk": 0.0});
    p["kv"]["hot_window_tokens"] = serde_json::json!(0);
    p["kv"]["hot_tier"] = serde_json::json!("host");
    p["kv"]["cold"] = serde_json::json!({"gpu": 0.0, "host": 1.0, "disk": 0.0});
    p["attention_host"] = serde_json::json!({"kind": "attend_near"});
    p["attention_disk"] = serde_json::json!({"kind": "attend_near"});
    p["recompute"] = serde_json::json!({"gpu": 0.0, "host": 0.0, "disk": 0.0});
    p["kv_block_tokens"] = serde_json::json!(2);
    std::fs::write(d.path("host.json"), serde_json::to_string(p).unwrap()).unwrap();
    p["kv"]["cold"] = serde_json::json!({"gpu": 0.0, "host": 0.2, "disk": 0.8});
    std::fs::write(d.path("disk.json"), serde_json::to_string(p).unwrap()).unwrap();

    let dir = d.path("disk");
    let dir = dir.to_str().unwrap();
    let flags = [
        "--host-mem",
        "1GiB",
        "--disk-dir",
        dir,
        "--disk-mem",
        "64MiB",
    ];
    let run = generate_with(&d, &d.path("host.json"), "host.jsonl", &flags);
    assert!(run.status.success(), "{}", stderr(&run));
    let run = generate_with(&d, &d.path("disk.json"), "disk.jsonl", &flags);
    assert!(run.status.success(), "{}", stderr(&run));
    assert!(stderr(&run).contains("host KV tier"), "{}", stderr(&run));
    assert_eq!(
        output_ids(&d.path("disk.jsonl")),
        output_ids(&d.path("host.jsonl"))
    );
    let kv = |out: &str| {
        let stats: Value = serde_json::from_str(
            &std::fs::read_to_string(d.path(&format!("{out}.stats.json"))).unwrap(),
        )
        .unwrap();
        stats["kv"].clone()
    };
    // All on the host: nothing spills out of 1 GiB.
    assert_eq!(
        kv("host.jsonl")["spilled_blocks"],
        0,
        "{}",
        kv("host.jsonl")
    );
    // 10 tokens per sequence at the end, 5 blocks of 2: the host share (2 tokens) is one block,
    // raised to the tier's floor of two per sequence and layer; the rest went to disk.
    let disk = kv("disk.jsonl");
    let layers = 2; // synthetic:tiny-llama
    assert_eq!(
        disk["host_capacity_blocks"].as_u64().unwrap(),
        2 * 3 * layers,
        "{disk}"
    );
    assert!(
        disk["spilled_blocks"].as_u64().unwrap() >= 3 * layers,
        "{disk}"
    );
}

//! `strata bench` on the CPU: a tiny end-to-end run of every policy (same tokens under every
//! policy that runs, report files written, a dated RESULTS.md entry), the report's JSON schema,
//! the targets judged on what was measured, a well-formed SVG, FlexGen's flags placing what they
//! say, and bad input refused naming the flag.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

mod common;

use common::ScratchDir as Dir;

/// A scratch folder for test `tag` with a `bench` folder in it.
fn new_dir(tag: &str) -> Dir {
    let d = Dir::with_reference_profile("bench-test", tag);
    std::fs::create_dir_all(d.path("bench")).unwrap();
    d
}

/// `strata bench` on a tiny model in `d`; `extra` flags replace the defaults of the same name.
fn bench(d: &Dir, extra: &[&str]) -> Output {
    bench_command(d, extra).output().unwrap()
}

/// The command [`bench`] runs, not started.
fn bench_command(d: &Dir, extra: &[&str]) -> Command {
    let defaults = [
        ("--model", "synthetic:tiny-llama"),
        ("--prompt-len", "12"),
        ("--gen-len", "4"),
        ("--batch", "3"),
        ("--device", "cpu"),
        ("--profile", "profile.json"),
    ];
    let mut args = vec!["bench"];
    for (flag, value) in defaults {
        if !extra.contains(&flag) {
            args.extend([flag, value]);
        }
    }
    args.extend_from_slice(extra);
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_strata"));
    cmd.current_dir(&d.0).args(&args);
    cmd
}

/// The JSON report `name` a bench wrote in `d`.
fn report(d: &Dir, name: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(d.path(name)).unwrap()).unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn is_num(v: &Value) -> bool {
    v.is_number()
}

/// Field names and JSON types of the report (`strata-bench/2`).
fn check_schema(r: &Value) {
    assert_eq!(r["schema"], "strata-bench/2");
    for k in ["date", "command"] {
        assert!(r[k].is_string(), "{k}");
    }
    // The GEMM mode every run used and the planner predicted (the default: generate's).
    assert!(["split", "rounded"].contains(&r["gpu_gemm"].as_str().unwrap_or("")));
    for k in ["cpu", "device"] {
        assert!(r["machine"][k].is_string(), "machine.{k}");
    }
    assert!(r["machine"]["cpu_cores"].is_u64());
    assert!(r["machine"]["memory_bytes"].is_u64());
    assert!(r["machine"].get("gpu").is_some());
    assert!(r["profile"]["machine"].is_string());
    assert!(r["profile"]["reference"].is_boolean());
    for k in ["gpu_bytes", "host_bytes", "disk_bytes"] {
        assert!(r["budgets"][k].is_u64(), "budgets.{k}");
    }
    assert!(
        r["policies"]
            .as_array()
            .unwrap()
            .iter()
            .all(Value::is_string)
    );
    assert!(r["exact"].is_boolean() || r["exact"].is_null());
    let configs = r["configs"].as_array().unwrap();
    assert!(!configs.is_empty());
    for c in configs {
        for k in [
            "prompt_len",
            "gen_len",
            "batch",
            "context",
            "kv_bytes",
            "weight_bytes",
        ] {
            assert!(c[k].is_u64(), "config.{k}");
        }
        assert!(c["model"].is_string());
        assert!(c["mismatches"].is_array());
        assert!(c["divergences"].is_array());
        for t in c["targets"].as_array().unwrap() {
            check_target(t);
        }
        for run in c["runs"].as_array().unwrap() {
            assert!(run["policy"].is_string());
            let status = run["status"].as_str().unwrap();
            assert!(
                [
                    "ok",
                    "not_runnable",
                    "does_not_fit",
                    "failed",
                    "timed_out",
                    "not_run"
                ]
                .contains(&status),
                "{status}"
            );
            assert!(run["source"].is_string());
            assert!(run["ratios"].is_object());
            assert!(run["notes"].is_array());
            if status != "ok" {
                assert!(run["reason"].is_string(), "{run}");
                assert!(run["measured"].is_null());
            }
            if let Some(p) = run["predicted"].as_object() {
                for k in [
                    "prefill_s",
                    "decode_step_s",
                    "total_s",
                    "prefill_tokens_per_s",
                    "decode_tokens_per_s",
                    "end_to_end_tokens_per_s",
                ] {
                    assert!(is_num(&p[k]), "predicted.{k}");
                }
                assert!(p["bound_by"].is_string());
                for k in [
                    "gpu_compute_s",
                    "h2d_s",
                    "d2h_s",
                    "host_attention_s",
                    "disk_read_s",
                    "disk_write_s",
                    "host_memory_s",
                ] {
                    assert!(is_num(&p["streams"][k]), "predicted.streams.{k}");
                }
                for k in ["gpu", "host", "disk"] {
                    assert!(p["memory_bytes"][k].is_u64(), "predicted.memory_bytes.{k}");
                }
            }
            if let Some(m) = run["measured"].as_object() {
                for k in [
                    "prefill_s",
                    "decode_s",
                    "decode_step_s",
                    "gemm_tuning_s",
                    "prefill_tokens_per_s",
                    "decode_tokens_per_s",
                    "end_to_end_tokens_per_s",
                ] {
                    assert!(is_num(&m[k]), "measured.{k}");
                }
                for k in ["prompt_tokens", "generated_tokens"] {
                    assert!(m[k].is_u64(), "measured.{k}");
                }
                for k in [
                    "h2d_bytes",
                    "d2h_bytes",
                    "weights_h2d_bytes",
                    "kv_gpu_to_host_bytes",
                    "kv_host_to_disk_bytes",
                    "kv_disk_to_host_bytes",
                    "weights_disk_to_host_bytes",
                ] {
                    assert!(m["links"][k].is_u64(), "measured.links.{k}");
                }
                for k in [
                    "h2d_s",
                    "d2h_s",
                    "host_attention_s",
                    "storage_attention_s",
                    "disk_write_s",
                    "weights_disk_wait_s",
                ] {
                    assert!(is_num(&m["streams"][k]), "measured.streams.{k}");
                }
                for k in ["gpu_kv", "host_kv", "disk_kv", "host_rss"] {
                    assert!(m["peak"][k].is_u64(), "measured.peak.{k}");
                }
                let t = &run["measured_over_predicted"];
                for k in ["prefill", "decode_step", "total"] {
                    assert!(is_num(&t[k]), "measured_over_predicted.{k}");
                }
                assert!(
                    run["generate_command"]
                        .as_str()
                        .unwrap()
                        .contains("generate")
                );
            }
        }
    }
}

/// One entry of a configuration's `targets`: a ratio when measured, a reason when not, and the
/// bounding streams unless met.
fn check_target(t: &Value) {
    let id = t["id"].as_str().unwrap();
    assert!(
        ["3x-flexgen", "1.5x-flexgen-opt-30b", "0.95x-best-baseline"].contains(&id),
        "{id}"
    );
    for k in ["name", "rule", "applies_because", "baseline"] {
        assert!(t[k].is_string(), "target.{k}: {t}");
    }
    assert!(is_num(&t["required_ratio"]));
    assert!(is_num(&t["predicted_ratio"]) || t["predicted_ratio"].is_null());
    let outcome = t["outcome"].as_str().unwrap();
    assert!(
        ["met", "missed", "not_measured"].contains(&outcome),
        "{outcome}"
    );
    if outcome == "not_measured" {
        assert!(t["measured_ratio"].is_null(), "{t}");
        assert!(t["not_measured_because"].is_string(), "{t}");
    } else {
        assert!(is_num(&t["measured_ratio"]), "{t}");
        assert!(t["not_measured_because"].is_null(), "{t}");
    }
    if outcome == "met" {
        assert!(t["bound"].is_null(), "{t}");
    } else {
        let b = &t["bound"];
        assert!(b["predicted_bound_by"].is_string(), "{t}");
        assert!(is_num(&b["predicted_streams"]["disk_read_s"]), "{t}");
        assert!(b.get("measured_streams").is_some(), "{t}");
    }
}

/// A minimal XML well-formedness check: tags nest and close, attributes are quoted, text holds
/// no bare `<` or `&`.
fn check_well_formed_svg(svg: &str) {
    let svg = svg.trim();
    assert!(svg.starts_with("<svg"), "{svg:.80}");
    let mut stack: Vec<String> = Vec::new();
    let mut rest = svg;
    while let Some(open) = rest.find('<') {
        let text = &rest[..open];
        assert!(!text.contains('>'), "stray '>' in text: {text}");
        for (i, _) in text.match_indices('&') {
            let ent = &text[i..];
            assert!(
                ["&amp;", "&lt;", "&gt;", "&quot;"]
                    .iter()
                    .any(|e| ent.starts_with(e)),
                "bare & in text: {text}"
            );
        }
        let close = rest[open..].find('>').expect("unclosed tag") + open;
        let tag = &rest[open + 1..close];
        assert_eq!(tag.matches('"').count() % 2, 0, "unbalanced quotes: {tag}");
        if let Some(name) = tag.strip_prefix('/') {
            assert_eq!(
                stack.pop().as_deref(),
                Some(name.trim()),
                "mismatched </{name}>"
            );
        } else if !tag.ends_with('/') {
            let name = tag.split_whitespace().next().unwrap();
            stack.push(name.to_string());
        }
        rest = &rest[close + 1..];
        if stack.is_empty() {
            assert!(rest.trim().is_empty(), "content after the root element");
        }
    }
    assert!(stack.is_empty(), "unclosed elements: {stack:?}");
}

fn run_of<'a>(r: &'a Value, policy: &str) -> &'a Value {
    r["configs"][0]["runs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["policy"] == policy)
        .unwrap()
}

#[test]
fn a_tiny_bench_runs_every_policy_with_the_same_tokens_and_writes_its_reports() {
    let d = new_dir("e2e");
    let out = bench(
        &d,
        &[
            "--policies",
            "strata,flexgen,layerwise,gpu-only",
            "--json",
            "report.json",
            "--plot",
            "plot.svg",
            "--append-results",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("| policy | status | prefill tok/s"),
        "{stdout}"
    );
    assert!(stdout.contains("exactness: the same tokens"), "{stdout}");

    let r = report(&d, "report.json");
    check_schema(&r);
    let c = &r["configs"][0];
    assert_eq!(
        (c["batch"].as_u64(), c["context"].as_u64()),
        (Some(3), Some(16))
    );
    // The planner's policy and the GPU-only one run on today's executor; every row that ran
    // generated all its tokens, and every row that did not says why.
    for p in ["strata", "gpu-only"] {
        assert_eq!(run_of(&r, p)["status"], "ok", "{p}: {}", run_of(&r, p));
    }
    let mut ran = 0;
    for run in c["runs"].as_array().unwrap() {
        if run["status"] == "ok" {
            ran += 1;
            assert_eq!(run["measured"]["generated_tokens"], 12, "{run}");
            assert!(run["measured"]["end_to_end_tokens_per_s"].as_f64().unwrap() > 0.0);
            // Ratios against every other policy that ran.
            assert_eq!(run["ratios"].as_object().unwrap().len(), ran_count(c) - 1);
        } else {
            assert!(!run["reason"].as_str().unwrap().is_empty(), "{run}");
        }
    }
    assert!(ran >= 2);
    assert_eq!(c["exact"], true, "{c}");
    assert_eq!(r["exact"], true);
    let s = run_of(&r, "strata")["ratios"]["gpu-only"].as_f64().unwrap();
    let g = run_of(&r, "gpu-only")["ratios"]["strata"].as_f64().unwrap();
    assert!((s * g - 1.0).abs() < 1e-9, "ratios are reciprocal: {s} {g}");
    // FlexGen's row carries its policy in FlexGen's terms.
    let fg = run_of(&r, "flexgen");
    assert!(fg["flexgen_flags"].as_str().unwrap().contains("--percent"));
    // tiny-llama's KV: 2 layers × K and V × 2 KV heads × head dim 16 × 4 bytes (f32) = 512 bytes
    // a token (as `strata info` says), for 3 sequences of 16 tokens.
    assert_eq!(c["kv_bytes"], 3 * 16 * 512, "{c}");
    assert!(c["weight_bytes"].as_u64().is_some_and(|w| w > 0), "{c}");

    // 16 tokens of a tiny model: only the best-baseline target applies, judged against the
    // fastest other policy that finished, on the same ratio as the table's.
    let targets = c["targets"].as_array().unwrap();
    assert_eq!(targets.len(), 1, "{c}");
    let t = &targets[0];
    assert_eq!(t["id"], "0.95x-best-baseline");
    assert_eq!(t["required_ratio"], 0.95);
    let fastest = c["runs"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|x| x["policy"] != "strata" && x["status"] == "ok")
        .max_by(|a, b| {
            let tps = |x: &Value| x["measured"]["end_to_end_tokens_per_s"].as_f64().unwrap();
            tps(a).total_cmp(&tps(b))
        })
        .unwrap();
    assert_eq!(t["baseline"], fastest["policy"], "{t}");
    let baseline = fastest["policy"].as_str().unwrap();
    let ratio = t["measured_ratio"].as_f64().unwrap();
    let table = run_of(&r, "strata")["ratios"][baseline].as_f64().unwrap();
    assert!((ratio - table).abs() < 1e-9, "{ratio} vs {table}");
    let met = ratio >= 0.95;
    assert_eq!(t["outcome"], if met { "met" } else { "missed" }, "{t}");
    let line = format!(
        "- target ≥ 0.95× best baseline (strata compared with {}",
        c["runs"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|x| {
                let s = &x["status"];
                x["policy"] != "strata" && s != "not_runnable" && s != "does_not_fit"
            })
            .map(|x| x["policy"].as_str().unwrap())
            .collect::<Vec<_>>()
            .join(", ")
    );
    assert!(stdout.contains(&line), "{line}\n{stdout}");
    let summary = format!(
        "**Targets**: {} met, {} missed, 0 not measured",
        u8::from(met),
        u8::from(!met)
    );
    assert!(stdout.contains(&summary), "{summary}\n{stdout}");

    let svg = std::fs::read_to_string(d.path("plot.svg")).unwrap();
    check_well_formed_svg(&svg);
    assert!(svg.contains("strata") && svg.contains("gpu-only") && svg.contains("<polyline"));

    let results = std::fs::read_to_string(d.path("bench/RESULTS.md")).unwrap();
    assert!(results.contains(": strata bench"), "{results}");
    assert!(results.contains("- **Machine**:"));
    assert!(
        results.contains("- **GEMMs**: `--gpu-gemm split`"),
        "{results}"
    );
    assert!(
        results.contains("--append-results"),
        "the command is recorded"
    );
    assert!(results.contains("| strata | ok |"));
    assert!(
        results.contains(&summary) && results.contains(&line),
        "{results}"
    );
}

/// Checks that a one-configuration bench with `--resume` succeeded and carried over `n` of its
/// configuration; returns its output.
fn carried(o: &Output, n: usize) -> String {
    let out = text(o);
    assert!(o.status.success(), "{out}");
    assert!(
        out.contains(&format!("{n} of 1 configuration(s) carried over")),
        "{out}"
    );
    out
}

fn ran_count(c: &Value) -> usize {
    c["runs"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["status"] == "ok")
        .count()
}

#[test]
fn flexgen_flags_place_what_they_say_and_unrunnable_policies_say_why() {
    let d = new_dir("flags");
    let out = bench(
        &d,
        &[
            "--policies",
            "flexgen",
            "--percent",
            "25",
            "75",
            "0",
            "100",
            "0",
            "100",
            "--gpu-batch-size",
            "1",
            "--num-gpu-batches",
            "3",
            "--cpu-cache-compute",
            "--dry-run",
            "--json",
            "report.json",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    let r = report(&d, "report.json");
    check_schema(&r);
    let fg = run_of(&r, "flexgen");
    let p = &fg["plan"];
    assert_eq!(p["weights"]["gpu"], 0.25);
    assert_eq!(p["weights"]["host"], 0.75);
    assert_eq!(p["weights"]["disk"], 0.0);
    assert_eq!(p["kv"]["cold"]["host"], 1.0);
    assert_eq!(p["kv"]["hot_window_tokens"], 0);
    assert_eq!(p["attention_host"]["kind"], "attend_near");
    assert_eq!(
        (p["gpu_batch_size"].as_u64(), p["num_gpu_batches"].as_u64()),
        (Some(1), Some(3))
    );
    assert_eq!(fg["flexgen"]["w_gpu_percent"], 25.0);
    assert_eq!(fg["source"], "FlexGen's flags as given");
    // Either the executor refuses it naming the field, or (once it runs the block schedule)
    // the dry run plans it without running it.
    let status = fg["status"].as_str().unwrap();
    assert!(status == "not_runnable" || status == "not_run", "{fg}");
    assert!(fg["measured"].is_null());
    // No strata row: no target applies.
    assert_eq!(r["configs"][0]["targets"], Value::Array(Vec::new()));
    assert!(String::from_utf8_lossy(&out.stdout).contains("**Targets**: none applies here"));
}

#[test]
fn bad_input_is_refused_naming_the_flag() {
    let d = new_dir("bad");
    let cases: &[(&[&str], &str)] = &[
        (&["--policies", "strata,vllm"], "--policies"),
        (
            &["--percent", "60", "50", "100", "0", "100", "0"],
            "--percent",
        ),
        (
            &[
                "--percent",
                "100",
                "0",
                "100",
                "0",
                "100",
                "0",
                "--gpu-batch-size",
                "2",
            ],
            "--gpu-batch-size",
        ),
        (&["--preset", "nope"], "--preset"),
        (&["--prompt-len", "4000"], "--prompt-len"),
    ];
    for (extra, flag) in cases {
        let out = bench(&d, extra);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "{extra:?} should fail: {}",
            text(&out)
        );
        assert!(
            err.contains(flag),
            "{extra:?}: error should name {flag}: {err}"
        );
    }
    // Without a preset the workload must be given.
    let out = Command::new(env!("CARGO_BIN_EXE_strata"))
        .current_dir(&d.0)
        .args([
            "bench",
            "--model",
            "synthetic:tiny-llama",
            "--device",
            "cpu",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--prompt-len is required"));
    assert!(!Path::new(&d.path("bench/RESULTS.md")).exists());
}

/// `--run-timeout` stops a run that outlasts it: each row says `timed out` and why, the bench
/// goes on to the next and writes its reports; a limit that is not a positive number is refused
/// naming the flag.
#[test]
fn runs_past_the_run_timeout_are_stopped_and_reported() {
    let d = new_dir("timeout");
    let out = bench(
        &d,
        &[
            "--policies",
            "strata,gpu-only",
            "--run-timeout",
            "0.001",
            "--json",
            "report.json",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("| strata | timed out |"),
        "{}",
        text(&out)
    );
    let r = report(&d, "report.json");
    check_schema(&r);
    for p in ["strata", "gpu-only"] {
        let run = run_of(&r, p);
        assert_eq!(run["status"], "timed_out", "{run}");
        assert!(run["reason"].as_str().unwrap().contains("--run-timeout"));
        assert!(run["measured"].is_null());
    }
    // The best-baseline target still applies, not measured, saying why.
    let t = &r["configs"][0]["targets"][0];
    assert_eq!(t["outcome"], "not_measured", "{t}");
    assert_eq!(
        t["not_measured_because"],
        "strata timed out and gpu-only timed out"
    );
    assert!(t["bound"]["predicted_bound_by"].is_string(), "{t}");
    for bad in ["0", "-1", "soon"] {
        let out = bench(&d, &[&format!("--run-timeout={bad}")]);
        assert!(!out.status.success());
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("--run-timeout"),
            "{}",
            text(&out)
        );
    }
}

/// The JSON report is written after every run, the runs not reached yet marked `not run`: the
/// first version to appear has the first run done and the others still to come, and every
/// version parses (each is written whole).
#[test]
fn the_json_report_is_written_after_every_run() {
    let d = new_dir("partial");
    let mut child = bench_command(
        &d,
        &[
            "--policies",
            "strata,layerwise,gpu-only",
            "--json",
            "report.json",
        ],
    )
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::null())
    .spawn()
    .unwrap();
    let path = d.path("report.json");
    let first = loop {
        if let Ok(text) = std::fs::read_to_string(&path) {
            break text;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("bench ended ({status}) before any report was written");
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    };
    let status = child.wait().unwrap();
    assert!(status.success());
    let r: Value = serde_json::from_str(&first).unwrap();
    check_schema(&r);
    let runs = r["configs"][0]["runs"].as_array().unwrap();
    let ok = runs.iter().filter(|x| x["status"] == "ok").count();
    let pending: Vec<&Value> = runs.iter().filter(|x| x["status"] == "not_run").collect();
    assert_eq!(ok, 1, "{first}");
    assert!(!pending.is_empty(), "{first}");
    for p in pending {
        assert!(p["reason"].as_str().unwrap().contains("not run yet"), "{p}");
    }
    let last: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(ran_count(&last["configs"][0]), 3);
}

/// FlexGen's flags that put weights on disk run end to end: the layers are written to
/// `--disk-dir` and read back for every pass, the report counts the bytes, and the tokens are
/// the GPU-only run's.
#[test]
fn a_flexgen_policy_with_weights_on_disk_runs_with_the_same_tokens() {
    let d = new_dir("disk-weights");
    let disk = d.path("disk");
    let out = bench(
        &d,
        &[
            "--policies",
            "flexgen,gpu-only",
            "--percent",
            "0",
            "50",
            "100",
            "0",
            "100",
            "0",
            "--disk-dir",
            disk.to_str().unwrap(),
            "--disk-mem",
            "256MiB",
            "--json",
            "report.json",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    let r = report(&d, "report.json");
    check_schema(&r);
    let fg = run_of(&r, "flexgen");
    assert_eq!(fg["status"], "ok", "{fg}");
    assert_eq!(fg["plan"]["weights"]["disk"], 0.5);
    let links = &fg["measured"]["links"];
    assert!(
        links["weights_disk_to_host_bytes"].as_u64().unwrap() > 0,
        "{links}"
    );
    assert_eq!(run_of(&r, "gpu-only")["status"], "ok");
    assert_eq!(r["configs"][0]["exact"], true, "{}", r["configs"][0]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("weights disk→host"));
}

/// `--resume FILE` carries over the configurations FILE finished (nothing runs again, the
/// figures are FILE's and the report says where they came from), runs again a configuration
/// FILE left part way, starts from nothing when FILE does not exist yet, and refuses a FILE
/// written under other budgets, naming the flag.
#[test]
fn resume_carries_over_finished_configurations_and_reruns_the_rest() {
    let d = new_dir("resume");
    // The bench with both policies and `extra`.
    let both = |extra: &[&str]| bench(&d, &[&["--policies", "strata,layerwise"], extra].concat());
    let first = both(&["--json", "a.json", "--resume", "a.json"]);
    assert!(first.status.success(), "{}", text(&first));
    assert!(
        text(&first).contains("no report there yet"),
        "{}",
        text(&first)
    );
    let a = report(&d, "a.json");
    assert_eq!(ran_count(&a["configs"][0]), 2);

    let out = carried(&both(&["--json", "b.json", "--resume", "a.json"]), 1);
    assert!(
        !out.contains("done: prefill"),
        "a carried configuration ran again: {out}"
    );
    assert!(out.contains("**Carried over** from a.json"), "{out}");
    let b = report(&d, "b.json");
    check_schema(&b);
    let (ca, cb) = (&a["configs"][0], &b["configs"][0]);
    assert!(
        cb["carried_from"].as_str().unwrap().starts_with("a.json ("),
        "{cb}"
    );
    assert_eq!(
        ca["runs"], cb["runs"],
        "the carried runs are the earlier report's"
    );
    assert_eq!(ca["exact"], cb["exact"]);
    assert_eq!(ca["targets"], cb["targets"], "targets judged again alike");

    // A configuration the earlier bench left part way runs again, whole.
    let mut partial = a.clone();
    partial["configs"][0]["runs"][1]["status"] = "not_run".into();
    partial["configs"][0]["runs"][1]["measured"] = Value::Null;
    std::fs::write(d.path("p.json"), partial.to_string()).unwrap();
    carried(&both(&["--json", "c.json", "--resume", "p.json"]), 0);
    let c = report(&d, "c.json");
    assert_eq!(ran_count(&c["configs"][0]), 2, "both policies ran again");
    assert!(c["configs"][0]["carried_from"].is_null());

    // Several files: the one that finished this workload is used.
    let two = both(&["--batch", "2", "--json", "x.json"]);
    assert!(two.status.success(), "{}", text(&two));
    let merged = both(&[
        "--batch", "2", "--json", "y.json", "--resume", "a.json", "--resume", "x.json",
    ]);
    carried(&merged, 1);
    let y = report(&d, "y.json");
    assert!(
        y["configs"][0]["carried_from"]
            .as_str()
            .unwrap()
            .starts_with("x.json (")
    );
    // Resumed again from the merged report: the configuration still names where it ran.
    let z = both(&["--batch", "2", "--json", "z.json", "--resume", "y.json"]);
    assert!(z.status.success(), "{}", text(&z));
    let z = report(&d, "z.json");
    assert_eq!(
        z["configs"][0]["carried_from"],
        y["configs"][0]["carried_from"]
    );

    // Other policies: not the same configuration, so it runs.
    let other = bench(&d, &["--policies", "strata", "--resume", "a.json"]);
    assert!(
        text(&other).contains("0 of 1 configuration(s) carried over"),
        "{}",
        text(&other)
    );

    let budgets = both(&["--host-mem", "1GiB", "--resume", "a.json"]);
    let out = text(&budgets);
    assert!(!budgets.status.success(), "{out}");
    assert!(
        out.contains("--resume a.json") && out.contains("--host-mem"),
        "{out}"
    );

    std::fs::write(d.path("junk.json"), "{\"schema\": 3}").unwrap();
    let junk = both(&["--resume", "junk.json"]);
    let out = text(&junk);
    assert!(!junk.status.success(), "{out}");
    assert!(out.contains("--resume junk.json: not a report"), "{out}");
}

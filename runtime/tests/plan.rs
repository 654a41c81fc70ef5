//! `strata plan` end to end: JSON that scripts can read and that respects the budgets, and a
//! clear error naming the short tier when nothing fits.

#![allow(clippy::unwrap_used)]

use std::process::{Command, Output};

use serde_json::Value;

/// `strata plan ARGS` on the built-in H100 reference profile, written to a file: without
/// `--profile`, plan would calibrate this machine (see `tests/calibrate.rs`).
fn plan(args: &[&str]) -> Output {
    let profile = std::env::temp_dir().join(format!(
        "strata-plan-{}-{:?}.json",
        std::process::id(),
        std::thread::current().id()
    ));
    strata_planner::HardwareProfile::h100_reference()
        .save(&profile)
        .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_strata"))
        .arg("plan")
        .args(args)
        .arg("--profile")
        .arg(&profile)
        .output()
        .unwrap();
    std::fs::remove_file(&profile).unwrap();
    out
}

const GIB: u64 = 1 << 30;

#[test]
fn json_output_parses_and_respects_the_budgets() {
    let out = plan(&[
        "--model",
        "synthetic:opt-30b",
        "--batch",
        "32",
        "--prompt-len",
        "512",
        "--gen-len",
        "32",
        "--gpu-mem",
        "24GiB",
        "--host-mem",
        "64GiB",
        "--disk-mem",
        "1TiB",
        "--json",
        "--explain",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let mem = &v["prediction"]["memory"];
    assert!(mem["gpu"].as_u64().unwrap() <= 24 * GIB);
    assert!(mem["host"].as_u64().unwrap() <= 64 * GIB);
    assert!(mem["disk"].as_u64().unwrap() <= 1024 * GIB);
    assert_eq!(v["budgets"]["gpu_bytes"].as_u64().unwrap(), 24 * GIB);
    assert_eq!(v["profile"]["reference"], Value::Bool(true));
    let policy: strata_planner::Policy = serde_json::from_value(v["policy"].clone()).unwrap();
    let weights = policy.weights.gpu + policy.weights.host + policy.weights.disk;
    assert!((weights - 1.0).abs() < 1e-9);
    assert_eq!(policy.gpu_batch_size * policy.num_gpu_batches, 32);
    assert!(v["prediction"]["tokens_per_s"].as_f64().unwrap() > 0.0);
    assert!(!v["alternatives"].as_array().unwrap().is_empty());
}

#[test]
fn text_output_says_the_profile_is_a_reference() {
    let out = plan(&[
        "--model",
        "synthetic:llama-3-8b",
        "--batch",
        "8",
        "--prompt-len",
        "4096",
        "--gen-len",
        "64",
        "--gpu-mem",
        "24GiB",
        "--host-mem",
        "32GiB",
        "--explain",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("NOT a measurement of this machine"), "{text}");
    assert!(text.contains("bound by"), "{text}");
    assert!(text.contains("lower bound (all overlap)"), "{text}");
    // The host's issue of the GPU's work, and the LM head, shown as parts of the prediction.
    assert!(text.contains("host issuing it"), "{text}");
    assert!(text.contains("LM head (per step)"), "{text}");
    assert!(text.contains("alternatives"), "{text}");
}

#[test]
fn impossible_budget_names_the_short_tier() {
    let out = plan(&[
        "--model",
        "synthetic:opt-30b",
        "--batch",
        "32",
        "--prompt-len",
        "512",
        "--gen-len",
        "32",
        "--gpu-mem",
        "256MiB",
        "--host-mem",
        "1TiB",
        "--disk-mem",
        "1TiB",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no policy fits"), "{err}");
    assert!(err.contains("gpu memory is short by"), "{err}");
}

#[test]
fn lengths_beyond_the_model_context_are_refused() {
    let out = plan(&[
        "--model",
        "synthetic:opt-30b",
        "--batch",
        "1",
        "--prompt-len",
        "4096",
        "--gen-len",
        "32",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("context"), "{err}");
}

/// `--policy FILE` predicts that policy instead of searching: `plan --json`'s own output read back
/// gives the same prediction, a changed policy a different one, and a file that is not a policy
/// is refused naming the flag and the file.
#[test]
fn a_given_policy_is_predicted_instead_of_searched() {
    let args = [
        "--model",
        "synthetic:llama-3-8b",
        "--batch",
        "8",
        "--prompt-len",
        "4096",
        "--gen-len",
        "16",
        "--gpu-mem",
        "20GiB",
        "--host-mem",
        "64GiB",
    ];
    let json = |extra: &[&str]| -> Value {
        let out = plan(&[&args[..], &["--json"], extra].concat());
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let searched = json(&[]);
    let dir = std::env::temp_dir().join(format!("strata-plan-policy-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("plan.json");
    std::fs::write(&file, searched.to_string()).unwrap();
    let given = json(&["--policy", file.to_str().unwrap()]);
    assert_eq!(given["policy"], searched["policy"]);
    assert_eq!(given["prediction"], searched["prediction"]);
    assert_eq!(given["considered"], 1);
    assert_eq!(given["alternatives"].as_array().unwrap().len(), 0);

    let mut other = searched["policy"].clone();
    let block = other["kv_block_tokens"].as_u64().unwrap();
    other["kv_block_tokens"] = (if block == 16 { 128 } else { 16 }).into();
    let file2 = dir.join("policy.json");
    std::fs::write(&file2, other.to_string()).unwrap();
    let changed = json(&["--policy", file2.to_str().unwrap()]);
    assert_eq!(changed["policy"], other);
    assert_ne!(changed["prediction"], searched["prediction"]);

    let text = plan(&[&args[..], &["--policy", file2.to_str().unwrap()]].concat());
    let stdout = String::from_utf8_lossy(&text.stdout);
    assert!(
        stdout.contains("searched:   none (the policy in"),
        "{stdout}"
    );

    let bad = dir.join("bad.json");
    std::fs::write(&bad, "{\"weights\": 1}").unwrap();
    let out = plan(&[&args[..], &["--policy", bad.to_str().unwrap()]].concat());
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--policy") && err.contains("bad.json") && err.contains("not a policy"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

//! `strata calibrate` end to end: a quick calibration writes a profile that loads and that
//! `strata plan` accepts; a bad `--disk-dir` fails at once, naming it; and `strata plan` with no
//! profile calibrates first, says so, and writes the profile to the cache directory.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use strata_planner::HardwareProfile;

fn strata() -> Command {
    Command::new(env!("CARGO_BIN_EXE_strata"))
}

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("strata-calibrate-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

const PLAN: [&str; 15] = [
    "plan",
    "--model",
    "synthetic:opt-1.3b",
    "--batch",
    "8",
    "--prompt-len",
    "512",
    "--gen-len",
    "32",
    "--gpu-mem",
    "2GiB",
    "--host-mem",
    "8GiB",
    "--disk-mem",
    "16GiB",
];

/// Whether this machine has a usable GPU (then the GPU fields are measured, not absent).
fn has_gpu() -> bool {
    strata_kernels::cuda::calibrate::DeviceCalibrator::new(0).is_ok()
}

#[test]
fn quick_calibration_writes_a_profile_that_plan_accepts() {
    let d = tmpdir("quick");
    let (profile, disk) = (d.join("profile.json"), d.join("disk"));
    let out = strata()
        .args(["calibrate", "--quick", "--profile"])
        .arg(&profile)
        .arg("--disk-dir")
        .arg(&disk)
        .output()
        .unwrap();
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("host attention"), "{stdout}");
    assert!(stdout.contains(&profile.display().to_string()), "{stdout}");

    let p = HardwareProfile::load(&profile).unwrap();
    assert!(!p.reference);
    assert!(
        p.host_mem_gbps > 0.0 && p.host_attention_gbps > 0.0,
        "{p:?}"
    );
    // The host MLP share at 1 to 32 rows, as a decode step calls it (the planner's rate for it).
    let mlp = p.host_mlp_layer_gbps.as_deref().unwrap_or_default();
    let rows: Vec<f64> = mlp.iter().map(|[r, _]| *r).collect();
    assert_eq!(rows, [1.0, 4.0, 8.0, 16.0, 32.0], "{p:?}");
    assert!(mlp.iter().all(|[_, g]| *g > 0.0), "{p:?}");
    assert!(stdout.contains("host MLP layer"), "{stdout}");
    // Host attention per block size the planner may choose, and the fixed cost of a call.
    let attn = p.host_attention_layer_gbps.as_deref().unwrap_or_default();
    let blocks: Vec<f64> = attn.iter().map(|[b, _]| *b).collect();
    assert_eq!(blocks, [16.0, 32.0, 64.0, 128.0], "{p:?}");
    assert!(attn.iter().all(|[_, g]| *g > 0.0), "{p:?}");
    assert!(
        p.host_attention_call_us.is_some_and(|us| us >= 0.0),
        "{p:?}"
    );
    assert_eq!(p.host_attention_beside_copies.is_some(), p.has_gpu, "{p:?}");
    assert!(p.disk_measured, "{p:?}");
    assert!(p.disk_read_gbps > 0.0 && p.disk_write_gbps > 0.0, "{p:?}");
    assert!(p.disk_bytes > 0 && p.host_bytes > 0, "{p:?}");
    assert!(p.gemm_tflops.f32 > 0.0 && p.gemm_tflops.bf16 > 0.0, "{p:?}");
    if !has_gpu() {
        assert!(!p.has_gpu, "{p:?}");
        assert!(stdout.contains("no GPU found"), "{stdout}");
    }
    // The temporary file is gone; the directory stays.
    assert_eq!(std::fs::read_dir(&disk).unwrap().count(), 0);

    let out = strata()
        .args(PLAN)
        .arg("--profile")
        .arg(&profile)
        .output()
        .unwrap();
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains(&format!("profile:    {}", profile.display())),
        "{stdout}"
    );
    assert!(!stdout.contains("NOT a measurement"), "{stdout}");
    assert!(!stderr.contains("calibrating"), "{stderr}");
    std::fs::remove_dir_all(&d).unwrap();
}

/// `--threads N` measures the host's figures with N threads, as `generate --threads N` runs.
#[test]
fn threads_set_the_host_threads_measured() {
    let d = tmpdir("threads");
    let profile = d.join("profile.json");
    let out = strata()
        .args(["calibrate", "--quick", "--threads", "1", "--profile"])
        .arg(&profile)
        .output()
        .unwrap();
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let host_rows: Vec<&str> = stdout
        .lines()
        .filter(|l| l.trim_start().starts_with("host memory ") || l.contains("host MLP layer"))
        .collect();
    assert!(!host_rows.is_empty(), "{stdout}");
    assert!(
        host_rows.iter().all(|l| l.contains(" 1 threads")),
        "{stdout}"
    );
    let out = strata()
        .args(["calibrate", "--quick", "--threads", "0"])
        .output()
        .unwrap();
    let (_, stderr) = text(&out);
    assert!(
        !out.status.success() && stderr.contains("--threads"),
        "{stderr}"
    );
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn a_disk_dir_that_is_a_file_is_refused_by_name() {
    let d = tmpdir("baddir");
    let file = d.join("not-a-dir");
    std::fs::write(&file, b"x").unwrap();
    let profile = d.join("profile.json");
    let out = strata()
        .args(["calibrate", "--quick", "--profile"])
        .arg(&profile)
        .arg("--disk-dir")
        .arg(&file)
        .output()
        .unwrap();
    let (_, stderr) = text(&out);
    assert!(!out.status.success());
    assert!(
        stderr.contains(&format!("--disk-dir {}", file.display()))
            && stderr.contains("not a directory"),
        "{stderr}"
    );
    assert!(!profile.exists());
    std::fs::remove_dir_all(&d).unwrap();
}

fn plan_with_cache(cache: &Path) -> Output {
    strata()
        .args(PLAN)
        .env("XDG_CACHE_HOME", cache)
        .output()
        .unwrap()
}

#[test]
fn plan_without_a_profile_calibrates_first_and_writes_it_to_the_cache() {
    let cache = tmpdir("xdg");
    let expected = cache.join("strata").join("profile.json");
    let out = plan_with_cache(&cache);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stderr.contains(&format!(
            "no hardware profile at {}; calibrating this machine",
            expected.display()
        )),
        "{stderr}"
    );
    assert!(stderr.contains("strata calibrate"), "{stderr}");
    let p = HardwareProfile::load(&expected).unwrap();
    assert!(
        !p.reference && !p.disk_measured && p.disk_bytes == 0,
        "{p:?}"
    );
    assert!(
        stdout.contains(&format!("profile:    {}", expected.display())),
        "{stdout}"
    );
    // The disk budget is given but the disk was not measured: the plan says so.
    assert!(stdout.contains("placeholders"), "{stdout}");

    // The second time, the profile is there: no calibration.
    let out = plan_with_cache(&cache);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(!stderr.contains("calibrating"), "{stderr}");
    assert_eq!(HardwareProfile::load(&expected).unwrap(), p);
    std::fs::remove_dir_all(&cache).unwrap();
}

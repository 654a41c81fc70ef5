//! The `strata` binary end to end: batch-job contract (records, error records, exit codes,
//! resume after a kill, seeds, stop strings, stats) and bad input of every kind — each must give
//! a clear error naming the file, field or line, and never lose what OUT already holds.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

fn strata() -> Command {
    Command::new(env!("CARGO_BIN_EXE_strata"))
}

fn golden(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/golden")
        .join(name)
}

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("strata-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn write_lines(path: &Path, lines: &[String]) {
    std::fs::write(path, lines.join("\n") + "\n").unwrap();
}

fn records(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn generate(model: &str, input: &Path, output: &Path, extra: &[&str]) -> Output {
    strata()
        .args(["generate", "--model", model, "--input"])
        .arg(input)
        .arg("--output")
        .arg(output)
        .args(extra)
        .output()
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn bad_lines_become_error_records_and_the_job_goes_on() {
    let d = tmpdir("badlines");
    let (input, output) = (d.join("in.jsonl"), d.join("out.jsonl"));
    let too_long: Vec<u32> = (0..1100).map(|i| i % 200).collect();
    write_lines(
        &input,
        &[
            json!({"id": "good", "input_ids": [1, 2, 3]}).to_string(),
            "{this is not json".to_string(),
            json!({"prompt": "no id"}).to_string(),
            json!({"id": "text", "prompt": "synthetic models have no tokenizer"}).to_string(),
            json!({"id": "oov", "input_ids": [1, 256]}).to_string(),
            json!({"id": "empty", "input_ids": []}).to_string(),
            json!({"id": "long", "input_ids": too_long}).to_string(),
            json!({"id": "good", "input_ids": [4]}).to_string(),
            json!({"id": 7, "input_ids": [5, 6], "max_new_tokens": 3}).to_string(),
        ],
    );
    let o = generate(
        "synthetic:tiny-llama",
        &input,
        &output,
        &["--max-new-tokens", "5"],
    );
    assert_eq!(
        o.status.code(),
        Some(3),
        "some items failed: {}",
        stderr(&o)
    );
    let recs = records(&output);
    assert_eq!(recs.len(), 9, "one record per line");
    let by_line = |line: u64| {
        recs.iter()
            .find(|r| r["line"] == line)
            .unwrap_or_else(|| panic!("no record for line {line}"))
    };
    assert!(
        by_line(2)["error"]
            .as_str()
            .unwrap()
            .contains("invalid JSON")
    );
    assert!(
        by_line(3)["error"]
            .as_str()
            .unwrap()
            .contains("missing `id`")
    );
    assert!(
        by_line(4)["error"]
            .as_str()
            .unwrap()
            .contains("no tokenizer")
    );
    assert!(
        by_line(5)["error"]
            .as_str()
            .unwrap()
            .contains("token id 256")
    );
    assert!(
        by_line(6)["error"]
            .as_str()
            .unwrap()
            .contains("empty prompt")
    );
    assert!(by_line(7)["error"].as_str().unwrap().contains("context"));
    assert!(
        by_line(8)["error"]
            .as_str()
            .unwrap()
            .contains("duplicate id")
    );
    let good = recs
        .iter()
        .find(|r| r["id"] == "good" && r.get("output_ids").is_some())
        .unwrap();
    assert_eq!(good["generated_tokens"], 5);
    assert_eq!(good["prompt_tokens"], 3);
    assert_eq!(good["finish_reason"], "length");
    let seven = recs.iter().find(|r| r["id"] == 7).unwrap();
    assert_eq!(
        seven["output_ids"].as_array().unwrap().len(),
        3,
        "per-line max_new_tokens wins"
    );
}

#[test]
fn output_is_never_overwritten_and_resume_survives_a_kill() {
    let d = tmpdir("resume");
    let (input, output) = (d.join("in.jsonl"), d.join("out.jsonl"));
    let lines: Vec<String> = (0..40)
        .map(|i| json!({"id": i, "input_ids": [i % 200 + 1, 7, 9]}).to_string())
        .collect();
    write_lines(&input, &lines);
    let args = ["--max-new-tokens", "200", "--batch-size", "1"];

    // The reference: one uninterrupted run.
    let full = d.join("full.jsonl");
    assert!(
        generate("synthetic:tiny-llama", &input, &full, &args)
            .status
            .success()
    );
    let want = records(&full);

    // Kill a run once it has written a few lines, then resume it.
    let mut child = strata()
        .args(["generate", "--model", "synthetic:tiny-llama", "--input"])
        .arg(&input)
        .arg("--output")
        .arg(&output)
        .args(args)
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while std::fs::read_to_string(&output)
        .map(|t| t.lines().count())
        .unwrap_or(0)
        < 3
    {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "no output appeared"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let before = std::fs::read_to_string(&output).unwrap();
    let complete_before = &before[..before.rfind('\n').map_or(0, |i| i + 1)];
    assert!(
        complete_before.lines().count() < want.len(),
        "the kill came before the job finished"
    );

    let o = generate("synthetic:tiny-llama", &input, &output, &args);
    assert!(
        !o.status.success() && stderr(&o).contains("--resume"),
        "refuses to overwrite: {}",
        stderr(&o)
    );
    assert!(
        std::fs::read_to_string(&output)
            .unwrap()
            .starts_with(complete_before),
        "refusal touched OUT"
    );

    let o = generate(
        "synthetic:tiny-llama",
        &input,
        &output,
        &[&args[..], &["--resume"]].concat(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let after = std::fs::read_to_string(&output).unwrap();
    assert!(
        after.starts_with(complete_before),
        "lines written before the kill survive unchanged"
    );
    let mut got = records(&output);
    got.sort_by_key(|r| r["id"].as_u64());
    assert_eq!(
        got, want,
        "every id exactly once, with the same tokens as an uninterrupted run"
    );
}

#[test]
fn same_seed_same_tokens_and_stats_json_is_written() {
    let d = tmpdir("seeds");
    let (input, output, stats) = (
        d.join("in.jsonl"),
        d.join("out.jsonl"),
        d.join("stats.json"),
    );
    write_lines(
        &input,
        &[
            json!({"id": "a", "input_ids": [3, 4, 5], "seed": 11}).to_string(),
            json!({"id": "b", "input_ids": [3, 4, 5], "seed": 11}).to_string(),
            json!({"id": "c", "input_ids": [3, 4, 5], "seed": 12}).to_string(),
            json!({"id": "d", "input_ids": [3, 4, 5], "temperature": 0}).to_string(),
        ],
    );
    let o = generate(
        "synthetic:tiny-llama",
        &input,
        &output,
        &[
            "--temperature",
            "1.5",
            "--top-p",
            "0.95",
            "--max-new-tokens",
            "24",
            "--stats-json",
            stats.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let recs = records(&output);
    let ids = |id: &str| recs.iter().find(|r| r["id"] == id).unwrap()["output_ids"].clone();
    assert_eq!(ids("a"), ids("b"), "same seed, same output");
    assert_ne!(ids("a"), ids("c"), "another seed samples differently");
    let s: Value = serde_json::from_str(&std::fs::read_to_string(&stats).unwrap()).unwrap();
    for key in [
        "prompt_tokens",
        "generated_tokens",
        "prefill_seconds",
        "decode_seconds",
        "prefill_tokens_per_s",
        "decode_tokens_per_s",
        "peak_rss_bytes",
    ] {
        assert!(s.get(key).is_some(), "stats has {key}");
    }
    assert_eq!(s["generated_tokens"], 96);
    assert_eq!(s["prompt_tokens"], 12);
}

/// Prompts split across prefill chunks (one straddling two, one ending exactly at a boundary,
/// chunks with no prompt's end in them) give the same records as one chunk, greedy and sampled.
#[test]
fn prefill_chunks_do_not_change_the_output() {
    let d = tmpdir("chunks");
    let input = d.join("in.jsonl");
    write_lines(
        &input,
        &[
            json!({"id": 0, "input_ids": [3, 4, 5, 6, 7, 8, 9]}).to_string(),
            json!({"id": 1, "input_ids": [11, 12]}).to_string(),
            json!({"id": 2, "input_ids": [20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30]}).to_string(),
            json!({"id": 3, "input_ids": [5, 6, 7], "temperature": 0.8, "seed": 3}).to_string(),
        ],
    );
    let mut outs = Vec::new();
    for chunk in ["8192", "3", "1"] {
        let output = d.join(format!("out-{chunk}.jsonl"));
        let o = generate(
            "synthetic:tiny-llama",
            &input,
            &output,
            &[
                "--max-new-tokens",
                "6",
                "--ignore-eos",
                "--prefill-chunk",
                chunk,
            ],
        );
        assert!(o.status.success(), "{}", stderr(&o));
        let mut recs = records(&output);
        recs.sort_by_key(|r| r["id"].as_u64());
        outs.push(
            recs.iter()
                .map(|r| r["output_ids"].clone())
                .collect::<Vec<_>>(),
        );
    }
    assert_eq!(outs[0], outs[1], "chunks of 3 tokens");
    assert_eq!(outs[0], outs[2], "chunks of 1 token");
    let o = generate(
        "synthetic:tiny-llama",
        &input,
        &d.join("x.jsonl"),
        &["--prefill-chunk", "0"],
    );
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--prefill-chunk"), "{}", stderr(&o));
}

#[test]
fn stop_strings_and_text_prompts_on_a_model_with_a_tokenizer() {
    let d = tmpdir("stop");
    let model = golden("llama-gqa");
    let (input, output) = (d.join("in.jsonl"), d.join("out.jsonl"));
    write_lines(
        &input,
        &[json!({"id": 1, "prompt": "The river"}).to_string()],
    );
    let o = generate(
        model.to_str().unwrap(),
        &input,
        &output,
        &["--max-new-tokens", "12", "--ignore-eos"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let text = records(&output)[0]["text"].as_str().unwrap().to_string();
    let chars: Vec<char> = text.chars().collect();
    assert!(chars.len() >= 6, "generated text {text:?}");
    let stop: String = chars[3..5].iter().collect();

    let out2 = d.join("out2.jsonl");
    write_lines(
        &input,
        &[json!({"id": 1, "prompt": "The river", "stop": [stop]}).to_string()],
    );
    let o = generate(
        model.to_str().unwrap(),
        &input,
        &out2,
        &["--max-new-tokens", "12", "--ignore-eos"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let r = &records(&out2)[0];
    assert_eq!(r["finish_reason"], "stop");
    let cut = r["text"].as_str().unwrap();
    assert!(
        !cut.contains(&stop) && text.starts_with(cut),
        "{cut:?} is {text:?} cut before {stop:?}"
    );

    let out3 = d.join("out3.jsonl");
    let o = generate(
        model.to_str().unwrap(),
        &input,
        &out3,
        &["--chat", "--max-new-tokens", "2"],
    );
    assert!(
        o.status.success(),
        "chat template from tokenizer_config.json: {}",
        stderr(&o)
    );
    let o = generate(
        "synthetic:tiny-llama",
        &input,
        &d.join("out4.jsonl"),
        &["--chat"],
    );
    assert!(
        !o.status.success() && stderr(&o).contains("chat template"),
        "{}",
        stderr(&o)
    );
}

type ConfigEdit = Box<dyn FnOnce(&mut serde_json::Map<String, Value>)>;

/// Copies a golden fixture to a scratch folder and lets the test edit its config.
fn edited_fixture(
    name: &str,
    tag: &str,
    edit: impl FnOnce(&mut serde_json::Map<String, Value>),
) -> PathBuf {
    let src = golden(name);
    let d = tmpdir(tag);
    for f in std::fs::read_dir(&src).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), d.join(f.file_name())).unwrap();
    }
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    edit(cfg.as_object_mut().unwrap());
    std::fs::write(d.join("config.json"), cfg.to_string()).unwrap();
    d
}

fn info_error(model: &Path) -> String {
    let o = strata()
        .args(["info", "--model"])
        .arg(model)
        .output()
        .unwrap();
    assert_eq!(
        o.status.code(),
        Some(1),
        "expected failure for {}",
        model.display()
    );
    stderr(&o)
}

#[test]
fn unsupported_configs_are_refused_naming_file_and_field() {
    let cases: Vec<(&str, ConfigEdit, &str)> = vec![
        (
            "opt",
            Box::new(|c| {
                c.insert("do_layer_norm_before".into(), json!(false));
            }),
            "do_layer_norm_before",
        ),
        (
            "opt",
            Box::new(|c| {
                c.insert("word_embed_proj_dim".into(), json!(32));
            }),
            "word_embed_proj_dim",
        ),
        (
            "llama-gqa",
            Box::new(|c| {
                c["rope_parameters"]["rope_type"] = json!("yarn");
            }),
            "rope_parameters.rope_type",
        ),
        (
            "llama-gqa",
            Box::new(|c| {
                c.insert("model_type".into(), json!("gpt_neox"));
            }),
            "model_type",
        ),
        (
            "llama-gqa",
            Box::new(|c| {
                c.remove("hidden_size");
            }),
            "hidden_size",
        ),
        (
            "llama-gqa",
            Box::new(|c| {
                c.insert("num_key_value_heads".into(), json!(3));
            }),
            "num_key_value_heads",
        ),
    ];
    for (i, (name, edit, field)) in cases.into_iter().enumerate() {
        let d = edited_fixture(name, &format!("cfg{i}"), edit);
        let err = info_error(&d);
        assert!(
            err.contains("config.json") && err.contains(field),
            "case {i}: {err}"
        );
    }
}

#[test]
fn a_sliding_window_shorter_than_the_sequence_is_refused_per_item() {
    let d = edited_fixture("llama-gqa", "window", |c| {
        c.insert("model_type".into(), json!("mistral"));
        c.insert("sliding_window".into(), json!(8));
        c["rope_parameters"] = json!({"rope_type": "default", "rope_theta": 10000.0});
    });
    let (input, output) = (d.join("in.jsonl"), d.join("out.jsonl"));
    write_lines(
        &input,
        &[
            json!({"id": "short", "input_ids": [5, 6, 7]}).to_string(),
            json!({"id": "long", "input_ids": (0..12).collect::<Vec<u32>>()}).to_string(),
        ],
    );
    let o = generate(
        d.to_str().unwrap(),
        &input,
        &output,
        &["--max-new-tokens", "20", "--ignore-eos"],
    );
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    let recs = records(&output);
    let long = recs.iter().find(|r| r["id"] == "long").unwrap();
    assert!(
        long["error"].as_str().unwrap().contains("sliding_window"),
        "{long}"
    );
    let short = recs.iter().find(|r| r["id"] == "short").unwrap();
    assert_eq!(
        short["generated_tokens"], 5,
        "generation stops at the window, never beyond it"
    );
}

#[test]
fn broken_model_files_give_clear_errors() {
    // Invalid JSON in config.json: the file and line are named.
    let d = tmpdir("badjson");
    std::fs::write(
        d.join("config.json"),
        "{\n  \"model_type\": \"llama\",\n  oops\n}",
    )
    .unwrap();
    let err = info_error(&d);
    assert!(
        err.contains("config.json") && err.contains("line 3"),
        "{err}"
    );

    // No weights at all.
    let d = edited_fixture("llama-gqa", "noweights", |_| {});
    std::fs::remove_file(d.join("model.safetensors")).unwrap();
    let err = info_error(&d);
    assert!(err.contains("model.safetensors"), "{err}");

    // Truncated weights.
    let d = edited_fixture("llama-gqa", "truncated", |_| {});
    let bytes = std::fs::read(d.join("model.safetensors")).unwrap();
    std::fs::write(d.join("model.safetensors"), &bytes[..bytes.len() / 2]).unwrap();
    let err = info_error(&d);
    assert!(
        err.contains("model.safetensors") && err.contains("truncated"),
        "{err}"
    );

    // A missing tensor is named when the job loads weights; OUT keeps what it had.
    let d = edited_fixture("llama-gqa", "missingtensor", |c| {
        c.insert("attention_bias".into(), json!(true));
    });
    let (input, output) = (d.join("in.jsonl"), d.join("out.jsonl"));
    write_lines(&input, &[json!({"id": 1, "input_ids": [1]}).to_string()]);
    std::fs::write(
        &output,
        "{\"id\":0,\"output_ids\":[],\"finish_reason\":\"length\"}\n",
    )
    .unwrap();
    let o = generate(d.to_str().unwrap(), &input, &output, &["--resume"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("self_attn.q_proj.bias"),
        "{}",
        stderr(&o)
    );
    assert_eq!(
        std::fs::read_to_string(&output).unwrap(),
        "{\"id\":0,\"output_ids\":[],\"finish_reason\":\"length\"}\n"
    );

    // Unknown presets and missing paths.
    let o = strata()
        .args(["info", "--model", "synthetic:gpt-5"])
        .output()
        .unwrap();
    assert!(
        stderr(&o).contains("unknown preset `gpt-5`"),
        "{}",
        stderr(&o)
    );
    let o = strata()
        .args(["info", "--model", "/no/such/model"])
        .output()
        .unwrap();
    assert!(
        stderr(&o).contains("/no/such/model") && stderr(&o).contains("no such file"),
        "{}",
        stderr(&o)
    );
}

/// A minimal GGUF v3 file: `general.architecture = llama` and one tensor of the given type.
fn tiny_gguf(path: &Path, tensor_type: u32, truncate: bool) {
    let mut b = Vec::new();
    let s = |b: &mut Vec<u8>, t: &str| {
        b.extend((t.len() as u64).to_le_bytes());
        b.extend(t.as_bytes());
    };
    b.extend(b"GGUF");
    b.extend(3u32.to_le_bytes());
    b.extend(1u64.to_le_bytes()); // tensors
    b.extend(1u64.to_le_bytes()); // metadata entries
    s(&mut b, "general.architecture");
    b.extend(8u32.to_le_bytes()); // string
    s(&mut b, "llama");
    s(&mut b, "token_embd.weight");
    b.extend(2u32.to_le_bytes());
    b.extend(256u64.to_le_bytes());
    b.extend(1u64.to_le_bytes());
    b.extend(tensor_type.to_le_bytes());
    b.extend(0u64.to_le_bytes());
    while b.len() % 32 != 0 {
        b.push(0);
    }
    b.extend(vec![0u8; 1024]);
    if truncate {
        b.truncate(40);
    }
    std::fs::write(path, b).unwrap();
}

#[test]
fn unsupported_or_truncated_gguf_files_are_refused() {
    let d = tmpdir("gguf");
    let q5k = d.join("q5k.gguf");
    tiny_gguf(&q5k, 13, false);
    let err = info_error(&q5k);
    assert!(
        err.contains("q5k.gguf") && err.contains("token_embd.weight") && err.contains("Q5_K"),
        "{err}"
    );
    let cut = d.join("cut.gguf");
    tiny_gguf(&cut, 0, true);
    let err = info_error(&cut);
    assert!(err.contains("cut.gguf"), "{err}");
}

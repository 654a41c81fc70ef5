//! Golden tests against Hugging Face transformers. `tools/make_golden.py` built tiny random-weight
//! Llama (GQA + llama3 RoPE scaling), Qwen2 (QKV bias, tied embeddings) and OPT models, saved them
//! with a tokenizer, and recorded greedy continuations and last-position logits. strata must give
//! identical greedy tokens and logits within 1e-4 relative error (f32 weights, and bf16 weights
//! whose reference is f32 math over the same bf16 values).

#![allow(clippy::unwrap_used)]

use std::path::Path;

use strata_runtime::model;
use strata_tests::{Engine, fixture, json_f64s, json_u32s, max_rel_err, read_json};

const LOGIT_REL_TOL: f64 = 1e-4;

struct Case {
    prompt: String,
    input_ids: Vec<u32>,
    greedy: Vec<u32>,
    last_logits: Vec<f64>,
}

fn cases(dir: &Path) -> Vec<Case> {
    let e = read_json(&dir.join("expected.json"));
    e["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| Case {
            prompt: c["prompt"].as_str().unwrap().to_string(),
            input_ids: json_u32s(&c["input_ids"]),
            greedy: json_u32s(&c["greedy_ids"]),
            last_logits: json_f64s(&c["last_logits"]),
        })
        .collect()
}

/// Runs every case of a fixture (one at a time, then all together as one ragged batch) at a given
/// KV block size, and checks tokens, logits and tokenization.
fn check_fixture(dir: &Path, block_tokens: usize) {
    let m = model::open(dir.to_str().unwrap()).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let tok = m.tokenizer.as_ref().expect("fixture has a tokenizer");
    let cases = cases(dir);
    let mut engine = Engine::new(&m, block_tokens);
    for c in &cases {
        assert_eq!(
            tok.encode(&c.prompt, true).unwrap(),
            c.input_ids,
            "{}: tokenization of {:?}",
            dir.display(),
            c.prompt
        );
        let (logits, greedy) = engine
            .greedy_batch(std::slice::from_ref(&c.input_ids), c.greedy.len())
            .remove(0);
        let err = max_rel_err(&logits, &c.last_logits);
        eprintln!(
            "{}: {} prompt tokens: logits max rel err {err:.2e}",
            dir.display(),
            c.input_ids.len()
        );
        assert!(
            err < LOGIT_REL_TOL,
            "{}: prompt of {} tokens: logits rel err {err:e}",
            dir.display(),
            c.input_ids.len()
        );
        assert_eq!(
            greedy,
            c.greedy,
            "{}: greedy tokens for a prompt of {} tokens",
            dir.display(),
            c.input_ids.len()
        );
    }
    let prompts: Vec<Vec<u32>> = cases.iter().map(|c| c.input_ids.clone()).collect();
    let batch = engine.greedy_batch(&prompts, cases[0].greedy.len());
    for (c, (_, greedy)) in cases.iter().zip(batch) {
        assert_eq!(
            greedy,
            c.greedy,
            "{}: batched greedy tokens (block size {block_tokens})",
            dir.display()
        );
    }
}

#[test]
fn llama_with_gqa_and_llama3_rope_scaling_matches_transformers() {
    check_fixture(&fixture("golden/llama-gqa"), 16);
}

#[test]
fn llama_bf16_weights_match_transformers() {
    check_fixture(&fixture("golden/llama-gqa-bf16"), 16);
}

#[test]
fn qwen2_with_bias_and_tied_embeddings_matches_transformers() {
    check_fixture(&fixture("golden/qwen2-tied"), 16);
}

#[test]
fn opt_matches_transformers() {
    check_fixture(&fixture("golden/opt"), 16);
}

#[test]
fn kv_block_size_does_not_change_results() {
    // One token per block, an odd size that straddles prompts, and one block for everything.
    for bt in [1, 3, 64] {
        check_fixture(&fixture("golden/llama-gqa"), bt);
        check_fixture(&fixture("golden/opt"), bt);
    }
}

/// transformers 4 wrote `rope_theta` / `rope_scaling` at the top level and `torch_dtype`;
/// transformers 5 writes a `rope_parameters` block and `dtype`. Both must load to the same model.
#[test]
fn transformers4_style_config_gives_the_same_tokens() {
    let src = fixture("golden/llama-gqa");
    let dir = std::env::temp_dir().join(format!("strata-legacy-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for f in [
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "expected.json",
    ] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    let mut cfg = read_json(&src.join("config.json"));
    let obj = cfg.as_object_mut().unwrap();
    let mut rope = obj
        .remove("rope_parameters")
        .expect("fixture uses rope_parameters");
    let theta = rope.as_object_mut().unwrap().remove("rope_theta").unwrap();
    obj.insert("rope_theta".into(), theta);
    obj.insert("rope_scaling".into(), rope);
    let dtype = obj.remove("dtype").unwrap();
    obj.insert("torch_dtype".into(), dtype);
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(&cfg).unwrap(),
    )
    .unwrap();
    let new_style = model::open(src.to_str().unwrap()).unwrap();
    let old_style = model::open(dir.to_str().unwrap()).unwrap();
    let mut old = old_style.config.clone();
    old.max_context_source = new_style.config.max_context_source.clone();
    assert_eq!(new_style.config, old);
    check_fixture(&dir, 16);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn chat_templates_render_from_tokenizer_config_and_from_jinja_file() {
    for name in ["golden/llama-gqa", "golden/llama-gqa-bf16"] {
        let m = model::open(fixture(name).to_str().unwrap()).unwrap();
        let tok = m.tokenizer.as_ref().unwrap();
        let text = tok.render_chat("hello there").unwrap();
        assert!(text.contains("hello there"), "{name}: {text:?}");
    }
}

/// A checkpoint split over shards with `model.safetensors.index.json` loads to the same model.
#[test]
fn sharded_safetensors_give_the_same_tokens() {
    let src = fixture("golden/qwen2-tied");
    let dir = std::env::temp_dir().join(format!("strata-sharded-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for f in std::fs::read_dir(&src).unwrap() {
        let f = f.unwrap();
        if f.file_name() != "model.safetensors" {
            std::fs::copy(f.path(), dir.join(f.file_name())).unwrap();
        }
    }
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> = st.names().into_iter().map(str::to_string).collect();
    names.sort();
    let mut weight_map = serde_json::Map::new();
    for (i, part) in names.chunks(names.len().div_ceil(2)).enumerate() {
        let file = format!("model-{:05}-of-00002.safetensors", i + 1);
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = part
            .iter()
            .map(|n| (n.clone(), st.tensor(n).unwrap()))
            .collect();
        safetensors::serialize_to_file(views, None, &dir.join(&file)).unwrap();
        for n in part {
            weight_map.insert(n.clone(), serde_json::Value::String(file.clone()));
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    check_fixture(&dir, 16);
    std::fs::remove_dir_all(&dir).ok();
}

/// Weights loaded layer by layer on every forward pass (how models larger than memory run)
/// give exactly the logits of resident weights.
#[test]
fn streamed_weights_match_resident_weights() {
    for spec in [
        "synthetic:tiny-llama",
        "synthetic:tiny-qwen2",
        "synthetic:tiny-opt",
    ] {
        let m = model::open(spec).unwrap();
        let prompt: Vec<u32> = (0..37).map(|i| (i * 7 % 250) as u32).collect();
        let resident =
            Engine::with_residency(&m, 8, true).greedy_batch(std::slice::from_ref(&prompt), 6);
        let streamed =
            Engine::with_residency(&m, 8, false).greedy_batch(std::slice::from_ref(&prompt), 6);
        assert_eq!(resident, streamed, "{spec}");
    }
}

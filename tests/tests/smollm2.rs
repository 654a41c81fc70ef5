//! SmolLM2-135M-Instruct (Q4_1 GGUF, fetched by `scripts/get-smollm2.sh`) against an independent
//! float64 numpy implementation (`tools/smollm2_reference.py`): same token ids from our GGUF
//! tokenizer, same greedy continuations, top-20 last-position logits within 1e-4 relative error
//! (30 layers of f32 against f64; we measure about 1e-6), and a perplexity sanity check: a fixed English paragraph is
//! far more likely than the same tokens shuffled.
//!
//! Without the model file these tests print that they skipped, unless `STRATA_REQUIRE_SMOLLM2=1`
//! (set by `.ci/run`), which turns a missing model into a failure.

#![allow(clippy::unwrap_used)]

use strata_runtime::model::{self, Model};
use strata_tests::{Engine, fixture, json_u32s, read_json};

const TOP_LOGIT_REL_TOL: f64 = 1e-4;

fn smollm2() -> Option<Model> {
    let path = strata_tests::smollm2_gguf()?;
    Some(model::open(path.to_str().unwrap()).unwrap())
}

#[test]
fn tokens_greedy_continuations_and_logits_match_the_numpy_reference() {
    let Some(m) = smollm2() else { return };
    let tok = m.tokenizer.as_ref().unwrap();
    let reference = read_json(&fixture("smollm2/reference.json"));
    let mut engine = Engine::new(&m, 32);
    for c in reference["cases"].as_array().unwrap() {
        let prompt = c["prompt"].as_str().unwrap();
        let ids = json_u32s(&c["input_ids"]);
        assert_eq!(
            tok.encode(prompt, !c["chat"].as_bool().unwrap()).unwrap(),
            ids,
            "tokenization of {prompt:?}"
        );
        let want = json_u32s(&c["greedy_ids"]);
        let (logits, greedy) = engine
            .greedy_batch(std::slice::from_ref(&ids), want.len())
            .remove(0);
        assert_eq!(greedy, want, "greedy continuation of {prompt:?}");
        let top = c["last_logits_top"].as_array().unwrap();
        let scale = top[0][1].as_f64().unwrap().abs();
        let mut worst = 0.0f64;
        for pair in top
            .iter()
            .chain(c["last_logits_sample"].as_array().unwrap())
        {
            let (id, value) = (
                pair[0].as_u64().unwrap() as usize,
                pair[1].as_f64().unwrap(),
            );
            worst = worst.max((logits[id] as f64 - value).abs() / scale);
        }
        eprintln!("{prompt:?}: logits max rel err {worst:.2e}");
        assert!(
            worst < TOP_LOGIT_REL_TOL,
            "{prompt:?}: logits rel err {worst:e}"
        );
    }
}

#[test]
fn chat_template_renders_the_reference_prompt() {
    let Some(m) = smollm2() else { return };
    let reference = read_json(&fixture("smollm2/reference.json"));
    let chat = reference["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["chat"].as_bool().unwrap())
        .unwrap();
    let rendered = m
        .tokenizer
        .as_ref()
        .unwrap()
        .render_chat("What is the capital of France?")
        .unwrap();
    assert_eq!(rendered, chat["prompt"].as_str().unwrap());
}

/// Mean negative log-likelihood per token (the first token is not scored) → perplexity.
fn perplexity(engine: &mut Engine<'_>, ids: &[u32]) -> f64 {
    let logits = engine.all_logits(ids);
    let mut nll = 0.0f64;
    for (pos, next) in ids.iter().enumerate().skip(1) {
        let row = &logits[pos - 1];
        let max = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
        let lse = max
            + row
                .iter()
                .map(|&l| (l as f64 - max).exp())
                .sum::<f64>()
                .ln();
        nll += lse - row[*next as usize] as f64;
    }
    (nll / (ids.len() - 1) as f64).exp()
}

#[test]
fn english_is_far_more_likely_than_the_same_tokens_shuffled() {
    let Some(m) = smollm2() else { return };
    let p = &read_json(&fixture("smollm2/reference.json"))["perplexity"];
    let tok = m.tokenizer.as_ref().unwrap();
    let ids = json_u32s(&p["input_ids"]);
    assert_eq!(tok.encode(p["text"].as_str().unwrap(), true).unwrap(), ids);
    let mut engine = Engine::new(&m, 32);
    let ppl = perplexity(&mut engine, &ids);
    let shuffled = perplexity(&mut engine, &json_u32s(&p["shuffled_ids"]));
    eprintln!(
        "perplexity {ppl:.3} (reference {}), shuffled {shuffled:.1} (reference {})",
        p["ppl"], p["shuffled_ppl"]
    );
    assert!(ppl < 30.0, "perplexity {ppl} on plain English is too high");
    assert!(shuffled > 10.0 * ppl, "shuffled {shuffled} vs plain {ppl}");
    let want = p["ppl"].as_f64().unwrap();
    assert!(
        (ppl - want).abs() / want < 1e-3,
        "perplexity {ppl} vs reference {want}"
    );
}

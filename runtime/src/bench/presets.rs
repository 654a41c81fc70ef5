//! Workload presets of `strata bench`: the configurations each one runs, the budgets it
//! implies, and how `--model`, `--prompt-len`, `--gen-len` and `--batch` narrow it.
//!
//! - `flexgen-suite`: FlexGen's own benchmark (OPT-6.7B, OPT-30B, OPT-175B with synthetic
//!   weights; prompts 512 and 256; 32 generated tokens). The batch of each configuration is that
//!   of FlexGen's published policy scaled to the budgets, and every policy runs that batch.
//! - `long-context`: `synthetic:llama-3-8b` at 8K, 32K and 128K tokens of context (prompt plus
//!   generation), batch 1, 4, 16 and 32, with a 24 GiB GPU and 64 GiB of host memory; the rest
//!   goes to `--disk-dir`.
//! - `smollm2`: the real SmolLM2-135M-Instruct (fetched by `scripts/get-smollm2.sh`).
//!
//! A `--gen-len` shorter than the preset's is allowed and labelled in every report row.

use std::path::Path;

/// Preset names, for messages.
pub const NAMES: &[&str] = &["flexgen-suite", "long-context", "smollm2"];

pub const SMOLLM2_PATH: &str = "models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";

const GIB: u64 = 1 << 30;

/// One workload of a bench run.
#[derive(Clone, Debug, PartialEq)]
pub struct Workload {
    pub model: String,
    pub prompt_len: u64,
    pub gen_len: u64,
    /// `None`: the batch of FlexGen's published policy scaled to the budgets.
    pub batch: Option<u64>,
    /// Why this run departs from the preset (a shortened generation).
    pub note: Option<String>,
}

/// What a preset sets.
#[derive(Clone, Debug, Default)]
pub struct Preset {
    pub workloads: Vec<Workload>,
    /// Budgets the preset emulates, used unless the flags give others.
    pub gpu_bytes: Option<u64>,
    pub host_bytes: Option<u64>,
    /// The preset needs `--disk-dir`.
    pub needs_disk: bool,
}

/// What the command line says about the workload.
#[derive(Clone, Debug, Default)]
pub struct Narrowing<'a> {
    pub model: Option<&'a str>,
    pub prompt_len: Option<u64>,
    pub gen_len: Option<u64>,
    pub batch: Option<u64>,
}

/// The workloads of preset `name` narrowed by the flags, or what is wrong, naming the flag.
pub fn resolve(name: &str, n: &Narrowing<'_>) -> Result<Preset, String> {
    const GEN: u64 = 32;
    let gen_len = n.gen_len.unwrap_or(GEN);
    if gen_len == 0 || gen_len > GEN {
        return Err(format!(
            "--gen-len {gen_len}: preset {name} generates {GEN} tokens; a shorter generation \
             (1 to {GEN}) is allowed and labelled in the report"
        ));
    }
    let note = (gen_len < GEN)
        .then(|| format!("generation shortened to {gen_len} tokens (preset: {GEN})"));
    let workload = |model: &str, prompt_len: u64, batch: Option<u64>| Workload {
        model: model.to_string(),
        prompt_len,
        gen_len,
        batch,
        note: note.clone(),
    };
    let preset = match name {
        "flexgen-suite" => {
            if n.batch.is_some() {
                return Err(
                    "--batch: the flexgen-suite preset runs the batch of FlexGen's \
                            published policy scaled to the budgets; leave --batch out"
                        .into(),
                );
            }
            let models = [
                "synthetic:opt-6.7b",
                "synthetic:opt-30b",
                "synthetic:opt-175b",
            ];
            let models: Vec<&str> = match n.model {
                None => models.to_vec(),
                Some(m) if models.contains(&m) => vec![m],
                Some(m) => {
                    return Err(format!(
                        "--model {m}: the flexgen-suite preset runs {}",
                        models.join(", ")
                    ));
                }
            };
            let prompts = narrow("--prompt-len", &[512, 256], n.prompt_len)?;
            let mut w = Vec::new();
            for m in models {
                for &p in &prompts {
                    w.push(workload(m, p, None));
                }
            }
            Preset {
                workloads: w,
                ..Preset::default()
            }
        }
        "long-context" => {
            let model = n.model.unwrap_or("synthetic:llama-3-8b");
            let contexts: Vec<u64> = [8192u64, 32768, 131072]
                .iter()
                .map(|c| c - gen_len)
                .collect();
            let prompts = narrow("--prompt-len", &contexts, n.prompt_len)?;
            let batches = narrow("--batch", &[1, 4, 16, 32], n.batch)?;
            let mut w = Vec::new();
            for &p in &prompts {
                for &b in &batches {
                    w.push(workload(model, p, Some(b)));
                }
            }
            Preset {
                workloads: w,
                gpu_bytes: Some(24 * GIB),
                host_bytes: Some(64 * GIB),
                needs_disk: true,
            }
        }
        "smollm2" => {
            let model = n.model.unwrap_or(SMOLLM2_PATH);
            if !model.starts_with("synthetic:") && !Path::new(model).exists() {
                return Err(format!(
                    "--preset smollm2: {model} is missing; fetch it with scripts/get-smollm2.sh \
                     (or give --model)"
                ));
            }
            let prompt = n.prompt_len.unwrap_or(256);
            let batch = n.batch.unwrap_or(8);
            Preset {
                workloads: vec![workload(model, prompt, Some(batch))],
                ..Preset::default()
            }
        }
        other => {
            return Err(format!(
                "--preset {other}: unknown preset (known: {})",
                NAMES.join(", ")
            ));
        }
    };
    Ok(preset)
}

/// `all`, or only `given` when it is one of them.
fn narrow(flag: &str, all: &[u64], given: Option<u64>) -> Result<Vec<u64>, String> {
    match given {
        None => Ok(all.to_vec()),
        Some(v) if all.contains(&v) => Ok(vec![v]),
        Some(v) => Err(format!(
            "{flag} {v}: this preset runs {}",
            all.iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn presets_expand_and_narrow() {
        let all = resolve("flexgen-suite", &Narrowing::default()).unwrap();
        assert_eq!(all.workloads.len(), 6);
        assert!(
            all.workloads
                .iter()
                .all(|w| w.gen_len == 32 && w.batch.is_none())
        );
        let one = resolve(
            "flexgen-suite",
            &Narrowing {
                model: Some("synthetic:opt-30b"),
                prompt_len: Some(512),
                gen_len: Some(8),
                batch: None,
            },
        )
        .unwrap();
        assert_eq!(one.workloads.len(), 1);
        assert!(
            one.workloads[0]
                .note
                .as_deref()
                .unwrap()
                .contains("shortened")
        );
        let lc = resolve("long-context", &Narrowing::default()).unwrap();
        assert_eq!(lc.workloads.len(), 12);
        assert!(
            lc.workloads
                .iter()
                .any(|w| w.prompt_len + w.gen_len == 131072)
        );
        assert_eq!(lc.gpu_bytes, Some(24 * GIB));
        assert!(
            resolve("nope", &Narrowing::default())
                .unwrap_err()
                .contains("--preset")
        );
        let bad = Narrowing {
            batch: Some(3),
            ..Narrowing::default()
        };
        assert!(
            resolve("long-context", &bad)
                .unwrap_err()
                .contains("--batch")
        );
        let long = Narrowing {
            gen_len: Some(64),
            ..Narrowing::default()
        };
        assert!(
            resolve("long-context", &long)
                .unwrap_err()
                .contains("--gen-len")
        );
    }
}

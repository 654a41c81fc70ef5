//! Builds a Hugging Face `tokenizers::Tokenizer` from a GGUF file's `tokenizer.*` metadata, for
//! byte-level BPE vocabularies (`tokenizer.ggml.model == "gpt2"`): vocab + merges, the
//! pre-tokenizer regexes llama.cpp uses for `tokenizer.ggml.pre`, control/user-defined tokens as
//! added tokens, a ByteLevel decoder, plus the BOS/EOS ids and chat template the file carries.

use tokenizers::decoders::DecoderWrapper;
use tokenizers::decoders::byte_level::ByteLevel;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use super::gguf::{GgufError, GgufFile};

/// GPT-2's split regex, as llama.cpp writes it.
const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The split regexes llama.cpp applies, in order, for a `tokenizer.ggml.pre` value (each one
/// re-splits the pieces the previous produced). `None` for values strata does not know.
fn pre_split_regexes(pre: &str) -> Option<Vec<&'static str>> {
    Some(match pre {
        "gpt2" | "mpt" | "olmo" | "jais" => vec![GPT2],
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" => {
            vec![r"\p{N}", GPT2]
        }
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "pixtral" | "dbrx" | "smaug-bpe" => {
            vec![LLAMA3]
        }
        "qwen2" | "stablelm2" | "deepseek-r1-qwen" => vec![QWEN2],
        "default" => vec![r"[\p{P}\$\+<=>\^~\|]+", GPT2, r"\p{N}+", "[0-9][0-9][0-9]"],
        _ => return None,
    })
}

/// A tokenizer rebuilt from GGUF metadata. `tokenizer.encode(text, true)` prepends BOS when
/// `add_bos` is set (through a post-processor); with `false` it never adds anything.
#[derive(Debug)]
pub struct GgufTokenizer {
    pub tokenizer: Tokenizer,
    pub bos_id: Option<u32>,
    pub eos_id: Option<u32>,
    pub chat_template: Option<String>,
    pub add_bos: bool,
}

/// llama.cpp token types (`tokenizer.ggml.token_type`).
const TOKEN_TYPE_CONTROL: i32 = 3;
const TOKEN_TYPE_USER_DEFINED: i32 = 4;

pub fn from_gguf(f: &GgufFile) -> Result<GgufTokenizer, GgufError> {
    let path = f.path().display().to_string();
    let err = |field: &str, detail: String| GgufError::Tokenizer {
        path: path.clone(),
        field: field.into(),
        detail,
    };

    let model = f.get_str("tokenizer.ggml.model")?;
    if model != "gpt2" {
        let detail = format!(
            "unsupported tokenizer model `{model}` (strata supports `gpt2`, byte-level BPE)"
        );
        return Err(err("tokenizer.ggml.model", detail));
    }
    let pre = f
        .optional("tokenizer.ggml.pre", GgufFile::get_str)?
        .unwrap_or("default");
    let regexes = pre_split_regexes(pre).ok_or_else(|| {
        let detail = format!(
            "unsupported pre-tokenizer `{pre}` (strata supports gpt2, smollm, llama-bpe/llama3, qwen2, default and their aliases)"
        );
        err("tokenizer.ggml.pre", detail)
    })?;

    let tokens = f.get_str_array("tokenizer.ggml.tokens")?;
    let mut vocab = Vocab::default();
    for (id, tok) in tokens.iter().enumerate() {
        let id = u32::try_from(id)
            .map_err(|_| err("tokenizer.ggml.tokens", "more than 2^32 tokens".into()))?;
        // Keep the first id of a duplicated string, as a lookup table built in order would.
        vocab.entry((*tok).to_string()).or_insert(id);
    }
    let merges = f
        .get_str_array("tokenizer.ggml.merges")?
        .iter()
        .enumerate()
        .map(|(i, m)| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| {
                    err(
                        "tokenizer.ggml.merges",
                        format!("entry {i} `{m}` is not two tokens separated by a space"),
                    )
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .byte_fallback(false)
        .build()
        .map_err(|e| err("tokenizer.ggml.merges", e.to_string()))?;

    let mut pieces: Vec<PreTokenizerWrapper> = Vec::with_capacity(regexes.len() + 1);
    for r in regexes {
        let split = Split::new(
            SplitPattern::Regex(r.into()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| err("tokenizer.ggml.pre", format!("regex `{r}`: {e}")))?;
        pieces.push(split.into());
    }
    pieces.push(ByteLevel::new(false, true, false).into());

    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer.with_pre_tokenizer(Some(Sequence::new(pieces)));
    tokenizer.with_decoder(Some(DecoderWrapper::ByteLevel(ByteLevel::new(
        false, true, false,
    ))));

    let types = f
        .optional("tokenizer.ggml.token_type", GgufFile::get_i32_array)?
        .unwrap_or_default();
    if !types.is_empty() && types.len() != tokens.len() {
        let detail = format!(
            "has {} entries but there are {} tokens",
            types.len(),
            tokens.len()
        );
        return Err(err("tokenizer.ggml.token_type", detail));
    }
    let added = |kind: i32, special: bool| -> Vec<AddedToken> {
        tokens
            .iter()
            .zip(&types)
            .filter(|&(_, &t)| t == kind)
            .map(|(tok, _)| AddedToken::from(*tok, special).normalized(false))
            .collect()
    };
    tokenizer.add_special_tokens(&added(TOKEN_TYPE_CONTROL, true));
    tokenizer.add_tokens(&added(TOKEN_TYPE_USER_DEFINED, false));

    let id_key = |key: &str| -> Result<Option<u32>, GgufError> {
        match f.optional(key, GgufFile::get_u32)? {
            Some(id) if id as usize >= tokens.len() => Err(err(
                key,
                format!(
                    "token id {id} is outside the vocabulary of {} tokens",
                    tokens.len()
                ),
            )),
            id => Ok(id),
        }
    };
    let bos_id = id_key("tokenizer.ggml.bos_token_id")?;
    let eos_id = id_key("tokenizer.ggml.eos_token_id")?;
    let add_bos = f
        .optional("tokenizer.ggml.add_bos_token", GgufFile::get_bool)?
        .unwrap_or(false);
    if add_bos {
        let bos = bos_id.ok_or_else(|| {
            err(
                "tokenizer.ggml.bos_token_id",
                "missing, but add_bos_token is set".into(),
            )
        })?;
        let bos_tok = tokens
            .get(bos as usize)
            .copied()
            .unwrap_or_default()
            .to_string();
        let post = TemplateProcessing::builder()
            .try_single(format!("{bos_tok} $A"))
            .and_then(|b| b.try_pair(format!("{bos_tok} $A {bos_tok} $B")))
            .map_err(|e| err("tokenizer.ggml.bos_token_id", e.to_string()))?
            .special_tokens(vec![(bos_tok.clone(), bos)])
            .build()
            .map_err(|e| err("tokenizer.ggml.bos_token_id", e.to_string()))?;
        tokenizer.with_post_processor(Some(post));
    }
    let chat_template = f
        .optional("tokenizer.chat_template", GgufFile::get_str)?
        .map(str::to_string);
    Ok(GgufTokenizer {
        tokenizer,
        bos_id,
        eos_id,
        chat_template,
        add_bos,
    })
}

#[cfg(test)]
mod tests {
    use super::super::gguf::tests::Writer;
    use super::*;
    use std::path::Path;

    type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

    /// A toy byte-level vocabulary: `ab`, `Ġab` via merges, a control and a user-defined token.
    fn toy(pre: &str, model: &str) -> Writer {
        let mut w = Writer::new();
        w.kv_str("tokenizer.ggml.model", model)
            .kv_str("tokenizer.ggml.pre", pre);
        w.kv_str_array(
            "tokenizer.ggml.tokens",
            &[
                "<|endoftext|>",
                "a",
                "b",
                "Ġ",
                "ab",
                "Ġab",
                "<tool>",
                "1",
                "2",
                "12",
            ],
        );
        w.kv_i32_array("tokenizer.ggml.token_type", &[3, 1, 1, 1, 1, 1, 4, 1, 1, 1]);
        w.kv_str_array("tokenizer.ggml.merges", &["a b", "Ġ ab", "1 2"]);
        w.kv_u32("tokenizer.ggml.bos_token_id", 0)
            .kv_u32("tokenizer.ggml.eos_token_id", 0);
        w
    }

    fn ids(t: &GgufTokenizer, s: &str, special: bool) -> Result<Vec<u32>, tokenizers::Error> {
        Ok(t.tokenizer.encode(s, special)?.get_ids().to_vec())
    }

    #[test]
    fn toy_vocab_encodes_and_decodes() -> TestResult {
        let t = from_gguf(&toy("gpt2", "gpt2").open("tok-gpt2")?)?;
        assert_eq!(
            (t.bos_id, t.eos_id, t.add_bos, t.chat_template.as_deref()),
            (Some(0), Some(0), false, None)
        );
        assert_eq!(ids(&t, "ab ab", true)?, [4, 5]);
        assert_eq!(ids(&t, "<|endoftext|>ab<tool>", false)?, [0, 4, 6]);
        assert_eq!(t.tokenizer.decode(&[4, 5, 0], false)?, "ab ab<|endoftext|>");
        assert_eq!(t.tokenizer.decode(&[4, 5, 0], true)?, "ab ab");
        // gpt2 keeps digit runs together, smollm splits every digit.
        assert_eq!(ids(&t, "12", false)?, [9]);
        let t = from_gguf(&toy("smollm", "gpt2").open("tok-smollm")?)?;
        assert_eq!(ids(&t, "12", false)?, [7, 8]);
        assert_eq!(ids(&t, "ab ab", false)?, [4, 5]);
        Ok(())
    }

    #[test]
    fn add_bos_token_prepends_bos() -> TestResult {
        let mut w = toy("llama-bpe", "gpt2");
        w.kv_bool("tokenizer.ggml.add_bos_token", true)
            .kv_str("tokenizer.chat_template", "{{ x }}");
        let t = from_gguf(&w.open("tok-bos")?)?;
        assert!(t.add_bos);
        assert_eq!(t.chat_template.as_deref(), Some("{{ x }}"));
        assert_eq!(ids(&t, "ab ab", true)?, [0, 4, 5]);
        assert_eq!(ids(&t, "ab ab", false)?, [4, 5]);
        Ok(())
    }

    #[test]
    fn unsupported_inputs_name_the_field() -> TestResult {
        let msg = |w: &Writer, tag: &str| -> Result<String, GgufError> {
            Ok(from_gguf(&w.open(tag)?)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default())
        };
        let e = msg(&toy("gpt2", "llama"), "tok-llama")?;
        assert!(
            e.contains("`tokenizer.ggml.model`")
                && e.contains("unsupported tokenizer model `llama`"),
            "{e}"
        );
        let e = msg(&toy("tekken-ish", "gpt2"), "tok-pre")?;
        assert!(
            e.contains("`tokenizer.ggml.pre`") && e.contains("`tekken-ish`"),
            "{e}"
        );
        let mut w = toy("gpt2", "gpt2");
        w.kv_str_array("tokenizer.ggml.merges", &["ab"]);
        assert!(
            matches!(w.open("tok-dup"), Err(GgufError::Malformed { .. })),
            "duplicate key"
        );
        let mut w = Writer::new();
        w.kv_str("tokenizer.ggml.model", "gpt2")
            .kv_str_array("tokenizer.ggml.tokens", &["a", "b"]);
        w.kv_str_array("tokenizer.ggml.merges", &["ab"]);
        let e = msg(&w, "tok-merge")?;
        assert!(
            e.contains("`tokenizer.ggml.merges`") && e.contains("entry 0 `ab`"),
            "{e}"
        );
        let e = msg(Writer::new().kv_str("x", "y"), "tok-none")?;
        assert!(e.contains("`tokenizer.ggml.model` is missing"), "{e}");
        Ok(())
    }

    /// Token ids produced by Python (transformers 5.23 / tokenizers 0.23 / gguf 0.19): the
    /// tokenizer `transformers.integrations.gguf.gguf_tokenizer_mapping.convert_gguf_tokenizer`
    /// builds from this file's metadata (read with `gguf.GGUFReader`), and the same with the
    /// pre-tokenizer replaced by `Sequence[Digits(individual_digits=True), ByteLevel(False)]`
    /// (SmolLM2's own `tokenizer.json` shape); both gave identical ids for every text here.
    const SMOLLM2_REFERENCE: &[(&str, &[u32])] = &[
        ("The capital of France is", &[504, 3575, 282, 4649, 314]),
        (
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
            &[
                1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018,
                411, 407, 19712, 8182, 2, 198, 1, 4093, 198, 1780, 314, 216, 34, 27, 34, 47, 2,
                198, 1, 520, 9531, 198,
            ],
        ),
        (
            "In 2024, 3.14 apples cost $12.",
            &[
                788, 216, 34, 32, 34, 36, 28, 216, 35, 30, 33, 36, 13855, 1708, 1885, 33, 34, 30,
            ],
        ),
        (
            "abc123def 4567x",
            &[25276, 33, 34, 35, 1604, 216, 36, 37, 38, 39, 104],
        ),
        (
            "a   b\n\n\n  c\t\td ",
            &[81, 256, 278, 1116, 3805, 265, 197, 197, 84, 216],
        ),
        (
            "fn main() { println!(\"{}\", x[0]); }",
            &[
                7853, 1085, 1000, 1662, 1628, 34115, 17, 43331, 1002, 1792, 75, 32, 2255, 43, 4029,
            ],
        ),
        (
            "héllo wörld — ünïcödé 日本語 🙂",
            &[
                88, 2756, 31394, 267, 29989, 400, 1841, 5549, 137, 94, 25972, 83, 7466, 84, 2756,
                17097, 241, 115, 40993, 179, 120, 248, 47526,
            ],
        ),
        (
            "don't I'll we've THEY'RE",
            &[12420, 982, 339, 3060, 392, 3543, 6462, 73, 23, 3256],
        ),
        ("2024", &[34, 32, 34, 36]),
    ];

    #[test]
    fn smollm2_matches_python_reference() -> TestResult {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
        if !path.exists() {
            println!("skipping: {} not present", path.display());
            return Ok(());
        }
        let t = from_gguf(&GgufFile::open(&path)?)?;
        assert_eq!((t.bos_id, t.eos_id, t.add_bos), (Some(1), Some(2), false));
        assert!(
            t.chat_template
                .as_deref()
                .is_some_and(|c| c.contains("<|im_start|>"))
        );
        assert_eq!(t.tokenizer.get_vocab_size(true), 49152);
        assert_eq!(ids(&t, "<|im_start|>", false)?, [1]);
        assert_eq!(t.tokenizer.token_to_id("<|im_end|>"), Some(2));
        for &(text, want) in SMOLLM2_REFERENCE {
            assert_eq!(ids(&t, text, true)?, want, "{text:?}");
            assert_eq!(t.tokenizer.decode(want, false)?, text);
        }
        assert_eq!(t.tokenizer.decode(&[1, 504, 3575, 2], true)?, "The capital");
        Ok(())
    }
}

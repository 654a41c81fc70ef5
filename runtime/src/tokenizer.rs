//! Text in and out: a `tokenizers::Tokenizer` (from `tokenizer.json` or built from GGUF
//! metadata) plus the pieces generation needs — the chat template (rendered with minijinja, as
//! transformers renders it with Jinja2), BOS/EOS strings, and whether plain prompts get the
//! tokenizer's special tokens.

use std::path::Path;

use minijinja::{Environment, ErrorKind, context};
use serde_json::Value;

use crate::error::{ModelError, ModelResult};

pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
    chat_template: Option<String>,
    bos_token: Option<String>,
    eos_token: Option<String>,
    /// Where the tokenizer came from, for error messages.
    origin: String,
}

impl TextTokenizer {
    pub fn new(
        inner: tokenizers::Tokenizer,
        chat_template: Option<String>,
        bos_token: Option<String>,
        eos_token: Option<String>,
        origin: String,
    ) -> Self {
        Self {
            inner,
            chat_template,
            bos_token,
            eos_token,
            origin,
        }
    }

    /// Loads `tokenizer.json` and, when present, `tokenizer_config.json` from a model folder.
    pub fn from_hf_dir(dir: &Path) -> ModelResult<Option<Self>> {
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            return Ok(None);
        }
        let inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| ModelError::file(&path, format!("cannot load tokenizer: {e}")))?;
        let cfg_path = dir.join("tokenizer_config.json");
        let (mut template, mut bos, mut eos) = (None, None, None);
        if cfg_path.exists() {
            let cfg = crate::model::hf::read_json(&cfg_path)?;
            template = match cfg.get("chat_template") {
                Some(Value::String(s)) => Some(s.clone()),
                // Several named templates: the default one is what `apply_chat_template` uses.
                Some(Value::Array(list)) => list
                    .iter()
                    .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                    .and_then(|t| {
                        t.get("template")
                            .and_then(Value::as_str)
                            .map(str::to_string)
                    }),
                _ => None,
            };
            bos = special_token_text(cfg.get("bos_token"));
            eos = special_token_text(cfg.get("eos_token"));
        }
        let jinja = dir.join("chat_template.jinja");
        if template.is_none() && jinja.exists() {
            template = Some(
                std::fs::read_to_string(&jinja)
                    .map_err(|e| ModelError::file(&jinja, e.to_string()))?,
            );
        }
        Ok(Some(Self::new(
            inner,
            template,
            bos,
            eos,
            path.display().to_string(),
        )))
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }

    pub fn has_chat_template(&self) -> bool {
        self.chat_template.is_some()
    }

    /// Encodes `text`; `add_special` adds what the tokenizer's post-processor adds (e.g. BOS),
    /// as `tokenizer(text)` does in transformers. Chat-rendered text already carries its
    /// special tokens, so it is encoded with `add_special = false`.
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>, String> {
        self.inner
            .encode(text, add_special)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| format!("tokenizer {}: {e}", self.origin))
    }

    /// Decodes generated ids, leaving special tokens out.
    pub fn decode(&self, ids: &[u32]) -> Result<String, String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| format!("tokenizer {}: {e}", self.origin))
    }

    /// Renders the model's chat template for one user message, with the generation prompt.
    pub fn render_chat(&self, user_message: &str) -> Result<String, String> {
        let template = self.chat_template.as_deref().ok_or_else(|| {
            format!(
                "--chat was given but the model ({}) has no chat template",
                self.origin
            )
        })?;
        let mut env = Environment::new();
        env.add_function(
            "raise_exception",
            |msg: String| -> Result<String, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
            },
        );
        env.add_function("strftime_now", |_fmt: String| -> String { String::new() });
        env.add_template("chat", template)
            .map_err(|e| format!("chat template of {}: {e}", self.origin))?;
        let tmpl = env.get_template("chat").map_err(|e| e.to_string())?;
        tmpl.render(context! {
            messages => vec![context! { role => "user", content => user_message }],
            add_generation_prompt => true,
            bos_token => self.bos_token.clone().unwrap_or_default(),
            eos_token => self.eos_token.clone().unwrap_or_default(),
        })
        .map_err(|e| format!("chat template of {}: {e}", self.origin))
    }
}

fn special_token_text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

//! The batch job's files. Input: JSONL items `{"id", "prompt" | "input_ids", optional
//! "max_new_tokens", "temperature", "top_p", "seed", "stop"}`. Output: JSONL records appended as
//! sequences finish, flushed at once and synced at checkpoints, so a kill loses no line already
//! written; `--resume` reads the ids already present (cutting off a torn last line) and skips them.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::Value;

#[derive(Debug, thiserror::Error)]
pub enum JobIoError {
    #[error("{path}: {message}")]
    File { path: String, message: String },
}

fn file_err(path: &Path, message: impl Into<String>) -> JobIoError {
    JobIoError::File {
        path: path.display().to_string(),
        message: message.into(),
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum ItemInput {
    Prompt(String),
    Ids(Vec<u32>),
}

/// One valid input line, with its 1-based line number.
#[derive(Clone, Debug)]
pub struct JobItem {
    pub line: usize,
    pub id: Value,
    pub input: ItemInput,
    pub max_new_tokens: Option<usize>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
}

/// An input line that cannot become an item; it becomes an error record in OUT.
#[derive(Clone, Debug)]
pub struct BadLine {
    pub line: usize,
    pub id: Value,
    pub error: String,
}

/// A key for an id that treats `7` and `"7"` as different, as JSON does.
pub fn id_key(id: &Value) -> String {
    id.to_string()
}

pub fn read_input(path: &Path) -> Result<Vec<Result<JobItem, BadLine>>, JobIoError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| file_err(path, format!("cannot read input: {e}")))?;
    Ok(text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| parse_line(i + 1, l))
        .collect())
}

pub fn parse_line(line: usize, text: &str) -> Result<JobItem, BadLine> {
    let bad = |id: Value, error: String| BadLine { line, id, error };
    let v: Value =
        serde_json::from_str(text).map_err(|e| bad(Value::Null, format!("invalid JSON: {e}")))?;
    let obj = v
        .as_object()
        .ok_or_else(|| bad(Value::Null, "expected a JSON object".into()))?;
    let id = match obj.get("id") {
        Some(id @ (Value::String(_) | Value::Number(_))) => id.clone(),
        Some(other) => {
            return Err(bad(
                Value::Null,
                format!("`id` must be a string or a number, found {other}"),
            ));
        }
        None => return Err(bad(Value::Null, "missing `id`".into())),
    };
    let input = match (obj.get("prompt"), obj.get("input_ids")) {
        (Some(_), Some(_)) => {
            return Err(bad(
                id,
                "give either `prompt` or `input_ids`, not both".into(),
            ));
        }
        (Some(Value::String(p)), None) => ItemInput::Prompt(p.clone()),
        (Some(other), None) => {
            return Err(bad(id, format!("`prompt` must be a string, found {other}")));
        }
        (None, Some(Value::Array(ids))) => {
            let mut out = Vec::with_capacity(ids.len());
            for t in ids {
                match t.as_u64().filter(|&x| x <= u32::MAX as u64) {
                    Some(x) => out.push(x as u32),
                    None => {
                        return Err(bad(
                            id,
                            format!("`input_ids` must hold non-negative integers, found {t}"),
                        ));
                    }
                }
            }
            ItemInput::Ids(out)
        }
        (None, Some(other)) => {
            return Err(bad(
                id,
                format!("`input_ids` must be a list of integers, found {other}"),
            ));
        }
        (None, None) => return Err(bad(id, "missing `prompt` or `input_ids`".into())),
    };
    let num = |key: &str| -> Result<Option<f64>, BadLine> {
        match obj.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(x) => x
                .as_f64()
                .map(Some)
                .ok_or_else(|| bad(id.clone(), format!("`{key}` must be a number, found {x}"))),
        }
    };
    let max_new_tokens = match num("max_new_tokens")? {
        Some(x) if x < 0.0 || x.fract() != 0.0 => {
            return Err(bad(
                id,
                format!("`max_new_tokens` must be a non-negative integer, found {x}"),
            ));
        }
        other => other.map(|x| x as usize),
    };
    let temperature = num("temperature")?.map(|x| x as f32);
    if temperature.is_some_and(|t| t < 0.0) {
        return Err(bad(id, "`temperature` must be >= 0".into()));
    }
    let top_p = num("top_p")?.map(|x| x as f32);
    if top_p.is_some_and(|p| !(p > 0.0 && p <= 1.0)) {
        return Err(bad(id, "`top_p` must be in (0, 1]".into()));
    }
    let seed = match obj.get("seed") {
        None | Some(Value::Null) => None,
        Some(s) => Some(s.as_u64().ok_or_else(|| {
            bad(
                id.clone(),
                format!("`seed` must be a non-negative integer, found {s}"),
            )
        })?),
    };
    let stop = match obj.get("stop") {
        None | Some(Value::Null) => vec![],
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .map(|s| {
                s.as_str().map(str::to_string).ok_or_else(|| {
                    bad(
                        id.clone(),
                        format!("`stop` entries must be strings, found {s}"),
                    )
                })
            })
            .collect::<Result<_, _>>()?,
        Some(other) => {
            return Err(bad(
                id,
                format!("`stop` must be a string or a list of strings, found {other}"),
            ));
        }
    };
    if stop.iter().any(String::is_empty) {
        return Err(bad(id, "`stop` strings must not be empty".into()));
    }
    Ok(JobItem {
        line,
        id,
        input,
        max_new_tokens,
        temperature,
        top_p,
        seed,
        stop,
    })
}

#[derive(Serialize)]
pub struct OutputRecord<'a> {
    pub id: &'a Value,
    pub output_ids: &'a [u32],
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text: Option<&'a str>,
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    pub finish_reason: &'a str,
}

#[derive(Serialize)]
pub struct ErrorRecord<'a> {
    pub id: &'a Value,
    pub error: &'a str,
    pub line: usize,
}

/// Appends records to OUT. Each record goes out in one `write` as soon as it is made; `fsync`
/// runs every `SYNC_EVERY_LINES` lines or `SYNC_EVERY` seconds, and on drop.
pub struct OutputWriter {
    file: File,
    path: PathBuf,
    unsynced: usize,
    last_sync: Instant,
}

const SYNC_EVERY_LINES: usize = 32;
const SYNC_EVERY: Duration = Duration::from_secs(5);

impl OutputWriter {
    /// Opens OUT for appending. Without `resume`, an existing non-empty OUT is refused rather
    /// than overwritten. With `resume`, returns the ids it already holds; a torn last line (a
    /// kill mid-write) is cut off first.
    pub fn open(path: &Path, resume: bool) -> Result<(Self, HashSet<String>), JobIoError> {
        let exists_nonempty = path.metadata().map(|m| m.len() > 0).unwrap_or(false);
        if exists_nonempty && !resume {
            return Err(file_err(
                path,
                "output file already exists; pass --resume to continue it, or remove it",
            ));
        }
        let mut file = OpenOptions::new()
            .read(true)
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| file_err(path, format!("cannot open output: {e}")))?;
        let mut done = HashSet::new();
        if exists_nonempty {
            let mut text = String::new();
            file.read_to_string(&mut text)
                .map_err(|e| file_err(path, format!("cannot read for --resume: {e}")))?;
            let complete = text.rfind('\n').map_or(0, |i| i + 1);
            if complete < text.len() {
                file.set_len(complete as u64)
                    .map_err(|e| file_err(path, format!("cannot cut torn last line: {e}")))?;
                file.seek(SeekFrom::End(0))
                    .map_err(|e| file_err(path, e.to_string()))?;
                tracing::warn!(
                    "{}: dropped a torn last line from an interrupted run",
                    path.display()
                );
            }
            for (i, line) in text[..complete].lines().enumerate() {
                match serde_json::from_str::<Value>(line)
                    .ok()
                    .and_then(|v| v.get("id").cloned())
                {
                    Some(id) => {
                        done.insert(id_key(&id));
                    }
                    None => tracing::warn!(
                        "{}:{}: not an output record, ignored by --resume",
                        path.display(),
                        i + 1
                    ),
                }
            }
        }
        Ok((
            Self {
                file,
                path: path.to_path_buf(),
                unsynced: 0,
                last_sync: Instant::now(),
            },
            done,
        ))
    }

    pub fn write<T: Serialize>(&mut self, record: &T) -> Result<(), JobIoError> {
        let mut line =
            serde_json::to_vec(record).map_err(|e| file_err(&self.path, e.to_string()))?;
        line.push(b'\n');
        self.file
            .write_all(&line)
            .map_err(|e| file_err(&self.path, format!("cannot write output: {e}")))?;
        self.unsynced += 1;
        if self.unsynced >= SYNC_EVERY_LINES || self.last_sync.elapsed() >= SYNC_EVERY {
            self.sync()?;
        }
        Ok(())
    }

    pub fn sync(&mut self) -> Result<(), JobIoError> {
        if self.unsynced > 0 {
            self.file
                .sync_data()
                .map_err(|e| file_err(&self.path, format!("cannot sync output: {e}")))?;
        }
        self.unsynced = 0;
        self.last_sync = Instant::now();
        Ok(())
    }
}

impl Drop for OutputWriter {
    fn drop(&mut self) {
        let _ = self.sync();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_good_lines_and_names_problems_in_bad_ones() {
        let ok = parse_line(
            1,
            r#"{"id": 3, "prompt": "hi", "max_new_tokens": 5, "stop": ["\n"], "seed": 9}"#,
        )
        .expect("ok");
        assert_eq!(ok.input, ItemInput::Prompt("hi".into()));
        assert_eq!(
            (ok.max_new_tokens, ok.seed, ok.stop.len()),
            (Some(5), Some(9), 1)
        );
        let ids = parse_line(2, r#"{"id": "a", "input_ids": [1, 2, 3]}"#).expect("ids");
        assert_eq!(ids.input, ItemInput::Ids(vec![1, 2, 3]));
        for (text, needle) in [
            ("{not json", "invalid JSON"),
            (r#"[1]"#, "object"),
            (r#"{"prompt": "x"}"#, "missing `id`"),
            (r#"{"id": 1}"#, "missing `prompt`"),
            (r#"{"id": 1, "input_ids": [1, -2]}"#, "non-negative"),
            (r#"{"id": 1, "prompt": "x", "top_p": 0}"#, "top_p"),
            (
                r#"{"id": 1, "prompt": "x", "max_new_tokens": 1.5}"#,
                "max_new_tokens",
            ),
        ] {
            let err = parse_line(7, text).expect_err(text);
            assert!(err.error.contains(needle), "{text}: {}", err.error);
            assert_eq!(err.line, 7);
        }
    }

    #[test]
    fn resume_cuts_a_torn_line_and_reports_done_ids() {
        let dir = std::env::temp_dir().join(format!("strata-jobio-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("out.jsonl");
        std::fs::write(&path, "{\"id\":1,\"output_ids\":[]}\n{\"id\":\"b\",\"error\":\"x\",\"line\":2}\n{\"id\":3,\"outp").expect("write");
        assert!(
            OutputWriter::open(&path, false).is_err(),
            "refuses to clobber without --resume"
        );
        let (mut w, done) = OutputWriter::open(&path, true).expect("resume");
        assert_eq!(done, HashSet::from(["1".to_string(), "\"b\"".to_string()]));
        w.write(&ErrorRecord {
            id: &Value::from(4),
            error: "e",
            line: 4,
        })
        .expect("append");
        drop(w);
        let text = std::fs::read_to_string(&path).expect("read");
        assert_eq!(text.lines().count(), 3);
        assert!(text.ends_with("\"line\":4}\n"));
        std::fs::remove_dir_all(&dir).ok();
    }
}

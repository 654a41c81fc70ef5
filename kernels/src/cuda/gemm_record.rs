//! The GEMM autotuner's record: what `lt.rs` timed fastest for each problem, kept on disk per
//! machine so that later processes (and every other backend of this one) run the algorithm it
//! chose without timing again.
//!
//! Why keep it: timing costs about 36 GEMMs per problem on its first call, and timings are
//! noisy, so two processes that each timed for themselves could pick different algorithms and
//! round differently. With the record, every run on a machine after the first uses the same
//! algorithms and pays nothing.
//!
//! - **Where**: `$XDG_CACHE_HOME/strata/gemm` or `~/.cache/strata/gemm`, one file per
//!   [`machine`] description (GPU, compute capability, cuBLASLt and CUDA runtime versions, the
//!   tuner's settings), named by its hash. A cuBLASLt algorithm is an opaque 64-byte value that
//!   NVIDIA documents as reusable with the same library version, which is why the version is
//!   part of the name. A restored algorithm is still checked with `cublasLtMatmulAlgoCheck`
//!   before use (see `lt.rs`).
//! - **Format**: a header line with the hash of the rest, then one line per problem; written to
//!   a temporary name and renamed. A file whose hash does not match, or with a line that does
//!   not parse, is not used (the backend says why: [`TuningRecord::problem`]) and is rewritten
//!   at the next tuning. Before writing, entries another process added meanwhile are merged in.
//! - **Sharing in a process**: [`shared`] hands every backend of one machine description and
//!   folder the same record, and a tuning holds its lock, so one process tunes a problem once and
//!   two backends never time on the same GPU at the same time.
//! - Only timed outcomes are kept (a cuBLASLt algorithm, or GemmEx timed faster); the others
//!   (unaligned operands, no algorithm offered) are decided again without timing.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::GemmPrecision;
use super::compile::fnv1a64;
use super::lt::{HalfType, TuneKey};

const MAGIC: &str = "# strata-gemm-tunings v1 fnv1a64=";

/// A timed outcome, as recorded.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum Recorded {
    /// GemmEx ran faster than cuBLASLt's fastest candidate (ms per call of each).
    GemmEx { gemm_ex_ms: f64, lt_ms: f64 },
    /// cuBLASLt's `rank`-th candidate of `candidates`, its bytes in `algo`.
    Lt {
        rank: usize,
        candidates: usize,
        ms: f64,
        first_ms: Option<f64>,
        algo: [u64; 8],
    },
}

/// The default folder for records, when the environment names a home.
pub fn default_gemm_record_dir() -> Option<PathBuf> {
    super::compile::default_ptx_cache_dir().and_then(|p| Some(p.parent()?.join("gemm")))
}

/// What a record is valid for: the device, the libraries and the tuner's settings (a change of
/// any gives a different file).
pub(super) fn machine(device: &str, cc: (i32, i32), lt_version: usize, cudart: usize) -> String {
    format!(
        "{device}, sm_{}{}, cuBLASLt {lt_version}, CUDA runtime {cudart}, {} candidates x {} \
         timed runs, {} MiB workspace, no split-K",
        cc.0,
        cc.1,
        super::lt::CANDIDATES,
        super::lt::TIMED_RUNS,
        super::lt::WORKSPACE_BYTES >> 20
    )
}

/// The tunings of one machine description, and the file that keeps them.
#[derive(Debug)]
pub(super) struct TuningRecord {
    machine: String,
    /// `None`: kept in this process only.
    path: Option<PathBuf>,
    entries: HashMap<TuneKey, Recorded>,
    /// How many entries came from the file when it was opened.
    loaded: usize,
    /// Why the file was not used, or could not be written, if so.
    problem: Option<String>,
}

impl TuningRecord {
    /// The record of `machine` in `dir` (read when present), or an empty one kept in memory only
    /// when `dir` is `None`.
    pub(super) fn open(dir: Option<&Path>, machine: String) -> Self {
        let path = dir.map(|d| d.join(format!("gemm-{:016x}.txt", fnv1a64(&[machine.as_bytes()]))));
        let mut record = TuningRecord {
            machine,
            path,
            entries: HashMap::new(),
            loaded: 0,
            problem: None,
        };
        if let Some(path) = record.path.clone() {
            match read(&path) {
                Ok(Some(entries)) => {
                    record.loaded = entries.len();
                    record.entries = entries;
                }
                Ok(None) => {}
                Err(e) => record.problem = Some(e),
            }
        }
        record
    }

    pub(super) fn get(&self, key: &TuneKey) -> Option<Recorded> {
        self.entries.get(key).copied()
    }

    /// Adds (or replaces) `key`'s outcome and rewrites the file, merging in what another process
    /// wrote since (this process's entries win). A write that fails is remembered in
    /// [`Self::problem`]; the entry still holds for this process.
    pub(super) fn insert(&mut self, key: TuneKey, outcome: Recorded) {
        self.entries.insert(key, outcome);
        let Some(path) = self.path.clone() else {
            return;
        };
        if let Ok(Some(theirs)) = read(&path) {
            for (k, v) in theirs {
                self.entries.entry(k).or_insert(v);
            }
        }
        match write(&path, &render(&self.machine, &self.entries)) {
            Ok(()) => self.problem = None,
            Err(e) => self.problem = Some(format!("could not write {}: {e}", path.display())),
        }
    }

    pub(super) fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    pub(super) fn loaded(&self) -> usize {
        self.loaded
    }

    pub(super) fn len(&self) -> usize {
        self.entries.len()
    }

    pub(super) fn problem(&self) -> Option<&str> {
        self.problem.as_deref()
    }
}

/// Records open in this process, by folder and machine description.
type OpenRecords = Vec<((Option<PathBuf>, String), Arc<Mutex<TuningRecord>>)>;
static OPEN: Mutex<OpenRecords> = Mutex::new(Vec::new());

/// The record every backend of this process with this `dir` and `machine` shares (opened on
/// first use).
pub(super) fn shared(dir: Option<PathBuf>, machine: String) -> Arc<Mutex<TuningRecord>> {
    let mut open = OPEN.lock().unwrap_or_else(|p| p.into_inner());
    let id = (dir, machine);
    if let Some((_, r)) = open.iter().find(|(k, _)| *k == id) {
        return r.clone();
    }
    let r = Arc::new(Mutex::new(TuningRecord::open(
        id.0.as_deref(),
        id.1.clone(),
    )));
    open.push((id, r.clone()));
    r
}

/// The entries of the file at `path`: `Ok(None)` when there is none, `Err` naming the file and
/// what is wrong with it.
fn read(path: &Path) -> Result<Option<HashMap<TuneKey, Recorded>>, String> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    parse(&text)
        .map(Some)
        .map_err(|e| format!("{}: {e}; tuning again", path.display()))
}

/// Parses a record's text (see the module header); errors name the line.
fn parse(text: &str) -> Result<HashMap<TuneKey, Recorded>, String> {
    let (header, body) = text.split_once('\n').ok_or("no header line")?;
    let want = header
        .strip_prefix(MAGIC)
        .and_then(|h| u64::from_str_radix(h.trim(), 16).ok())
        .ok_or("line 1: not a strata GEMM tuning record")?;
    if fnv1a64(&[body.as_bytes()]) != want {
        return Err("its checksum does not match (torn or edited)".into());
    }
    let mut entries = HashMap::new();
    for (i, line) in body.lines().enumerate() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let (key, outcome) = parse_line(line).map_err(|e| format!("line {}: {e}", i + 2))?;
        entries.insert(key, outcome);
    }
    Ok(entries)
}

fn parse_line(line: &str) -> Result<(TuneKey, Recorded), String> {
    let f: Vec<&str> = line.split_whitespace().collect();
    let int = |i: usize| -> Result<usize, String> {
        f.get(i)
            .ok_or_else(|| format!("missing field {}", i + 1))?
            .parse()
            .map_err(|_| format!("field {} is not an integer: {:?}", i + 1, f[i]))
    };
    let float = |i: usize| -> Result<f64, String> {
        let v: f64 = f
            .get(i)
            .ok_or_else(|| format!("missing field {}", i + 1))?
            .parse()
            .map_err(|_| format!("field {} is not a number: {:?}", i + 1, f[i]))?;
        if v.is_finite() && v >= 0.0 {
            Ok(v)
        } else {
            Err(format!("field {} is not a time: {v}", i + 1))
        }
    };
    let dtype = match f.get(3).copied() {
        Some("f16") => HalfType::F16,
        Some("bf16") => HalfType::BF16,
        other => return Err(format!("field 4: expected f16 or bf16, got {other:?}")),
    };
    let precision = match f.get(4).copied() {
        Some("split") => GemmPrecision::Split,
        Some("rounded") => GemmPrecision::Rounded,
        other => return Err(format!("field 5: expected split or rounded, got {other:?}")),
    };
    let align = |i: usize| -> Result<u32, String> {
        let a = int(i)?;
        if a.is_power_of_two() && a <= 256 {
            Ok(a as u32)
        } else {
            Err(format!(
                "field {}: alignment {a} is not a power of two up to 256",
                i + 1
            ))
        }
    };
    let key = TuneKey {
        m: int(0)?,
        n: int(1)?,
        k: int(2)?,
        dtype,
        precision,
        align: [align(5)?, align(6)?, align(7)?],
    };
    let outcome = match f.get(8).copied() {
        Some("gemmex") if f.len() == 11 => Recorded::GemmEx {
            gemm_ex_ms: float(9)?,
            lt_ms: float(10)?,
        },
        Some("lt") if f.len() == 21 => {
            let first_ms = match f[12] {
                "-" => None,
                _ => Some(float(12)?),
            };
            let mut algo = [0u64; 8];
            for (j, a) in algo.iter_mut().enumerate() {
                *a = u64::from_str_radix(f[13 + j], 16)
                    .map_err(|_| format!("field {}: not a hex word: {:?}", 14 + j, f[13 + j]))?;
            }
            let (rank, candidates) = (int(9)?, int(10)?);
            if rank >= candidates {
                return Err(format!("rank {rank} of {candidates} candidates"));
            }
            Recorded::Lt {
                rank,
                candidates,
                ms: float(11)?,
                first_ms,
                algo,
            }
        }
        Some(kind @ ("gemmex" | "lt")) => {
            return Err(format!("{} fields for `{kind}`", f.len()));
        }
        other => return Err(format!("field 9: expected gemmex or lt, got {other:?}")),
    };
    Ok((key, outcome))
}

/// The file's text: header, the machine as a comment, then the entries sorted (stable output).
/// Times are written in the shortest form that reads back to the same `f64`, so a restored
/// choice equals the one timed.
fn render(machine: &str, entries: &HashMap<TuneKey, Recorded>) -> String {
    let mut body = format!(
        "# {machine}\n# m n k dtype precision align_w align_x align_out then: gemmex \
         gemm_ex_ms lt_ms | lt rank candidates ms first_ms algo[8]\n"
    );
    let mut keys: Vec<&TuneKey> = entries.keys().collect();
    keys.sort_by_key(|k| (k.n, k.k, k.m, k.dtype as u8, k.precision.to_u8(), k.align));
    for key in keys {
        let dtype = match key.dtype {
            HalfType::F16 => "f16",
            HalfType::BF16 => "bf16",
        };
        let precision = match key.precision {
            GemmPrecision::Split => "split",
            GemmPrecision::Rounded => "rounded",
        };
        let [a, b, c] = key.align;
        let _ = write!(
            body,
            "{} {} {} {dtype} {precision} {a} {b} {c} ",
            key.m, key.n, key.k
        );
        let _ = match entries[key] {
            Recorded::GemmEx { gemm_ex_ms, lt_ms } => {
                writeln!(body, "gemmex {gemm_ex_ms} {lt_ms}")
            }
            Recorded::Lt {
                rank,
                candidates,
                ms,
                first_ms,
                algo,
            } => {
                let first = first_ms.map_or("-".to_string(), |v| v.to_string());
                let words: Vec<String> = algo.iter().map(|w| format!("{w:016x}")).collect();
                writeln!(
                    body,
                    "lt {rank} {candidates} {ms} {first} {}",
                    words.join(" ")
                )
            }
        };
    }
    format!("{MAGIC}{:016x}\n{body}", fnv1a64(&[body.as_bytes()]))
}

/// Writes `text` to `path` atomically (temporary file, then rename).
fn write(path: &Path, text: &str) -> std::io::Result<()> {
    std::fs::create_dir_all(path.parent().unwrap_or(Path::new(".")))?;
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn key(m: usize, precision: GemmPrecision) -> TuneKey {
        TuneKey {
            m,
            n: 4096,
            k: 14336,
            dtype: HalfType::BF16,
            precision,
            align: [256, 256, 16],
        }
    }

    fn lt(rank: usize) -> Recorded {
        Recorded::Lt {
            rank,
            candidates: 8,
            ms: 0.012330666184425354,
            first_ms: Some(0.01708799973130226),
            algo: [1, 2, 3, u64::MAX, 0, 0, 7, 0x8000_0000_0000_0000],
        }
    }

    fn temp_dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("strata-gemm-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn a_record_round_trips_through_its_file() {
        let dir = temp_dir("round-trip");
        let machine = machine("H100", (9, 0), 130000, 13000);
        let mut r = TuningRecord::open(Some(&dir), machine.clone());
        assert_eq!((r.len(), r.loaded(), r.problem()), (0, 0, None));
        r.insert(key(512, GemmPrecision::Split), lt(3));
        let faster = Recorded::GemmEx {
            gemm_ex_ms: 0.25,
            lt_ms: 0.3125,
        };
        r.insert(key(2048, GemmPrecision::Rounded), faster);
        let no_first = Recorded::Lt {
            rank: 0,
            candidates: 1,
            ms: 0.5,
            first_ms: None,
            algo: [9; 8],
        };
        r.insert(key(600, GemmPrecision::Rounded), no_first);
        assert_eq!(r.problem(), None);

        let again = TuningRecord::open(Some(&dir), machine.clone());
        assert_eq!((again.len(), again.loaded(), again.problem()), (3, 3, None));
        assert_eq!(again.get(&key(512, GemmPrecision::Split)), Some(lt(3)));
        assert_eq!(again.get(&key(2048, GemmPrecision::Rounded)), Some(faster));
        assert_eq!(again.get(&key(600, GemmPrecision::Rounded)), Some(no_first));
        assert_eq!(again.get(&key(512, GemmPrecision::Rounded)), None);

        // Another machine description is another file.
        let other = TuningRecord::open(Some(&dir), machine.replace("H100", "H200"));
        assert_eq!(other.len(), 0);
        assert_ne!(other.path(), again.path());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn entries_written_by_another_process_are_merged_not_lost() {
        let dir = temp_dir("merge");
        let m = "test machine".to_string();
        let mut a = TuningRecord::open(Some(&dir), m.clone());
        let mut b = TuningRecord::open(Some(&dir), m.clone());
        a.insert(key(512, GemmPrecision::Split), lt(1));
        b.insert(key(1024, GemmPrecision::Split), lt(2));
        let both = TuningRecord::open(Some(&dir), m);
        assert_eq!(both.len(), 2, "{both:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_damaged_file_is_not_used_and_says_why() {
        let dir = temp_dir("damaged");
        let m = "test machine".to_string();
        let mut r = TuningRecord::open(Some(&dir), m.clone());
        r.insert(key(512, GemmPrecision::Split), lt(1));
        let path = r.path().unwrap().to_path_buf();
        let text = std::fs::read_to_string(&path).unwrap();

        // A torn write: the checksum no longer matches.
        std::fs::write(&path, &text[..text.len() - 5]).unwrap();
        let torn = TuningRecord::open(Some(&dir), m.clone());
        assert_eq!(torn.len(), 0);
        let why = torn.problem().unwrap();
        assert!(
            why.contains("checksum") && why.contains(&*path.to_string_lossy()),
            "{why}"
        );

        // A consistent file with a bad line names the line.
        let body = "# x\n512 4096 14336 bf16 split 256 256 16 lt 9 8 0.5 - 0 0 0 0 0 0 0 0\n";
        let bad = format!("{MAGIC}{:016x}\n{body}", fnv1a64(&[body.as_bytes()]));
        std::fs::write(&path, bad).unwrap();
        let why = TuningRecord::open(Some(&dir), m.clone())
            .problem()
            .unwrap()
            .to_string();
        assert!(
            why.contains("line 3") && why.contains("rank 9 of 8"),
            "{why}"
        );

        // Not a record at all.
        std::fs::write(&path, "hello\nworld\n").unwrap();
        let why = TuningRecord::open(Some(&dir), m.clone())
            .problem()
            .unwrap()
            .to_string();
        assert!(why.contains("line 1"), "{why}");

        // The next tuning rewrites it whole.
        let mut fixed = TuningRecord::open(Some(&dir), m.clone());
        fixed.insert(key(512, GemmPrecision::Split), lt(1));
        assert_eq!(fixed.problem(), None);
        assert_eq!(TuningRecord::open(Some(&dir), m).loaded(), 1);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn lines_that_do_not_parse_are_refused() {
        let good = "512 4096 14336 bf16 split 256 256 16 gemmex 0.25 0.5";
        assert!(parse_line(good).is_ok());
        for (bad, says) in [
            (
                "512 4096 14336 bf8 split 256 256 16 gemmex 0.25 0.5",
                "field 4",
            ),
            (
                "512 4096 14336 bf16 exact 256 256 16 gemmex 0.25 0.5",
                "field 5",
            ),
            (
                "512 4096 14336 bf16 split 255 256 16 gemmex 0.25 0.5",
                "field 6",
            ),
            (
                "512 4096 x bf16 split 256 256 16 gemmex 0.25 0.5",
                "field 3",
            ),
            ("512 4096 14336 bf16 split 256 256 16 gemmex 0.25", "fields"),
            (
                "512 4096 14336 bf16 split 256 256 16 gemmex 0.25 NaN",
                "field 11",
            ),
            (
                "512 4096 14336 bf16 split 256 256 16 cublas 0.25 0.5",
                "field 9",
            ),
        ] {
            let e = parse_line(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn backends_of_one_process_share_a_record() {
        let m = format!("shared test machine {}", std::process::id());
        let a = shared(None, m.clone());
        let b = shared(None, m.clone());
        assert!(Arc::ptr_eq(&a, &b));
        let c = shared(None, m + " other");
        assert!(!Arc::ptr_eq(&a, &c));
        a.lock()
            .unwrap()
            .insert(key(512, GemmPrecision::Split), lt(0));
        assert_eq!(
            b.lock().unwrap().get(&key(512, GemmPrecision::Split)),
            Some(lt(0))
        );
    }
}

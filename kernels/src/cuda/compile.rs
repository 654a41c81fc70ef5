//! Building the CUDA kernels: the `.cu` files of this folder, embedded in the binary, compiled
//! at run time by NVRTC to PTX for the device's architecture, and cached on disk.
//!
//! - One program: `common.cuh` followed by every `.cu` file, compiled once per process with
//!   `--fmad=false` (no FMA contraction, so rounding follows the CPU backend's separate multiply
//!   and add) for `compute_XY` of the device (`compute_90a` on Hopper, for wgmma).
//! - Cache: `$XDG_CACHE_HOME/strata/ptx` or `~/.cache/strata/ptx`, one file per key, the key an
//!   FNV-1a hash of the source, the options, the architecture and the NVRTC version. A file
//!   starts with a header line carrying the hash of the PTX after it; an entry whose hash does
//!   not match, or that the driver refuses to load, is compiled again and rewritten. Entries are
//!   written to a temporary name and renamed, so a crash never leaves half an entry. A cache
//!   that cannot be read or written only costs the compile (about 10 s on an H100 since the
//!   attention variants joined: NVRTC builds 29 attention entry points), never an error.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use cudarc::driver::{CudaContext, CudaModule};
use cudarc::nvrtc::{CompileOptions, Ptx};

/// The program's source files, in the order they are concatenated.
const SOURCES: [(&str, &str); 9] = [
    ("common.cuh", include_str!("common.cuh")),
    ("elementwise.cu", include_str!("elementwise.cu")),
    ("norm.cu", include_str!("norm.cu")),
    ("rope.cu", include_str!("rope.cu")),
    ("gemv.cu", include_str!("gemv.cu")),
    ("attention.cu", include_str!("attention.cu")),
    ("kvtier.cu", include_str!("kvtier.cu")),
    ("prefill.cu", include_str!("prefill.cu")),
    ("prefill_hopper.cu", include_str!("prefill_hopper.cu")),
];

const CACHE_MAGIC: &str = "// strata-ptx v1 fnv1a64=";

/// Where the kernels of a backend came from, for `strata info` and the tests.
#[derive(Clone, Debug, PartialEq)]
pub enum KernelOrigin {
    /// Compiled by NVRTC in this process; `cached_at` is the entry written, if any.
    Compiled {
        seconds: f64,
        cached_at: Option<PathBuf>,
    },
    /// Loaded from the PTX cache.
    Cache { path: PathBuf },
}

impl std::fmt::Display for KernelOrigin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KernelOrigin::Compiled {
                seconds,
                cached_at: Some(p),
            } => write!(
                f,
                "compiled by NVRTC in {seconds:.2} s, cached at {}",
                p.display()
            ),
            KernelOrigin::Compiled {
                seconds,
                cached_at: None,
            } => write!(f, "compiled by NVRTC in {seconds:.2} s (not cached)"),
            KernelOrigin::Cache { path } => write!(f, "loaded from {}", path.display()),
        }
    }
}

/// The whole program text.
pub(crate) fn program_source() -> String {
    let mut s = String::new();
    for (name, text) in SOURCES {
        s.push_str(&format!("// ---- {name} ----\n"));
        s.push_str(text);
        s.push('\n');
    }
    s
}

/// The default cache folder, when the environment names a home.
pub fn default_ptx_cache_dir() -> Option<PathBuf> {
    let non_empty = |v: std::ffi::OsString| (!v.is_empty()).then(|| PathBuf::from(v));
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME").and_then(non_empty) {
        return Some(x.join("strata").join("ptx"));
    }
    std::env::var_os("HOME")
        .and_then(non_empty)
        .map(|h| h.join(".cache").join("strata").join("ptx"))
}

/// `$CUDA_HOME/include` or `/usr/local/cuda/include`, when it exists. Today's kernels include no
/// CUDA header; the path is passed so that kernels which do need no further plumbing.
fn cuda_include_dir() -> Option<String> {
    let from_env = std::env::var_os("CUDA_HOME").map(|h| PathBuf::from(h).join("include"));
    [from_env, Some(PathBuf::from("/usr/local/cuda/include"))]
        .into_iter()
        .flatten()
        .find(|p| p.is_dir())
        .map(|p| p.to_string_lossy().into_owned())
}

fn nvrtc_version() -> (i32, i32) {
    let (mut major, mut minor) = (0, 0);
    // SAFETY: nvrtcVersion writes two ints through pointers to live locals; the caller has
    // checked that libnvrtc loads.
    let _ = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
    (major, minor)
}

/// 64-bit FNV-1a: a stable, dependency-free hash for cache keys and entry checksums (it guards
/// against torn or corrupted files, not against an adversary).
pub(crate) fn fnv1a64(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for &b in *part {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        // Separate the parts so that ("ab", "c") and ("a", "bc") differ.
        h ^= 0xff;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The NVRTC options for compute capability `cc`, and the cache key's architecture name. Hopper
/// (9.0) gets `compute_90a`, whose PTX runs on 9.0 devices only and may use wgmma (the prefill
/// kernels of prefill_hopper.cu).
fn options_for(cc: (i32, i32)) -> (String, Vec<String>) {
    let suffix = if cc == (9, 0) { "a" } else { "" };
    let arch = format!("compute_{}{}{suffix}", cc.0, cc.1);
    let mut options = vec![format!("--gpu-architecture={arch}")];
    if let Some(dir) = cuda_include_dir() {
        options.push(format!("--include-path={dir}"));
    }
    (arch, options)
}

/// Compiles the program for compute capability `cc` to PTX text. Needs libnvrtc, not a GPU.
pub(crate) fn compile(cc: (i32, i32)) -> Result<String, String> {
    let (arch, options) = options_for(cc);
    let (major, minor) = nvrtc_version();
    let opts = CompileOptions {
        fmad: Some(false),
        options,
        name: Some("strata_kernels.cu".into()),
        ..Default::default()
    };
    let ptx = cudarc::nvrtc::compile_ptx_with_opts(program_source(), opts).map_err(|e| {
        format!(
            "NVRTC {major}.{minor} ({arch}) failed: {}",
            describe_compile_error(&e)
        )
    })?;
    ptx_text(&ptx).ok_or_else(|| "NVRTC returned PTX that is not text".into())
}

/// Loads the kernel program into `ctx` for a device of compute capability `cc`, from the cache
/// in `cache_dir` when it holds a good entry, else compiled (and cached). `bind` looks up the
/// functions; a cached module it rejects is compiled again.
pub(crate) fn build_module<T>(
    ctx: &Arc<CudaContext>,
    cc: (i32, i32),
    cache_dir: Option<&Path>,
    bind: impl Fn(&Arc<CudaModule>) -> Result<T, String>,
) -> Result<(T, KernelOrigin), String> {
    let (arch, options) = options_for(cc);
    let (major, minor) = nvrtc_version();
    let key = fnv1a64(&[
        program_source().as_bytes(),
        options.join(" ").as_bytes(),
        b"--fmad=false",
        format!("nvrtc {major}.{minor}").as_bytes(),
    ]);
    let entry = cache_dir.map(|d| d.join(format!("kernels-{arch}-{key:016x}.ptx")));

    if let Some(path) = &entry
        && let Some(ptx) = read_cache_entry(path)
        && let Ok(bound) = load(ctx, ptx).and_then(|m| bind(&m))
    {
        return Ok((bound, KernelOrigin::Cache { path: path.clone() }));
    }

    let t0 = Instant::now();
    let text = compile(cc)?;
    let bound = bind(&load(ctx, text.clone())?)?;
    let seconds = t0.elapsed().as_secs_f64();
    let cached_at = entry.filter(|p| write_cache_entry(p, &text).is_ok());
    Ok((bound, KernelOrigin::Compiled { seconds, cached_at }))
}

fn describe_compile_error(e: &cudarc::nvrtc::CompileError) -> String {
    match e {
        cudarc::nvrtc::CompileError::CompileError { nvrtc, log, .. } => {
            format!("{nvrtc:?}\n{}", log.to_string_lossy())
        }
        other => format!("{other:?}"),
    }
}

fn ptx_text(ptx: &Ptx) -> Option<String> {
    let bytes = ptx.as_bytes()?;
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8(bytes[..end].to_vec()).ok()
}

fn load(ctx: &Arc<CudaContext>, ptx: String) -> Result<Arc<CudaModule>, String> {
    // cudarc turns the text into a C string and panics on an interior NUL; cached text is
    // checksummed and `ptx_text` stops at the first NUL, but check anyway.
    if ptx.contains('\0') {
        return Err("PTX contains a NUL byte".into());
    }
    ctx.load_module(Ptx::from_src(ptx))
        .map_err(|e| format!("the driver refused the PTX: {e}"))
}

/// The PTX of a cache entry, or `None` when it is missing, torn or corrupted.
pub(crate) fn read_cache_entry(path: &Path) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    let (header, body) = text.split_once('\n')?;
    let want = u64::from_str_radix(header.strip_prefix(CACHE_MAGIC)?, 16).ok()?;
    (fnv1a64(&[body.as_bytes()]) == want && !body.is_empty()).then(|| body.to_string())
}

/// Writes an entry atomically (temporary file, then rename).
pub(crate) fn write_cache_entry(path: &Path, ptx: &str) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let header = format!("{CACHE_MAGIC}{:016x}\n", fnv1a64(&[ptx.as_bytes()]));
    std::fs::write(&tmp, header + ptx)?;
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_entries_round_trip_and_corruption_is_detected() -> std::io::Result<()> {
        let dir = std::env::temp_dir().join(format!("strata-ptx-test-{}", std::process::id()));
        let path = dir.join("kernels-compute_90-0.ptx");
        let ptx = ".version 9.0\n.target sm_90\n.address_size 64\n";
        write_cache_entry(&path, ptx)?;
        assert_eq!(read_cache_entry(&path).as_deref(), Some(ptx));

        // One flipped byte in the body.
        let mut bytes = std::fs::read(&path)?;
        let last = bytes.len() - 2;
        bytes[last] ^= 1;
        std::fs::write(&path, &bytes)?;
        assert_eq!(read_cache_entry(&path), None);

        // Torn write: the body cut short.
        write_cache_entry(&path, ptx)?;
        let text = std::fs::read_to_string(&path)?;
        std::fs::write(&path, &text[..text.len() - 10])?;
        assert_eq!(read_cache_entry(&path), None);

        // Garbage, and no file at all.
        std::fs::write(&path, b"\xff\xfe garbage")?;
        assert_eq!(read_cache_entry(&path), None);
        std::fs::remove_file(&path)?;
        assert_eq!(read_cache_entry(&path), None);
        std::fs::remove_dir_all(&dir)
    }

    #[test]
    fn cache_key_parts_are_separated() {
        assert_ne!(fnv1a64(&[b"ab", b"c"]), fnv1a64(&[b"a", b"bc"]));
        assert_eq!(fnv1a64(&[b"x"]), fnv1a64(&[b"x"]));
    }

    /// NVRTC needs no GPU: where libnvrtc is installed, compile the real program (for Hopper
    /// and for Turing, the oldest architecture the kernels are meant for).
    #[test]
    fn the_program_compiles_with_nvrtc_when_present() {
        // SAFETY: a dlopen probe of libnvrtc.
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            eprintln!("skipped: NVRTC not found (libnvrtc.so not loadable)");
            return;
        }
        for cc in [(9, 0), (7, 5)] {
            match compile(cc) {
                Ok(ptx) => {
                    assert!(ptx.contains(".visible .entry rope_inplace"));
                    // Hopper's prefill kernels are compiled, not left as traps.
                    assert_eq!(ptx.contains("wgmma.mma_async"), cc == (9, 0));
                }
                Err(e) => panic!("{e}"),
            }
        }
    }

    #[test]
    fn the_program_contains_every_source_file() {
        let s = program_source();
        for (name, _) in SOURCES {
            assert!(s.contains(&format!("// ---- {name} ----")));
        }
    }
}

//! GGUF reader: memory-maps a `.gguf` file, parses its header, metadata and tensor directory
//! (versions 2 and 3), and turns tensors into [`HostWeight`]s — F32/F16/BF16 as stored, the block
//! formats Q8_0/Q4_0/Q4_1 dequantized to f32. Also owns [`unpermute_qk`], which undoes the Q/K row
//! permutation llama.cpp's converter applies, so weights come out in Hugging Face layout.
//!
//! Every offset and length read from the file is checked against the file's size, so a truncated
//! or corrupt file is an error naming the file (and field or tensor), never a panic.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use memmap2::Mmap;
use rayon::prelude::*;
use strata_kernels::{HostWeight, KernelError, WeightData};

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
/// Arrays nested deeper than this are rejected (guards the recursive parser's stack).
const MAX_ARRAY_DEPTH: usize = 8;
const SUPPORTED_TYPES: &str = "F32, F16, BF16, Q8_0, Q4_0, Q4_1";

#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("{path}: cannot read: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: not a GGUF file (starts with {found:?}, expected \"GGUF\")")]
    BadMagic { path: String, found: Vec<u8> },
    #[error("{path}: GGUF version {version} is not supported (supported: 2, 3)")]
    UnsupportedVersion { path: String, version: u32 },
    #[error("{path}: file is truncated: {what} needs bytes {start}..{end}, but the file has {len}")]
    Truncated {
        path: String,
        what: String,
        start: u64,
        end: u64,
        len: u64,
    },
    #[error("{path}: malformed GGUF: {detail}")]
    Malformed { path: String, detail: String },
    #[error("{path}: metadata key `{key}` is missing")]
    MissingKey { path: String, key: String },
    #[error("{path}: metadata key `{key}` holds {found}, expected {expected}")]
    WrongType {
        path: String,
        key: String,
        expected: &'static str,
        found: String,
    },
    #[error("{path}: no tensor named `{name}`")]
    MissingTensor { path: String, name: String },
    #[error(
        "{path}: tensor `{name}` has type {type_name} ({type_id}), which strata does not support (supported: {SUPPORTED_TYPES})"
    )]
    UnsupportedType {
        path: String,
        name: String,
        type_name: String,
        type_id: u32,
    },
    #[error(
        "{path}: tensor `{name}` data (bytes {start}..{end}) lies outside the file ({len} bytes)"
    )]
    TensorOutOfBounds {
        path: String,
        name: String,
        start: u64,
        end: u64,
        len: u64,
    },
    #[error("{path}: tensor `{name}`: {detail}")]
    BadTensor {
        path: String,
        name: String,
        detail: String,
    },
    #[error("{path}: `{field}`: {detail}")]
    Tokenizer {
        path: String,
        field: String,
        detail: String,
    },
}

type Result<T> = std::result::Result<T, GgufError>;

/// One metadata value, as typed in the file.
#[derive(Clone, Debug, PartialEq)]
pub enum GgufValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<GgufValue>),
}

impl GgufValue {
    /// The value as an integer, if it is one (any width or signedness).
    pub fn as_i128(&self) -> Option<i128> {
        Some(match *self {
            GgufValue::U8(v) => v.into(),
            GgufValue::I8(v) => v.into(),
            GgufValue::U16(v) => v.into(),
            GgufValue::I16(v) => v.into(),
            GgufValue::U32(v) => v.into(),
            GgufValue::I32(v) => v.into(),
            GgufValue::U64(v) => v.into(),
            GgufValue::I64(v) => v.into(),
            _ => return None,
        })
    }

    /// A short description of the value's type for error messages, e.g. `array of string`.
    pub fn type_name(&self) -> String {
        match self {
            GgufValue::U8(_) => "u8".into(),
            GgufValue::I8(_) => "i8".into(),
            GgufValue::U16(_) => "u16".into(),
            GgufValue::I16(_) => "i16".into(),
            GgufValue::U32(_) => "u32".into(),
            GgufValue::I32(_) => "i32".into(),
            GgufValue::U64(_) => "u64".into(),
            GgufValue::I64(_) => "i64".into(),
            GgufValue::F32(_) => "f32".into(),
            GgufValue::F64(_) => "f64".into(),
            GgufValue::Bool(_) => "bool".into(),
            GgufValue::String(_) => "string".into(),
            GgufValue::Array(v) => match v.first() {
                Some(x) => format!("array of {}", x.type_name()),
                None => "empty array".into(),
            },
        }
    }
}

/// A ggml tensor type id with its name; only some are loadable (see [`GgmlType::is_supported`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GgmlType(pub u32);

impl GgmlType {
    pub const F32: GgmlType = GgmlType(0);
    pub const F16: GgmlType = GgmlType(1);
    pub const Q4_0: GgmlType = GgmlType(2);
    pub const Q4_1: GgmlType = GgmlType(3);
    pub const Q8_0: GgmlType = GgmlType(8);
    pub const BF16: GgmlType = GgmlType(30);

    pub fn name(self) -> &'static str {
        // ggml's `enum ggml_type`, ids 0..=39 in order (4, 5 and 31..=33, 36..=38 are retired).
        const NAMES: &str = "F32 F16 Q4_0 Q4_1 Q4_2 Q4_3 Q5_0 Q5_1 Q8_0 Q8_1 Q2_K Q3_K Q4_K Q5_K Q6_K \
            Q8_K IQ2_XXS IQ2_XS IQ3_XXS IQ1_S IQ4_NL IQ3_S IQ2_S IQ4_XS I8 I16 I32 I64 F64 IQ1_M BF16 \
            Q4_0_4_4 Q4_0_4_8 Q4_0_8_8 TQ1_0 TQ2_0 IQ4_NL_4_4 IQ4_NL_4_8 IQ4_NL_8_8 MXFP4";
        NAMES
            .split_whitespace()
            .nth(self.0 as usize)
            .unwrap_or("unknown")
    }

    /// `(values per block, bytes per block)` for the types strata can load.
    fn block_layout(self) -> Option<(u64, u64)> {
        Some(match self {
            GgmlType::F32 => (1, 4),
            GgmlType::F16 | GgmlType::BF16 => (1, 2),
            GgmlType::Q4_0 => (32, 18),
            GgmlType::Q4_1 => (32, 20),
            GgmlType::Q8_0 => (32, 34),
            _ => return None,
        })
    }

    pub fn is_supported(self) -> bool {
        self.block_layout().is_some()
    }
}

/// A tensor's directory entry. `dims` is GGUF order `[ne0, ne1, ...]`, `ne0` fastest-varying.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub name: String,
    pub dims: Vec<u64>,
    pub ggml_type: GgmlType,
    /// Absolute offset of the tensor's data in the file.
    pub offset: u64,
}

impl TensorInfo {
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().fold(1u64, |a, &d| a.saturating_mul(d))
    }
    /// `(rows, cols)` of the [`HostWeight`] this tensor loads as: `cols = ne0`, rows the product
    /// of the other dims (so a vector is `1 × ne0`).
    pub fn shape(&self) -> (u64, u64) {
        let cols = self.dims.first().copied().unwrap_or(1);
        let rows = self
            .dims
            .iter()
            .skip(1)
            .fold(1u64, |a, &d| a.saturating_mul(d));
        (rows, cols)
    }
}

/// An open, memory-mapped GGUF file.
pub struct GgufFile {
    path: PathBuf,
    mmap: Mmap,
    version: u32,
    metadata: Vec<(String, GgufValue)>,
    meta_index: HashMap<String, usize>,
    tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
    alignment: u64,
    data_offset: u64,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata_keys", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

/// Bounds-checked little-endian reader over the mapped bytes.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a str,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: u64, what: &dyn Fn() -> String) -> Result<&'a [u8]> {
        let len = self.buf.len() as u64;
        let start = self.pos as u64;
        let end = start.saturating_add(n);
        if end > len {
            return Err(GgufError::Truncated {
                path: self.path.into(),
                what: what(),
                start,
                end,
                len,
            });
        }
        let s = &self.buf[self.pos..end as usize];
        self.pos = end as usize;
        Ok(s)
    }
    fn array<const N: usize>(&mut self, what: &dyn Fn() -> String) -> Result<[u8; N]> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N as u64, what)?);
        Ok(out)
    }
    fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }
    fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }
    fn string(&mut self, what: &dyn Fn() -> String) -> Result<String> {
        let n = self.u64(what)?;
        let bytes = self.take(n, what)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|_| self.malformed(format!("{} is not valid UTF-8", what())))
    }
    fn remaining(&self) -> u64 {
        (self.buf.len() - self.pos) as u64
    }
    fn malformed(&self, detail: String) -> GgufError {
        GgufError::Malformed {
            path: self.path.into(),
            detail,
        }
    }

    fn value(&mut self, ty: u32, depth: usize, what: &dyn Fn() -> String) -> Result<GgufValue> {
        Ok(match ty {
            0 => GgufValue::U8(u8::from_le_bytes(self.array(what)?)),
            1 => GgufValue::I8(i8::from_le_bytes(self.array(what)?)),
            2 => GgufValue::U16(u16::from_le_bytes(self.array(what)?)),
            3 => GgufValue::I16(i16::from_le_bytes(self.array(what)?)),
            4 => GgufValue::U32(self.u32(what)?),
            5 => GgufValue::I32(i32::from_le_bytes(self.array(what)?)),
            6 => GgufValue::F32(f32::from_le_bytes(self.array(what)?)),
            7 => GgufValue::Bool(self.array::<1>(what)?[0] != 0),
            8 => GgufValue::String(self.string(what)?),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(self.malformed(format!("{} nests arrays too deeply", what())));
                }
                let elem_ty = self.u32(what)?;
                let n = self.u64(what)?;
                // Each element takes at least `min` bytes: a length the rest of the file cannot
                // hold is truncation, found before allocating anything.
                let min: u64 = match elem_ty {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    9 => 12,
                    _ => 8,
                };
                let need = n.saturating_mul(min);
                if need > self.remaining() {
                    let (start, len) = (self.pos as u64, self.buf.len() as u64);
                    let end = start.saturating_add(need);
                    let (path, what) = (self.path.into(), what());
                    return Err(GgufError::Truncated {
                        path,
                        what,
                        start,
                        end,
                        len,
                    });
                }
                let mut v = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    v.push(self.value(elem_ty, depth + 1, what)?);
                }
                GgufValue::Array(v)
            }
            10 => GgufValue::U64(self.u64(what)?),
            11 => GgufValue::I64(i64::from_le_bytes(self.array(what)?)),
            12 => GgufValue::F64(f64::from_le_bytes(self.array(what)?)),
            other => {
                return Err(self.malformed(format!("{} has unknown value type {other}", what())));
            }
        })
    }
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<GgufFile> {
        let p = path.display().to_string();
        let io = |source| GgufError::Io {
            path: p.clone(),
            source,
        };
        let file = File::open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        if len < 4 {
            let what = "the GGUF magic".into();
            return Err(GgufError::Truncated {
                path: p,
                what,
                start: 0,
                end: 4,
                len,
            });
        }
        // SAFETY: the map is read-only and lives as long as `GgufFile`. Model files are treated as
        // immutable while open; another process truncating or rewriting the file underneath us is
        // outside what this reader defends against (as with every mmap-based loader).
        let mmap = unsafe { Mmap::map(&file) }.map_err(io)?;
        Self::parse(path.to_path_buf(), p, mmap)
    }

    fn parse(path: PathBuf, p: String, mmap: Mmap) -> Result<GgufFile> {
        let mut c = Cursor {
            buf: &mmap,
            pos: 0,
            path: &p,
        };
        let magic: [u8; 4] = c.array(&|| "the GGUF magic".into())?;
        if &magic != MAGIC {
            return Err(GgufError::BadMagic {
                path: p,
                found: magic.to_vec(),
            });
        }
        let version = c.u32(&|| "the header".into())?;
        if !(2..=3).contains(&version) {
            return Err(GgufError::UnsupportedVersion { path: p, version });
        }
        let n_tensors = c.u64(&|| "the header".into())?;
        let n_kv = c.u64(&|| "the header".into())?;

        let mut metadata = Vec::with_capacity(n_kv.min(c.remaining() / 13) as usize);
        let mut meta_index = HashMap::new();
        for i in 0..n_kv {
            let key = c.string(&|| format!("metadata entry {i}'s key"))?;
            let what = || format!("metadata `{key}`");
            let ty = c.u32(&what)?;
            let value = c.value(ty, 0, &what)?;
            if meta_index.insert(key.clone(), metadata.len()).is_some() {
                return Err(c.malformed(format!("metadata key `{key}` appears twice")));
            }
            metadata.push((key, value));
        }

        let mut tensors = Vec::with_capacity(n_tensors.min(c.remaining() / 32) as usize);
        let mut tensor_index = HashMap::new();
        for i in 0..n_tensors {
            let name = c.string(&|| format!("tensor {i}'s name"))?;
            let what = || format!("tensor `{name}`'s info");
            let n_dims = c.u32(&what)?;
            if n_dims == 0 || n_dims > 4 {
                return Err(c.malformed(format!(
                    "tensor `{name}` has {n_dims} dims (expected 1..=4)"
                )));
            }
            let dims = (0..n_dims)
                .map(|_| c.u64(&what))
                .collect::<Result<Vec<_>>>()?;
            let ggml_type = GgmlType(c.u32(&what)?);
            let offset = c.u64(&what)?;
            if tensor_index.insert(name.clone(), tensors.len()).is_some() {
                return Err(c.malformed(format!("tensor `{name}` appears twice")));
            }
            tensors.push(TensorInfo {
                name,
                dims,
                ggml_type,
                offset,
            });
        }

        let alignment = match meta_index.get("general.alignment").map(|&i| &metadata[i].1) {
            None => DEFAULT_ALIGNMENT,
            Some(v) => match v.as_i128() {
                Some(a) if a > 0 && a <= 1 << 20 => a as u64,
                _ => return Err(c.malformed(format!("`general.alignment` is {v:?}"))),
            },
        };
        let data_offset = (c.pos as u64).div_ceil(alignment) * alignment;
        for t in &mut tensors {
            t.offset = t.offset.checked_add(data_offset).ok_or_else(|| {
                c.malformed(format!("tensor `{}` has an offset that overflows", t.name))
            })?;
        }
        let f = GgufFile {
            path,
            mmap,
            version,
            metadata,
            meta_index,
            tensors,
            tensor_index,
            alignment,
            data_offset,
        };
        // Check every loadable tensor lies inside the file now, so truncation shows up at open.
        for t in &f.tensors {
            if t.ggml_type.is_supported() {
                f.byte_range(t)?;
            }
        }
        Ok(f)
    }

    fn p(&self) -> String {
        self.path.display().to_string()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn version(&self) -> u32 {
        self.version
    }
    pub fn alignment(&self) -> u64 {
        self.alignment
    }
    /// Absolute file offset where tensor data starts.
    pub fn data_offset(&self) -> u64 {
        self.data_offset
    }

    /// Metadata keys in file order.
    pub fn metadata_keys(&self) -> impl Iterator<Item = &str> {
        self.metadata.iter().map(|(k, _)| k.as_str())
    }
    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.meta_index.get(key).map(|&i| &self.metadata[i].1)
    }
    fn require(&self, key: &str) -> Result<&GgufValue> {
        self.get(key).ok_or_else(|| GgufError::MissingKey {
            path: self.p(),
            key: key.into(),
        })
    }
    fn wrong(&self, key: &str, expected: &'static str, found: &GgufValue) -> GgufError {
        let found = match found {
            GgufValue::String(_) | GgufValue::Array(_) => found.type_name(),
            v => format!("{} {v:?}", v.type_name()),
        };
        GgufError::WrongType {
            path: self.p(),
            key: key.into(),
            expected,
            found,
        }
    }

    /// `Ok(None)` when `key` is absent, else `get(self, key)`; e.g.
    /// `f.optional("llama.vocab_size", GgufFile::get_u32)?`.
    pub fn optional<'a, T>(
        &'a self,
        key: &str,
        get: impl FnOnce(&'a Self, &str) -> Result<T>,
    ) -> Result<Option<T>> {
        if self.get(key).is_some() {
            get(self, key).map(Some)
        } else {
            Ok(None)
        }
    }

    /// Any integer-typed value that fits in a `u32`.
    pub fn get_u32(&self, key: &str) -> Result<u32> {
        let v = self.require(key)?;
        v.as_i128()
            .and_then(|x| u32::try_from(x).ok())
            .ok_or_else(|| self.wrong(key, "an integer in u32 range", v))
    }
    /// Any integer-typed value that fits in a `u64`.
    pub fn get_u64(&self, key: &str) -> Result<u64> {
        let v = self.require(key)?;
        v.as_i128()
            .and_then(|x| u64::try_from(x).ok())
            .ok_or_else(|| self.wrong(key, "an integer in u64 range", v))
    }
    /// An `f32` or `f64` value (the latter rounded).
    pub fn get_f32(&self, key: &str) -> Result<f32> {
        match self.require(key)? {
            GgufValue::F32(x) => Ok(*x),
            GgufValue::F64(x) => Ok(*x as f32),
            v => Err(self.wrong(key, "a float", v)),
        }
    }
    pub fn get_bool(&self, key: &str) -> Result<bool> {
        match self.require(key)? {
            GgufValue::Bool(b) => Ok(*b),
            v => Err(self.wrong(key, "a bool", v)),
        }
    }
    pub fn get_str(&self, key: &str) -> Result<&str> {
        match self.require(key)? {
            GgufValue::String(s) => Ok(s),
            v => Err(self.wrong(key, "a string", v)),
        }
    }
    pub fn get_str_array(&self, key: &str) -> Result<Vec<&str>> {
        let v = self.require(key)?;
        let GgufValue::Array(items) = v else {
            return Err(self.wrong(key, "an array of strings", v));
        };
        items
            .iter()
            .map(|x| match x {
                GgufValue::String(s) => Ok(s.as_str()),
                _ => Err(self.wrong(key, "an array of strings", v)),
            })
            .collect()
    }
    /// An array of integers that all fit in `i32`.
    pub fn get_i32_array(&self, key: &str) -> Result<Vec<i32>> {
        let v = self.require(key)?;
        let GgufValue::Array(items) = v else {
            return Err(self.wrong(key, "an array of integers", v));
        };
        items
            .iter()
            .map(|x| {
                x.as_i128()
                    .and_then(|i| i32::try_from(i).ok())
                    .ok_or_else(|| self.wrong(key, "an array of integers in i32 range", v))
            })
            .collect()
    }
    /// `general.architecture`, e.g. `llama`.
    pub fn architecture(&self) -> Result<&str> {
        self.get_str("general.architecture")
    }

    /// Tensor names in file order.
    pub fn tensor_names(&self) -> impl Iterator<Item = &str> {
        self.tensors.iter().map(|t| t.name.as_str())
    }
    pub fn tensor_infos(&self) -> &[TensorInfo] {
        &self.tensors
    }
    pub fn has_tensor(&self, name: &str) -> bool {
        self.tensor_index.contains_key(name)
    }
    pub fn tensor_info(&self, name: &str) -> Result<&TensorInfo> {
        self.tensor_index
            .get(name)
            .map(|&i| &self.tensors[i])
            .ok_or_else(|| GgufError::MissingTensor {
                path: self.p(),
                name: name.into(),
            })
    }

    /// The tensor's bytes range in the file, validated; unsupported types are an error.
    fn byte_range(&self, t: &TensorInfo) -> Result<std::ops::Range<usize>> {
        let bad = |detail: String| GgufError::BadTensor {
            path: self.p(),
            name: t.name.clone(),
            detail,
        };
        let (block, block_bytes) =
            t.ggml_type
                .block_layout()
                .ok_or_else(|| GgufError::UnsupportedType {
                    path: self.p(),
                    name: t.name.clone(),
                    type_name: t.ggml_type.name().into(),
                    type_id: t.ggml_type.0,
                })?;
        let n = t
            .dims
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .ok_or_else(|| bad(format!("dims {:?} overflow", t.dims)))?;
        if t.dims.first().is_some_and(|ne0| ne0 % block != 0) {
            return Err(bad(format!(
                "row length {} is not a multiple of the {} block size {block}",
                t.dims[0],
                t.ggml_type.name()
            )));
        }
        let size = (n / block)
            .checked_mul(block_bytes)
            .ok_or_else(|| bad("size overflows".into()))?;
        let len = self.mmap.len() as u64;
        let (start, end) = (t.offset, t.offset.saturating_add(size));
        if end > len {
            return Err(GgufError::TensorOutOfBounds {
                path: self.p(),
                name: t.name.clone(),
                start,
                end,
                len,
            });
        }
        Ok(start as usize..end as usize)
    }

    /// Loads tensor `name` as a row-major `rows × cols` weight (`cols = ne0`, see
    /// [`TensorInfo::shape`]). F32/F16/BF16 keep their dtype; Q8_0/Q4_0/Q4_1 become f32.
    pub fn tensor(&self, name: &str) -> Result<HostWeight> {
        let t = self.tensor_info(name)?;
        let bytes = &self.mmap[self.byte_range(t)?];
        let data = match t.ggml_type {
            GgmlType::F32 => WeightData::F32(
                bytes
                    .par_chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect(),
            ),
            GgmlType::F16 => WeightData::F16(
                bytes
                    .par_chunks_exact(2)
                    .map(|b| f16::from_le_bytes([b[0], b[1]]))
                    .collect(),
            ),
            GgmlType::BF16 => WeightData::BF16(
                bytes
                    .par_chunks_exact(2)
                    .map(|b| bf16::from_le_bytes([b[0], b[1]]))
                    .collect(),
            ),
            GgmlType::Q8_0 => WeightData::F32(dequant_blocks(bytes, 34, dequant_q8_0)),
            GgmlType::Q4_0 => WeightData::F32(dequant_blocks(bytes, 18, dequant_q4_0)),
            GgmlType::Q4_1 => WeightData::F32(dequant_blocks(bytes, 20, dequant_q4_1)),
            other => {
                return Err(GgufError::UnsupportedType {
                    path: self.p(),
                    name: name.into(),
                    type_name: other.name().into(),
                    type_id: other.0,
                });
            }
        };
        let (rows, cols) = t.shape();
        HostWeight::new(rows as usize, cols as usize, data).map_err(|e| GgufError::BadTensor {
            path: self.p(),
            name: name.into(),
            detail: e.to_string(),
        })
    }
}

/// Dequantizes 32-value blocks of `block_bytes` each, in parallel.
fn dequant_blocks(bytes: &[u8], block_bytes: usize, f: fn(&[u8], &mut [f32])) -> Vec<f32> {
    let n_blocks = bytes.len() / block_bytes;
    let mut out = vec![0.0f32; n_blocks * 32];
    out.par_chunks_mut(32 * 256)
        .zip(bytes.par_chunks(block_bytes * 256))
        .for_each(|(o, b)| {
            o.chunks_exact_mut(32)
                .zip(b.chunks_exact(block_bytes))
                .for_each(|(o, b)| f(b, o))
        });
    out
}

fn half_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// `{ d: f16, qs: [i8; 32] }`, value = `qs[i] * d`.
fn dequant_q8_0(b: &[u8], out: &mut [f32]) {
    let d = half_at(b, 0);
    for (o, &q) in out.iter_mut().zip(&b[2..34]) {
        *o = f32::from(q as i8) * d;
    }
}

/// `{ d: f16, qs: [u8; 16] }`: low nibbles are values 0..16, high nibbles 16..32; `(q - 8) * d`.
fn dequant_q4_0(b: &[u8], out: &mut [f32]) {
    let d = half_at(b, 0);
    for (j, &q) in b[2..18].iter().enumerate() {
        out[j] = (f32::from(q & 0x0f) - 8.0) * d;
        out[j + 16] = (f32::from(q >> 4) - 8.0) * d;
    }
}

/// `{ d: f16, m: f16, qs: [u8; 16] }`, nibbles as Q4_0; value = `q * d + m`.
fn dequant_q4_1(b: &[u8], out: &mut [f32]) {
    let (d, m) = (half_at(b, 0), half_at(b, 2));
    for (j, &q) in b[4..20].iter().enumerate() {
        out[j] = f32::from(q & 0x0f) * d + m;
        out[j + 16] = f32::from(q >> 4) * d + m;
    }
}

/// Undoes llama.cpp's Q/K permutation: its converter stores HF row `h*hd + j*hd/2 + i` at row
/// `h*hd + 2*i + j` (`reshape(n_head, 2, hd/2, dim).swapaxes(1, 2)`). Pass `n_heads` for Q and
/// `n_kv_heads` for K. The result is in Hugging Face (rotate-half RoPE) layout.
pub fn unpermute_qk(w: HostWeight, n_heads: usize) -> std::result::Result<HostWeight, KernelError> {
    permute_impl(w, n_heads, false)
}

/// The converter's permutation (the inverse of [`unpermute_qk`]); tests and writers use it.
pub fn permute_qk(w: HostWeight, n_heads: usize) -> std::result::Result<HostWeight, KernelError> {
    permute_impl(w, n_heads, true)
}

fn permute_impl(
    w: HostWeight,
    n_heads: usize,
    forward: bool,
) -> std::result::Result<HostWeight, KernelError> {
    let HostWeight { rows, cols, data } = w;
    if data.len() != rows * cols || n_heads == 0 || rows % (2 * n_heads) != 0 {
        let detail = format!(
            "{rows}x{cols} weight ({} values) does not split into {n_heads} heads of even size",
            data.len()
        );
        return Err(KernelError::Shape {
            op: "unpermute_qk",
            detail,
        });
    }
    let half = rows / n_heads / 2;
    // `src_row(r)`: the row of `w` that lands at row `r` of the result.
    let src_row = |r: usize| {
        let (h, k) = (r / (2 * half), r % (2 * half));
        if forward {
            h * 2 * half + (k % 2) * half + k / 2
        } else {
            h * 2 * half + (k % half) * 2 + k / half
        }
    };
    fn gather<T: Copy + Send + Sync>(
        v: &[T],
        rows: usize,
        cols: usize,
        src: impl Fn(usize) -> usize + Sync,
    ) -> Vec<T> {
        let mut out = Vec::with_capacity(rows * cols);
        for r in 0..rows {
            let s = src(r);
            out.extend_from_slice(&v[s * cols..(s + 1) * cols]);
        }
        out
    }
    let data = match data {
        WeightData::F32(v) => WeightData::F32(gather(&v, rows, cols, src_row)),
        WeightData::F16(v) => WeightData::F16(gather(&v, rows, cols, src_row)),
        WeightData::BF16(v) => WeightData::BF16(gather(&v, rows, cols, src_row)),
    };
    HostWeight::new(rows, cols, data)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A minimal GGUF writer for tests: metadata entries as raw `(type, bytes)` and tensors as
    /// raw block bytes.
    pub(crate) struct Writer {
        pub version: u32,
        pub alignment: u64,
        kv: Vec<u8>,
        n_kv: u64,
        tensors: Vec<(String, Vec<u64>, u32, Vec<u8>)>,
    }

    pub(crate) fn gguf_str(s: &str) -> Vec<u8> {
        let mut b = (s.len() as u64).to_le_bytes().to_vec();
        b.extend_from_slice(s.as_bytes());
        b
    }

    impl Writer {
        pub fn new() -> Self {
            Writer {
                version: 3,
                alignment: 32,
                kv: vec![],
                n_kv: 0,
                tensors: vec![],
            }
        }
        pub fn kv(&mut self, key: &str, ty: u32, value: &[u8]) -> &mut Self {
            self.kv.extend(gguf_str(key));
            self.kv.extend(ty.to_le_bytes());
            self.kv.extend_from_slice(value);
            self.n_kv += 1;
            self
        }
        pub fn kv_u32(&mut self, key: &str, v: u32) -> &mut Self {
            self.kv(key, 4, &v.to_le_bytes())
        }
        pub fn kv_bool(&mut self, key: &str, v: bool) -> &mut Self {
            self.kv(key, 7, &[v as u8])
        }
        pub fn kv_str(&mut self, key: &str, v: &str) -> &mut Self {
            self.kv(key, 8, &gguf_str(v))
        }
        pub fn kv_str_array(&mut self, key: &str, v: &[&str]) -> &mut Self {
            let mut b = 8u32.to_le_bytes().to_vec();
            b.extend((v.len() as u64).to_le_bytes());
            v.iter().for_each(|s| b.extend(gguf_str(s)));
            self.kv(key, 9, &b)
        }
        pub fn kv_i32_array(&mut self, key: &str, v: &[i32]) -> &mut Self {
            let mut b = 5u32.to_le_bytes().to_vec();
            b.extend((v.len() as u64).to_le_bytes());
            v.iter().for_each(|x| b.extend(x.to_le_bytes()));
            self.kv(key, 9, &b)
        }
        pub fn tensor(&mut self, name: &str, dims: &[u64], ty: u32, data: Vec<u8>) -> &mut Self {
            self.tensors.push((name.into(), dims.to_vec(), ty, data));
            self
        }
        pub fn finish(&self) -> Vec<u8> {
            let align = |b: &mut Vec<u8>| {
                b.resize(
                    b.len().div_ceil(self.alignment as usize) * self.alignment as usize,
                    0,
                )
            };
            let mut data = vec![];
            let mut infos = vec![];
            for (name, dims, ty, bytes) in &self.tensors {
                align(&mut data);
                infos.extend(gguf_str(name));
                infos.extend((dims.len() as u32).to_le_bytes());
                dims.iter().for_each(|d| infos.extend(d.to_le_bytes()));
                infos.extend(ty.to_le_bytes());
                infos.extend((data.len() as u64).to_le_bytes());
                data.extend_from_slice(bytes);
            }
            let mut out = b"GGUF".to_vec();
            out.extend(self.version.to_le_bytes());
            out.extend((self.tensors.len() as u64).to_le_bytes());
            out.extend(self.n_kv.to_le_bytes());
            out.extend_from_slice(&self.kv);
            out.extend(infos);
            align(&mut out);
            out.extend(data);
            out
        }
        /// Writes the file to a fresh temp path and opens it.
        pub fn open(&self, tag: &str) -> Result<GgufFile> {
            open_bytes(&self.finish(), tag)
        }
    }

    pub(crate) fn temp_path(tag: &str) -> PathBuf {
        std::env::temp_dir().join(format!("strata-gguf-{}-{tag}.gguf", std::process::id()))
    }

    pub(crate) fn open_bytes(bytes: &[u8], tag: &str) -> Result<GgufFile> {
        let path = temp_path(tag);
        std::fs::write(&path, bytes).map_err(|source| GgufError::Io {
            path: tag.into(),
            source,
        })?;
        let r = GgufFile::open(&path);
        let _ = std::fs::remove_file(&path);
        r
    }

    fn h(x: f32) -> [u8; 2] {
        f16::from_f32(x).to_le_bytes()
    }

    fn f32s(w: &HostWeight) -> Vec<f32> {
        w.data.to_f32_vec()
    }

    #[test]
    fn metadata_types_and_typed_getters() -> Result<()> {
        let mut w = Writer::new();
        w.kv("u8", 0, &[200])
            .kv("i8", 1, &[0xff])
            .kv("u16", 2, &700u16.to_le_bytes());
        w.kv("i16", 3, &(-5i16).to_le_bytes()).kv_u32("u32", 7).kv(
            "i32",
            5,
            &(-9i32).to_le_bytes(),
        );
        w.kv("f32", 6, &1.5f32.to_le_bytes())
            .kv_bool("bool", true)
            .kv_str("general.architecture", "llama");
        w.kv("u64", 10, &(1u64 << 40).to_le_bytes())
            .kv("i64", 11, &3i64.to_le_bytes());
        w.kv("f64", 12, &0.25f64.to_le_bytes())
            .kv_str_array("strs", &["a b", "", "ü"]);
        w.kv_i32_array("ints", &[3, -1, 4]);
        // Nested: array of 2 arrays of u8.
        let mut nested = 9u32.to_le_bytes().to_vec();
        nested.extend(2u64.to_le_bytes());
        for inner in [[1u8, 2].as_slice(), &[3]] {
            nested.extend(0u32.to_le_bytes());
            nested.extend((inner.len() as u64).to_le_bytes());
            nested.extend_from_slice(inner);
        }
        w.kv("nested", 9, &nested);
        let f = w.open("meta")?;
        assert_eq!(f.get("u8"), Some(&GgufValue::U8(200)));
        assert_eq!(f.get("i8"), Some(&GgufValue::I8(-1)));
        assert_eq!(f.get("i16"), Some(&GgufValue::I16(-5)));
        assert_eq!(f.get_u32("u8")?, 200);
        assert_eq!(f.get_u32("u16")?, 700);
        assert_eq!(f.get_u32("i64")?, 3);
        assert_eq!(f.get_u64("u64")?, 1 << 40);
        assert_eq!(f.get_f32("f32")?, 1.5);
        assert_eq!(f.get_f32("f64")?, 0.25);
        assert!(f.get_bool("bool")?);
        assert_eq!(f.architecture()?, "llama");
        assert_eq!(f.get_str_array("strs")?, vec!["a b", "", "ü"]);
        assert_eq!(f.get_i32_array("ints")?, vec![3, -1, 4]);
        let want = GgufValue::Array(vec![
            GgufValue::Array(vec![GgufValue::U8(1), GgufValue::U8(2)]),
            GgufValue::Array(vec![GgufValue::U8(3)]),
        ]);
        assert_eq!(f.get("nested"), Some(&want));
        assert_eq!(f.optional("nope", GgufFile::get_u32)?, None);
        assert_eq!(f.optional("u32", GgufFile::get_u32)?, Some(7));
        assert_eq!(f.metadata_keys().count(), 15);

        let e = f
            .get_u32("i32")
            .map(|_| ())
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            e.contains("strata-gguf-") && e.contains("`i32`") && e.contains("-9"),
            "{e}"
        );
        assert!(f.get_u32("u64").is_err() && f.get_str("u8").is_err() && f.get_f32("u32").is_err());
        let e = f
            .get_str("missing.key")
            .map(|_| ())
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("`missing.key` is missing"), "{e}");
        let e = f
            .get_str_array("ints")
            .map(|_| ())
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("`ints`") && e.contains("array of i32"), "{e}");
        Ok(())
    }

    #[test]
    fn float_tensors_and_shapes() -> Result<()> {
        let vals = [1.0f32, -2.5, 3.25, 0.0, 7.0, -0.125];
        let f32b: Vec<u8> = vals.iter().flat_map(|x| x.to_le_bytes()).collect();
        let f16b: Vec<u8> = vals.iter().flat_map(|&x| h(x)).collect();
        let bf16b: Vec<u8> = vals
            .iter()
            .flat_map(|&x| bf16::from_f32(x).to_le_bytes())
            .collect();
        let mut w = Writer::new();
        w.tensor("a", &[3, 2], 0, f32b.clone())
            .tensor("b", &[6], 1, f16b)
            .tensor("c", &[2, 3, 1], 30, bf16b);
        w.tensor("d", &[3], 0, f32b[..12].to_vec());
        let f = w.open("floats")?;
        assert_eq!(f.tensor_names().collect::<Vec<_>>(), ["a", "b", "c", "d"]);
        assert!(f.has_tensor("c") && !f.has_tensor("zz"));
        let a = f.tensor("a")?;
        assert_eq!((a.rows, a.cols), (2, 3));
        assert!(matches!(a.data, WeightData::F32(_)));
        assert_eq!(f32s(&a), vals);
        let b = f.tensor("b")?;
        assert_eq!((b.rows, b.cols), (1, 6));
        assert!(matches!(b.data, WeightData::F16(_)));
        assert_eq!(f32s(&b), vals);
        let c = f.tensor("c")?;
        assert_eq!((c.rows, c.cols), (3, 2));
        assert!(matches!(c.data, WeightData::BF16(_)));
        assert_eq!(f32s(&c), vals);
        assert_eq!(f32s(&f.tensor("d")?), vals[..3]);
        assert_eq!(f.tensor_info("a")?.dims, [3, 2]);
        assert_eq!(f.tensor_info("a")?.offset % 32, 0);
        let e = f
            .tensor("zz")
            .map(|_| ())
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("no tensor named `zz`"), "{e}");
        Ok(())
    }

    #[test]
    fn quantized_blocks_dequantize_by_hand() -> Result<()> {
        // Q4_0: d = 0.5; byte k holds k (low, element k) and 15 - k (high, element k + 16).
        let mut q40 = h(0.5).to_vec();
        q40.extend((0..16u8).map(|k| k | ((15 - k) << 4)));
        // Q4_1: d = 0.25, m = -1, same nibbles.
        let mut q41 = [h(0.25), h(-1.0)].concat();
        q41.extend((0..16u8).map(|k| k | ((15 - k) << 4)));
        // Q8_0: two rows of one block: d = 0.125 with qs = i - 16; then d = 2 with i8 extremes.
        let mut q80 = h(0.125).to_vec();
        q80.extend((0..32i8).map(|i| (i - 16) as u8));
        q80.extend(h(2.0));
        q80.extend((0..32).map(|i| [0x80u8, 0x7f, 0xff, 0x01][i % 4]));
        let mut w = Writer::new();
        w.tensor("q40", &[32], 2, q40)
            .tensor("q41", &[32], 3, q41)
            .tensor("q80", &[32, 2], 8, q80);
        let f = w.open("quant")?;

        let q40 = f32s(&f.tensor("q40")?);
        assert_eq!(&q40[..4], [-4.0, -3.5, -3.0, -2.5]);
        assert_eq!(&q40[14..18], [3.0, 3.5, 3.5, 3.0]);
        assert_eq!(q40[31], -4.0);
        let q41 = f32s(&f.tensor("q41")?);
        assert_eq!(&q41[..3], [-1.0, -0.75, -0.5]);
        assert_eq!(&q41[15..17], [2.75, 2.75]);
        assert_eq!(q41[31], -1.0);
        let w80 = f.tensor("q80")?;
        assert_eq!((w80.rows, w80.cols), (2, 32));
        let q80 = f32s(&w80);
        assert_eq!(&q80[..2], [-2.0, -1.875]);
        assert_eq!(q80[16], 0.0);
        assert_eq!(q80[31], 1.875);
        assert_eq!(&q80[32..36], [-256.0, 254.0, -2.0, 2.0]);
        Ok(())
    }

    #[test]
    fn unsupported_type_names_the_type() -> Result<()> {
        let mut w = Writer::new();
        w.tensor("blk.0.attn_q.weight", &[256], 13, vec![0; 176])
            .tensor("odd", &[4], 1000, vec![0; 4]);
        let f = w.open("unsupported")?;
        assert_eq!(
            f.tensor_info("blk.0.attn_q.weight")?.ggml_type.name(),
            "Q5_K"
        );
        let e = f
            .tensor("blk.0.attn_q.weight")
            .map(|_| ())
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            e.contains(
                "tensor `blk.0.attn_q.weight` has type Q5_K (13), which strata does not support"
            ),
            "{e}"
        );
        assert!(e.contains("strata-gguf-") && e.contains("Q4_1"), "{e}");
        let e = f
            .tensor("odd")
            .map(|_| ())
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("unknown (1000)"), "{e}");
        Ok(())
    }

    #[test]
    fn bad_files_are_errors_not_panics() {
        let mut w = Writer::new();
        w.kv_str("general.architecture", "llama")
            .kv_str_array("toks", &["a", "b"]);
        w.tensor("t", &[32, 2], 8, vec![1; 68])
            .tensor("v", &[4], 0, vec![0; 16]);
        let full = w.finish();
        assert!(open_bytes(&full, "full").is_ok());
        for n in 0..full.len() {
            match open_bytes(&full[..n], "trunc") {
                Err(GgufError::Truncated { .. } | GgufError::TensorOutOfBounds { .. }) => {}
                other => panic!("prefix of {n} bytes gave {other:?}"),
            }
        }
        let e = open_bytes(&full[..full.len() - 1], "trunc")
            .map(|_| ())
            .err()
            .map(|e| e.to_string());
        assert!(e.unwrap_or_default().contains("tensor `v` data"));

        let mut bad = full.clone();
        bad[..4].copy_from_slice(b"GGML");
        assert!(matches!(
            open_bytes(&bad, "magic"),
            Err(GgufError::BadMagic { .. })
        ));
        for version in [1u32, 4] {
            let mut bad = full.clone();
            bad[4..8].copy_from_slice(&version.to_le_bytes());
            let e = open_bytes(&bad, "version")
                .map(|_| ())
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(
                e.contains(&format!("version {version} is not supported")),
                "{e}"
            );
        }
        // A huge array length must not allocate or panic.
        let mut w = Writer::new();
        let mut arr = 0u32.to_le_bytes().to_vec();
        arr.extend(u64::MAX.to_le_bytes());
        w.kv("huge", 9, &arr);
        assert!(matches!(w.open("huge"), Err(GgufError::Truncated { .. })));
        // Unknown value type, bad dims, quantized row not a block multiple.
        assert!(matches!(
            Writer::new().kv("x", 99, &[]).open("vt"),
            Err(GgufError::Malformed { .. })
        ));
        let mut w = Writer::new();
        w.tensor("q", &[16], 8, vec![0; 34]);
        assert!(matches!(w.open("rowlen"), Err(GgufError::BadTensor { .. })));
    }

    #[test]
    fn corrupted_bytes_never_panic() {
        let mut w = Writer::new();
        w.kv_str("general.architecture", "llama")
            .kv_i32_array("ints", &[1, 2]);
        w.tensor("q", &[32], 2, vec![7; 18])
            .tensor("r", &[32, 1], 3, vec![9; 20]);
        let full = w.finish();
        for i in 0..full.len() {
            for byte in [0x00, 0xff, 0x7f] {
                let mut bad = full.clone();
                bad[i] = byte;
                if let Ok(f) = open_bytes(&bad, "corrupt") {
                    let names: Vec<String> = f.tensor_names().map(String::from).collect();
                    for n in names {
                        let _ = f.tensor(&n);
                    }
                }
            }
        }
    }

    #[test]
    fn alignment_is_honoured() -> Result<()> {
        let mut w = Writer::new();
        w.alignment = 64;
        w.kv_u32("general.alignment", 64);
        w.tensor("a", &[1], 0, 1.0f32.to_le_bytes().to_vec())
            .tensor("b", &[1], 0, 2.0f32.to_le_bytes().to_vec());
        let f = w.open("align")?;
        assert_eq!(f.alignment(), 64);
        assert_eq!(f.data_offset() % 64, 0);
        assert_eq!(f32s(&f.tensor("b")?), [2.0]);
        Ok(())
    }

    #[test]
    fn unpermute_qk_inverts_the_converter() -> std::result::Result<(), KernelError> {
        // One head, hd = 4, one column: HF rows [a0 a1 a2 a3] are stored as [a0 a2 a1 a3].
        let stored = HostWeight::new(4, 1, WeightData::F32(vec![10.0, 12.0, 11.0, 13.0]))?;
        let hf = unpermute_qk(stored, 1)?;
        assert_eq!(f32s(&hf), [10.0, 11.0, 12.0, 13.0]);
        // Two heads, hd = 4, two columns: per head, stored rows (0, 1, 2, 3) hold HF rows (0, 2, 1, 3).
        let stored: Vec<f32> = [0, 2, 1, 3, 4, 6, 5, 7]
            .iter()
            .flat_map(|&r| [r as f32, 100.0 + r as f32])
            .collect();
        let hf = unpermute_qk(HostWeight::new(8, 2, WeightData::F32(stored))?, 2)?;
        let want: Vec<f32> = (0..8).flat_map(|r| [r as f32, 100.0 + r as f32]).collect();
        assert_eq!(f32s(&hf), want);
        // Round trip on f16 with hd = 64, 3 heads, 5 columns.
        let v: Vec<f16> = (0..192 * 5).map(|i| f16::from_f32(i as f32)).collect();
        let w = HostWeight::new(192, 5, WeightData::F16(v.clone()))?;
        let permuted = permute_qk(w, 3)?;
        assert_ne!(
            f32s(&permuted),
            f32s(&HostWeight::new(192, 5, WeightData::F16(v.clone()))?)
        );
        assert_eq!(
            f32s(&unpermute_qk(permuted, 3)?),
            v.iter().map(|x| x.to_f32()).collect::<Vec<_>>()
        );
        assert!(unpermute_qk(HostWeight::new(6, 1, WeightData::F32(vec![0.0; 6]))?, 2).is_err());
        Ok(())
    }

    /// Reference values from Python: `gguf.GGUFReader` + `gguf.quants.dequantize` (gguf 0.19.0).
    #[test]
    fn smollm2_tensors_match_python_gguf() -> Result<()> {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
        if !path.exists() {
            println!("skipping: {} not present", path.display());
            return Ok(());
        }
        let f = GgufFile::open(&path)?;
        assert_eq!((f.version(), f.tensor_names().count()), (3, 272));
        assert_eq!(f.get_u32("llama.embedding_length")?, 576);
        assert!(!f.has_tensor("output.weight"));
        type Check = (&'static str, (usize, usize), [f32; 4], f64);
        let checks: [Check; 4] = [
            (
                "token_embd.weight",
                (49152, 576),
                [-0.10654449, 0.03297806, 0.0481987, -0.02283096],
                -15353.04449415207,
            ),
            (
                "blk.0.attn_norm.weight",
                (1, 576),
                [0.01397705, 0.02380371, -0.01977539, -0.03027344],
                0.6129436492919922,
            ),
            (
                "blk.0.attn_q.weight",
                (576, 576),
                [-0.09631348, 0.15734863, -0.09631348, -0.73046875],
                59.22322082519531,
            ),
            (
                "blk.29.ffn_down.weight",
                (576, 1536),
                [-0.27331543, 0.1862793, 0.1862793, 0.04840088],
                49.83570861816406,
            ),
        ];
        for (name, shape, first, sum) in checks {
            let t = std::time::Instant::now();
            let w = f.tensor(name)?;
            println!(
                "{name}: {:?} in {:?}",
                f.tensor_info(name)?.ggml_type.name(),
                t.elapsed()
            );
            assert_eq!((w.rows, w.cols), shape, "{name}");
            let v = f32s(&w);
            for (a, b) in v.iter().zip(first) {
                assert!((a - b).abs() < 1e-6, "{name}: {a} vs {b}");
            }
            let s: f64 = v.iter().map(|&x| f64::from(x)).sum();
            assert!(
                (s - sum).abs() < 1e-6 * sum.abs().max(1.0),
                "{name}: sum {s} vs {sum}"
            );
        }
        let t = std::time::Instant::now();
        let n: usize = f
            .tensor_names()
            .map(|n| f.tensor(n).map(|w| w.data.len()))
            .sum::<Result<usize>>()?;
        println!("dequantized all {n} values in {:?}", t.elapsed());
        Ok(())
    }
}

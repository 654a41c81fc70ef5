//! Weights as they come out of a checkpoint: a shape and data in their stored dtype. GGUF block
//! formats are dequantized by the loader before they get here, so kernels see f32/f16/bf16 only.

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    BF16,
}

impl DType {
    pub fn size_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
        }
    }
}

#[derive(Clone, Debug)]
pub enum WeightData {
    F32(Vec<f32>),
    F16(Vec<f16>),
    BF16(Vec<bf16>),
}

impl WeightData {
    pub fn len(&self) -> usize {
        match self {
            WeightData::F32(v) => v.len(),
            WeightData::F16(v) => v.len(),
            WeightData::BF16(v) => v.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn dtype(&self) -> DType {
        match self {
            WeightData::F32(_) => DType::F32,
            WeightData::F16(_) => DType::F16,
            WeightData::BF16(_) => DType::BF16,
        }
    }
    /// Widens `[start, start + out.len())` into `out`.
    pub fn widen_into(&self, start: usize, out: &mut [f32]) {
        let end = start + out.len();
        match self {
            WeightData::F32(v) => out.copy_from_slice(&v[start..end]),
            // `half`'s slice conversions use F16C / SIMD when the CPU has them.
            WeightData::F16(v) => v[start..end].convert_to_f32_slice(out),
            WeightData::BF16(v) => v[start..end].convert_to_f32_slice(out),
        }
    }
    /// The values as bytes (native endianness), as they are written to and read from disk.
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            WeightData::F32(v) => bytemuck::cast_slice(v),
            WeightData::F16(v) => bytemuck::cast_slice(v),
            WeightData::BF16(v) => bytemuck::cast_slice(v),
        }
    }
    /// [`WeightData::as_bytes`], to fill in place (the length and dtype stay as they are).
    pub fn as_bytes_mut(&mut self) -> &mut [u8] {
        match self {
            WeightData::F32(v) => bytemuck::cast_slice_mut(v),
            WeightData::F16(v) => bytemuck::cast_slice_mut(v),
            WeightData::BF16(v) => bytemuck::cast_slice_mut(v),
        }
    }
    pub fn to_f32_vec(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.len()];
        self.widen_into(0, &mut out);
        out
    }
    /// Converts to `dtype` (rounding to nearest when narrowing).
    pub fn cast(self, dtype: DType) -> WeightData {
        if self.dtype() == dtype {
            return self;
        }
        let wide = self.to_f32_vec();
        match dtype {
            DType::F32 => WeightData::F32(wide),
            DType::F16 => WeightData::F16(wide.into_iter().map(f16::from_f32).collect()),
            DType::BF16 => WeightData::BF16(wide.into_iter().map(bf16::from_f32).collect()),
        }
    }
}

/// A weight tensor on the host: `rows × cols` (a vector is `1 × n`), row-major.
#[derive(Clone, Debug)]
pub struct HostWeight {
    pub rows: usize,
    pub cols: usize,
    pub data: WeightData,
}

impl HostWeight {
    pub fn new(rows: usize, cols: usize, data: WeightData) -> crate::Result<Self> {
        if rows * cols != data.len() {
            return Err(crate::shape_err(
                "HostWeight::new",
                format!(
                    "{rows}x{cols} needs {} values, got {}",
                    rows * cols,
                    data.len()
                ),
            ));
        }
        Ok(Self { rows, cols, data })
    }
    pub fn vector(data: WeightData) -> Self {
        Self {
            rows: 1,
            cols: data.len(),
            data,
        }
    }
    pub fn size_bytes(&self) -> usize {
        self.data.len() * self.data.dtype().size_bytes()
    }

    /// Splits the columns into `[0, at)` and `[at, cols)` (a vector's elements: it is `1 × n`).
    pub fn split_cols(self, at: usize) -> crate::Result<(Self, Self)> {
        let (rows, cols) = (self.rows, self.cols);
        if at > cols {
            return Err(crate::shape_err(
                "HostWeight::split_cols",
                format!("column {at} is past the {cols} columns"),
            ));
        }
        fn split<T: Copy>(v: &[T], rows: usize, cols: usize, at: usize) -> (Vec<T>, Vec<T>) {
            let mut left = Vec::with_capacity(rows * at);
            let mut right = Vec::with_capacity(rows * (cols - at));
            for row in v.chunks_exact(cols.max(1)).take(rows) {
                left.extend_from_slice(&row[..at]);
                right.extend_from_slice(&row[at..]);
            }
            (left, right)
        }
        let (l, r) = match &self.data {
            WeightData::F32(v) => {
                let (l, r) = split(v, rows, cols, at);
                (WeightData::F32(l), WeightData::F32(r))
            }
            WeightData::F16(v) => {
                let (l, r) = split(v, rows, cols, at);
                (WeightData::F16(l), WeightData::F16(r))
            }
            WeightData::BF16(v) => {
                let (l, r) = split(v, rows, cols, at);
                (WeightData::BF16(l), WeightData::BF16(r))
            }
        };
        Ok((Self::new(rows, at, l)?, Self::new(rows, cols - at, r)?))
    }

    /// Splits the rows into `[0, at)` and `[at, rows)`.
    pub fn split_rows(self, at: usize) -> crate::Result<(Self, Self)> {
        let (rows, cols) = (self.rows, self.cols);
        if at > rows {
            return Err(crate::shape_err(
                "HostWeight::split_rows",
                format!("row {at} is past the {rows} rows"),
            ));
        }
        let (l, r) = match self.data {
            WeightData::F32(mut v) => {
                let r = v.split_off(at * cols);
                (WeightData::F32(v), WeightData::F32(r))
            }
            WeightData::F16(mut v) => {
                let r = v.split_off(at * cols);
                (WeightData::F16(v), WeightData::F16(r))
            }
            WeightData::BF16(mut v) => {
                let r = v.split_off(at * cols);
                (WeightData::BF16(v), WeightData::BF16(r))
            }
        };
        Ok((Self::new(at, cols, l)?, Self::new(rows - at, cols, r)?))
    }
}

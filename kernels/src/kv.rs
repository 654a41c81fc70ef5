//! K and V values as a KV tier stores them: f32, or half precision (f16 / bf16) when the tier
//! holds the model's own dtype (the GPU tier rounds K and V to it, so the host and disk tiers can
//! keep exactly those values at half the bytes).
//!
//! - [`KvSlice`] borrows stored values (a host arena slot, a block read from disk); attention
//!   widens them to f32 on the fly ([`KvSlice::widen_into`]: bf16 → f32 is a 16-bit shift, f16
//!   uses F16C when the CPU has it) and accumulates in f32.
//! - [`KvBuf`] owns them (a block fetched for the compute device).
//!
//! Narrowing ([`KvBuf::from_f32`], [`KvSliceMut::store`]) rounds to nearest even, as the GPU tier's
//! appends do, so every tier holds the same values; widening is exact.

use std::ops::Range;

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};

use crate::DType;

/// Stored K or V values, borrowed.
#[derive(Clone, Copy, Debug)]
pub enum KvSlice<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    BF16(&'a [bf16]),
}

impl<'a> KvSlice<'a> {
    pub fn dtype(&self) -> DType {
        match self {
            KvSlice::F32(_) => DType::F32,
            KvSlice::F16(_) => DType::F16,
            KvSlice::BF16(_) => DType::BF16,
        }
    }

    /// Values (not bytes).
    pub fn len(&self) -> usize {
        match self {
            KvSlice::F32(s) => s.len(),
            KvSlice::F16(s) => s.len(),
            KvSlice::BF16(s) => s.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn size_bytes(&self) -> usize {
        self.len() * self.dtype().size_bytes()
    }

    /// The values at `r` (indices in values). Panics when `r` is out of range, like slicing.
    pub fn slice(self, r: Range<usize>) -> KvSlice<'a> {
        match self {
            KvSlice::F32(s) => KvSlice::F32(&s[r]),
            KvSlice::F16(s) => KvSlice::F16(&s[r]),
            KvSlice::BF16(s) => KvSlice::BF16(&s[r]),
        }
    }

    /// Writes the values, widened to f32, into `out` (`out.len() == self.len()`).
    #[inline(always)]
    pub fn widen_into(self, out: &mut [f32]) {
        match self {
            KvSlice::F32(s) => out.copy_from_slice(s),
            // `half`'s slice conversion uses F16C when the CPU has it (checked at run time).
            KvSlice::F16(s) => s.convert_to_f32_slice(out),
            KvSlice::BF16(s) => widen_bf16(s, out),
        }
    }

    pub fn to_f32_vec(self) -> Vec<f32> {
        let mut out = vec![0.0; self.len()];
        self.widen_into(&mut out);
        out
    }

    /// The values as f32: borrowed as they are when stored in f32, else widened into `buf`
    /// (grown as needed). The f32 case costs nothing, so f32 tiers keep their speed.
    #[inline(always)]
    pub fn as_f32<'s>(self, buf: &'s mut Vec<f32>) -> &'s [f32]
    where
        'a: 's,
    {
        match self {
            KvSlice::F32(s) => s,
            other => {
                let n = other.len();
                if buf.len() < n {
                    buf.resize(n, 0.0);
                }
                other.widen_into(&mut buf[..n]);
                &buf[..n]
            }
        }
    }
}

impl<'a> From<&'a [f32]> for KvSlice<'a> {
    fn from(s: &'a [f32]) -> Self {
        KvSlice::F32(s)
    }
}

impl<'a> From<&'a Vec<f32>> for KvSlice<'a> {
    fn from(s: &'a Vec<f32>) -> Self {
        KvSlice::F32(s)
    }
}

impl<'a> From<&'a [f16]> for KvSlice<'a> {
    fn from(s: &'a [f16]) -> Self {
        KvSlice::F16(s)
    }
}

impl<'a> From<&'a [bf16]> for KvSlice<'a> {
    fn from(s: &'a [bf16]) -> Self {
        KvSlice::BF16(s)
    }
}

/// bf16 → f32 is exact: the bf16 bits are the high half of the f32's. Written as a plain loop
/// over the bits so LLVM turns it into a zero-extend and a shift per vector.
#[inline(always)]
fn widen_bf16(src: &[bf16], out: &mut [f32]) {
    assert_eq!(src.len(), out.len(), "widen_bf16: lengths differ");
    for (o, s) in out.iter_mut().zip(src) {
        *o = f32::from_bits(u32::from(s.to_bits()) << 16);
    }
}

/// Stored K or V values, mutably borrowed (an arena slot being appended to).
#[derive(Debug)]
pub enum KvSliceMut<'a> {
    F32(&'a mut [f32]),
    F16(&'a mut [f16]),
    BF16(&'a mut [bf16]),
}

impl KvSliceMut<'_> {
    /// Stores `src` at values `at .. at + src.len()`, rounded to nearest even in this dtype
    /// (copied as is into f32). Panics when out of range, like slicing.
    pub fn store(&mut self, at: usize, src: &[f32]) {
        let r = at..at + src.len();
        match self {
            KvSliceMut::F32(o) => o[r].copy_from_slice(src),
            KvSliceMut::F16(o) => o[r].convert_from_f32_slice(src),
            KvSliceMut::BF16(o) => o[r].convert_from_f32_slice(src),
        }
    }
}

/// Stored K or V values, owned: `[2, kv_heads, block_tokens, head_dim]` for a KV block, in the
/// tier's dtype.
#[derive(Clone, Debug, PartialEq)]
pub enum KvBuf {
    F32(Vec<f32>),
    F16(Vec<f16>),
    BF16(Vec<bf16>),
}

impl KvBuf {
    /// `src` rounded to nearest even in `dtype` (copied as is for f32).
    pub fn from_f32(dtype: DType, src: &[f32]) -> KvBuf {
        match dtype {
            DType::F32 => KvBuf::F32(src.to_vec()),
            DType::F16 => KvBuf::F16(src.iter().map(|&x| f16::from_f32(x)).collect()),
            DType::BF16 => KvBuf::BF16(src.iter().map(|&x| bf16::from_f32(x)).collect()),
        }
    }

    /// A copy of `s`, in its dtype.
    pub fn copy_of(s: KvSlice<'_>) -> KvBuf {
        match s {
            KvSlice::F32(s) => KvBuf::F32(s.to_vec()),
            KvSlice::F16(s) => KvBuf::F16(s.to_vec()),
            KvSlice::BF16(s) => KvBuf::BF16(s.to_vec()),
        }
    }

    /// An empty buffer of `dtype` with room for `n` values.
    pub fn with_capacity(dtype: DType, n: usize) -> KvBuf {
        match dtype {
            DType::F32 => KvBuf::F32(Vec::with_capacity(n)),
            DType::F16 => KvBuf::F16(Vec::with_capacity(n)),
            DType::BF16 => KvBuf::BF16(Vec::with_capacity(n)),
        }
    }

    /// Appends `s`: copied as it is in the same dtype, else widened exactly or rounded to
    /// nearest even.
    pub fn extend_from(&mut self, s: KvSlice<'_>) {
        match (self, s) {
            (KvBuf::F32(d), KvSlice::F32(s)) => d.extend_from_slice(s),
            (KvBuf::F16(d), KvSlice::F16(s)) => d.extend_from_slice(s),
            (KvBuf::BF16(d), KvSlice::BF16(s)) => d.extend_from_slice(s),
            (KvBuf::F32(d), s) => d.extend(s.to_f32_vec()),
            (KvBuf::F16(d), s) => d.extend(s.to_f32_vec().into_iter().map(f16::from_f32)),
            (KvBuf::BF16(d), s) => d.extend(s.to_f32_vec().into_iter().map(bf16::from_f32)),
        }
    }

    pub fn as_slice(&self) -> KvSlice<'_> {
        match self {
            KvBuf::F32(v) => KvSlice::F32(v),
            KvBuf::F16(v) => KvSlice::F16(v),
            KvBuf::BF16(v) => KvSlice::BF16(v),
        }
    }

    pub fn dtype(&self) -> DType {
        self.as_slice().dtype()
    }

    pub fn len(&self) -> usize {
        self.as_slice().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn size_bytes(&self) -> usize {
        self.as_slice().size_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extend_from_copies_its_own_dtype_and_converts_others() {
        let xs = [1.0f32, -2.5, 3.3, 1e-3];
        let mut b = KvBuf::with_capacity(DType::BF16, 8);
        b.extend_from(KvBuf::from_f32(DType::BF16, &xs).as_slice());
        b.extend_from(KvSlice::F32(&xs));
        let KvBuf::BF16(v) = &b else {
            panic!("dtype changed: {b:?}");
        };
        assert_eq!(v.len(), 8);
        assert_eq!(
            v[..4],
            v[4..],
            "same rounding whichever way the values came in"
        );
        let mut f = KvBuf::with_capacity(DType::F32, 4);
        f.extend_from(b.as_slice().slice(0..4));
        assert_eq!(
            f.as_slice().to_f32_vec(),
            b.as_slice().slice(0..4).to_f32_vec()
        );
    }

    #[test]
    fn widening_is_exact_and_narrowing_rounds_to_nearest_even() {
        let xs: Vec<f32> = (0..1000)
            .map(|i| ((i * 7919) % 2001) as f32 / 97.0 - 10.3)
            .chain([0.0, -0.0, 1e-30, 65504.0, f32::INFINITY])
            .collect();
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let b = KvBuf::from_f32(dtype, &xs);
            let wide = b.as_slice().to_f32_vec();
            for (x, w) in xs.iter().zip(&wide) {
                let want = match dtype {
                    DType::F32 => *x,
                    DType::F16 => f16::from_f32(*x).to_f32(),
                    DType::BF16 => bf16::from_f32(*x).to_f32(),
                };
                assert_eq!(w.to_bits(), want.to_bits(), "{dtype:?} {x}");
            }
            let mut again = vec![f16::ZERO; xs.len()];
            let mut again_b = vec![bf16::ZERO; xs.len()];
            let mut again_f = vec![0f32; xs.len()];
            let mut out = match dtype {
                DType::F32 => KvSliceMut::F32(&mut again_f),
                DType::F16 => KvSliceMut::F16(&mut again),
                DType::BF16 => KvSliceMut::BF16(&mut again_b),
            };
            let (head, tail) = xs.split_at(300);
            out.store(300, tail);
            out.store(0, head);
            let narrowed = match dtype {
                DType::F32 => KvBuf::F32(again_f),
                DType::F16 => KvBuf::F16(again),
                DType::BF16 => KvBuf::BF16(again_b),
            };
            assert_eq!(narrowed, b, "{dtype:?}: store and from_f32 disagree");
        }
        // Round to nearest even: 1 + 2^-8 is halfway between two bf16 values and rounds down to
        // the even one; a hair above rounds up.
        let halfway = 1.0 + 2f32.powi(-8);
        assert_eq!(bf16::from_f32(halfway).to_f32(), 1.0);
        let above = f32::from_bits(halfway.to_bits() + 1);
        assert_eq!(bf16::from_f32(above).to_f32(), 1.0 + 2f32.powi(-7));
    }

    #[test]
    fn as_f32_borrows_f32_and_widens_half() {
        let xs = [1.5f32, -2.25, 3.0];
        let mut buf = Vec::new();
        let s = KvSlice::F32(&xs);
        assert!(std::ptr::eq(s.as_f32(&mut buf).as_ptr(), xs.as_ptr()));
        assert!(buf.is_empty());
        let b = KvBuf::from_f32(DType::BF16, &xs);
        assert_eq!(b.as_slice().slice(1..3).as_f32(&mut buf), &xs[1..3]);
        assert_eq!(b.size_bytes(), 6);
    }
}

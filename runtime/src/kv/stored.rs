//! K and V as the host and disk tiers store them, in the cache's KV dtype
//! ([`super::KvCacheConfig::kv_dtype`]): typed views of a host arena slot and of a block's bytes
//! read back from disk. A block is K then V, each `[kv_heads, block_tokens, head_dim]` in that
//! dtype; a slot holding hidden states instead keeps them as f32 whatever the dtype.

use half::slice::HalfBitsSliceExt;
use half::{bf16, f16};
use strata_kernels::{DType, KvSlice, KvSliceMut};
use strata_storage::{ArenaSlots, SlotId, f32_view, u16_view};

/// The whole slot as values of `dtype` (`slot_bytes / dtype.size_bytes()` of them).
pub(crate) fn slot_kv(host: &ArenaSlots, slot: SlotId, dtype: DType) -> KvSlice<'_> {
    match dtype {
        DType::F32 => KvSlice::F32(host.slot_f32(slot)),
        DType::F16 => KvSlice::F16(host.slot_u16(slot).reinterpret_cast::<f16>()),
        DType::BF16 => KvSlice::BF16(host.slot_u16(slot).reinterpret_cast::<bf16>()),
    }
}

/// The whole slot as values of `dtype`, mutably.
pub(crate) fn slot_kv_mut(host: &mut ArenaSlots, slot: SlotId, dtype: DType) -> KvSliceMut<'_> {
    match dtype {
        DType::F32 => KvSliceMut::F32(host.slot_f32_mut(slot)),
        DType::F16 => KvSliceMut::F16(host.slot_u16_mut(slot).reinterpret_cast_mut::<f16>()),
        DType::BF16 => KvSliceMut::BF16(host.slot_u16_mut(slot).reinterpret_cast_mut::<bf16>()),
    }
}

/// Calls `f` with `bytes` (a block as the store returned it) viewed as values of `dtype`:
/// borrowed when aligned (the store's staging buffers are), copied otherwise.
pub(crate) fn with_stored_kv<R>(bytes: &[u8], dtype: DType, f: impl FnOnce(KvSlice<'_>) -> R) -> R {
    match dtype {
        DType::F32 => f(KvSlice::F32(&f32_view(bytes))),
        DType::F16 => f(KvSlice::F16(u16_view(bytes).reinterpret_cast::<f16>())),
        DType::BF16 => f(KvSlice::BF16(u16_view(bytes).reinterpret_cast::<bf16>())),
    }
}

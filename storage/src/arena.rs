//! The host arena: one aligned, zeroed allocation made at start-up, and [`ArenaSlots`], an arena
//! carved into fixed-size slots with an O(1) free list (the host KV tier's storage).
//!
//! Invariants:
//! - a [`HostArena`] is exactly one allocation (an anonymous `mmap` for page alignment, else
//!   `std::alloc`) of `len` bytes aligned to `align`
//!   (a power of two, at least 4096); it is freed once, when the arena is dropped, and never
//!   resized, so addresses handed to the kernel (io_uring fixed buffers) stay valid for its life;
//! - the base pointer never leaves this crate;
//! - [`ArenaSlots`]: slot `i` is `[i * stride, i * stride + slot_bytes)` with `stride` the slot
//!   size rounded up to the arena alignment, so every slot starts aligned (f32 views are sound);
//!   `in_use() + free list length == capacity()` at all times, and a slot is on the free list
//!   if and only if its `in_use` bit is clear (double frees are refused).
//!
//! Page-locking: the arena will be registered with CUDA (`cuMemHostRegister`) so host↔device
//! copies run from pinned memory. That call will be made from inside this crate (a hook taking
//! the driver's register function), keeping the raw pointer here; until then the memory is
//! ordinary pageable memory, which io_uring and pread/pwrite use just as well.

use std::alloc::{self, Layout};
use std::ptr::NonNull;

use crate::error::StorageError;

/// The smallest alignment an arena gets: a page, which O_DIRECT and DMA both accept.
pub const MIN_ARENA_ALIGN: usize = 4096;

/// One aligned, zeroed allocation of host memory.
pub struct HostArena {
    base: NonNull<u8>,
    layout: Layout,
    /// Allocated with `mmap` (page alignment) rather than the global allocator.
    mapped: bool,
}

// SAFETY: the arena owns its allocation outright; it is plain memory with no thread affinity,
// and all access goes through `&self`/`&mut self` methods or through handles (`IoBuf`,
// `ArenaSlots`) that guarantee disjoint regions.
unsafe impl Send for HostArena {}
// SAFETY: `&HostArena` only exposes the length and alignment; the pointer is crate-private and
// crate code derives disjoint regions from it.
unsafe impl Sync for HostArena {}

/// Arenas from this size up ask for transparent huge pages ([`HostArena::new`]).
pub const HUGE_PAGE_ARENA_BYTES: usize = 64 << 20;

impl HostArena {
    /// Allocates `total_bytes` zeroed bytes aligned to `align`, a power of two (raised to 4096
    /// if smaller).
    pub fn new(total_bytes: usize, align: usize) -> Result<HostArena, StorageError> {
        if total_bytes == 0 || !align.is_power_of_two() {
            return Err(StorageError::InvalidConfig(format!(
                "host arena of {total_bytes} bytes aligned to {align}: size must be non-zero and \
                 alignment a power of two"
            )));
        }
        let align = align.max(MIN_ARENA_ALIGN);
        let alloc_err = || StorageError::Alloc {
            bytes: total_bytes as u64,
            align,
        };
        let layout = Layout::from_size_align(total_bytes, align).map_err(|_| alloc_err())?;
        if align == MIN_ARENA_ALIGN {
            // Anonymous mmap: page-aligned, zeroed by the kernel and committed lazily, so a large
            // budget costs nothing until blocks are written (an aligned `alloc_zeroed` would
            // memset every page up front).
            // SAFETY: a private anonymous mapping of a non-zero length with no address hint has
            // no preconditions; the result is checked against MAP_FAILED below.
            let raw = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    total_bytes,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            if raw == libc::MAP_FAILED {
                return Err(alloc_err());
            }
            if total_bytes >= HUGE_PAGE_ARENA_BYTES {
                // Host attention streams tens of GiB of arena: with 4 KiB pages its page tables
                // alone outgrow the caches, and every page crossed costs a table walk from
                // memory. Transparent huge pages where the kernel offers them (a hint: under
                // `enabled=never` nothing changes, and a failure is harmless).
                // SAFETY: `raw` is the start of a mapping of `total_bytes` just made; madvise
                // only changes how its pages are backed, not their contents.
                unsafe { libc::madvise(raw, total_bytes, libc::MADV_HUGEPAGE) };
            }
            let base = NonNull::new(raw.cast::<u8>()).ok_or_else(alloc_err)?;
            return Ok(HostArena {
                base,
                layout,
                mapped: true,
            });
        }
        // SAFETY: `layout` has a non-zero size (checked above).
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let base = NonNull::new(raw).ok_or_else(alloc_err)?;
        Ok(HostArena {
            base,
            layout,
            mapped: false,
        })
    }

    /// Size of the allocation in bytes.
    pub fn len(&self) -> usize {
        self.layout.size()
    }

    /// Always false: an arena has at least one byte.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Alignment of the base address in bytes.
    pub fn align(&self) -> usize {
        self.layout.align()
    }

    /// Base address; crate-private so raw pointers stay in this crate.
    pub(crate) fn base_ptr(&self) -> *mut u8 {
        self.base.as_ptr()
    }
}

impl Drop for HostArena {
    fn drop(&mut self) {
        if self.mapped {
            // SAFETY: `base` is the start of a mapping of exactly `layout.size()` bytes made in
            // `new`, unmapped only here; no borrow of it outlives the arena.
            unsafe { libc::munmap(self.base.as_ptr().cast(), self.layout.size()) };
        } else {
            // SAFETY: `base` was returned by `alloc_zeroed(self.layout)` and is freed only here.
            unsafe { alloc::dealloc(self.base.as_ptr(), self.layout) }
        }
    }
}

/// Index of one slot of an [`ArenaSlots`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SlotId(u32);

impl SlotId {
    pub fn index(self) -> u32 {
        self.0
    }
}

/// An arena carved into `capacity()` slots of `slot_bytes` bytes with an O(1) free list.
pub struct ArenaSlots {
    arena: HostArena,
    slot_bytes: usize,
    stride: usize,
    free: Vec<u32>,    // stack of free slot indices; top is handed out next
    in_use: Vec<bool>, // [capacity] true while allocated
}

impl ArenaSlots {
    /// Carves `arena` into slots of `slot_bytes` (a non-zero multiple of 4 so f32 views fit).
    pub fn new(arena: HostArena, slot_bytes: usize) -> Result<ArenaSlots, StorageError> {
        if slot_bytes == 0 || !slot_bytes.is_multiple_of(4) {
            return Err(StorageError::InvalidConfig(format!(
                "slot size {slot_bytes} bytes must be a non-zero multiple of 4"
            )));
        }
        let stride = slot_bytes.next_multiple_of(arena.align());
        let capacity = arena.len() / stride;
        let capacity = u32::try_from(capacity).map_err(|_| {
            StorageError::InvalidConfig(format!("{capacity} slots exceed the u32 slot index"))
        })?;
        Ok(ArenaSlots {
            arena,
            slot_bytes,
            stride,
            free: (0..capacity).rev().collect(),
            in_use: vec![false; capacity as usize],
        })
    }

    /// Allocates one arena of `slots * round_up(slot_bytes, 4096)` bytes and carves it.
    pub fn with_slots(slots: usize, slot_bytes: usize) -> Result<ArenaSlots, StorageError> {
        let stride = slot_bytes.next_multiple_of(MIN_ARENA_ALIGN);
        let total = stride.checked_mul(slots).ok_or_else(|| {
            StorageError::InvalidConfig(format!("{slots} slots of {slot_bytes} bytes overflow"))
        })?;
        ArenaSlots::new(HostArena::new(total, MIN_ARENA_ALIGN)?, slot_bytes)
    }

    /// Takes a free slot, or `None` when all `capacity()` slots are in use. O(1).
    pub fn alloc(&mut self) -> Option<SlotId> {
        let index = self.free.pop()?;
        self.in_use[index as usize] = true;
        Some(SlotId(index))
    }

    /// Returns a slot to the free list. O(1). Refuses foreign ids and double frees.
    pub fn free(&mut self, id: SlotId) -> Result<(), StorageError> {
        match self.in_use.get_mut(id.0 as usize) {
            None => Err(StorageError::InvalidSlot {
                slot: id.0,
                reason: "out of range",
            }),
            Some(false) => Err(StorageError::InvalidSlot {
                slot: id.0,
                reason: "already free",
            }),
            Some(bit) => {
                *bit = false;
                self.free.push(id.0);
                Ok(())
            }
        }
    }

    /// The bytes of a slot. Panics if `id` is out of range (an id from another arena): ids are
    /// produced by `alloc`, never by input.
    pub fn slot(&self, id: SlotId) -> &[u8] {
        let start = self.offset_of(id);
        // SAFETY: `offset_of` checked that `[start, start + slot_bytes)` lies inside the arena;
        // the memory is initialized (zeroed at allocation); `&self` forbids concurrent `&mut`.
        unsafe { std::slice::from_raw_parts(self.arena.base_ptr().add(start), self.slot_bytes) }
    }

    /// The bytes of a slot, mutably. Panics on an out-of-range id, as [`ArenaSlots::slot`].
    pub fn slot_mut(&mut self, id: SlotId) -> &mut [u8] {
        let start = self.offset_of(id);
        // SAFETY: as in `slot`, and `&mut self` makes this the only live view of the arena.
        unsafe { std::slice::from_raw_parts_mut(self.arena.base_ptr().add(start), self.slot_bytes) }
    }

    /// The slot as `slot_bytes / 4` f32 values.
    pub fn slot_f32(&self, id: SlotId) -> &[f32] {
        let start = self.offset_of(id);
        // SAFETY: in bounds as in `slot`; the address is aligned to the arena alignment (≥ 4096)
        // because `stride` is a multiple of it; `slot_bytes % 4 == 0`; every bit pattern is a
        // valid f32.
        unsafe {
            let ptr = self.arena.base_ptr().add(start).cast::<f32>();
            std::slice::from_raw_parts(ptr, self.slot_bytes / 4)
        }
    }

    /// The slot as `slot_bytes / 4` f32 values, mutably.
    pub fn slot_f32_mut(&mut self, id: SlotId) -> &mut [f32] {
        let start = self.offset_of(id);
        // SAFETY: as in `slot_f32`, and `&mut self` makes this the only live view.
        unsafe {
            let ptr = self.arena.base_ptr().add(start).cast::<f32>();
            std::slice::from_raw_parts_mut(ptr, self.slot_bytes / 4)
        }
    }

    /// The slot as `slot_bytes / 2` 16-bit values (f16 or bf16 bits: KV stored in half
    /// precision).
    pub fn slot_u16(&self, id: SlotId) -> &[u16] {
        let start = self.offset_of(id);
        // SAFETY: as in `slot_f32`: in bounds, aligned (≥ 4096), `slot_bytes % 4 == 0` so
        // `slot_bytes / 2` values fit, and every bit pattern is a valid u16.
        unsafe {
            let ptr = self.arena.base_ptr().add(start).cast::<u16>();
            std::slice::from_raw_parts(ptr, self.slot_bytes / 2)
        }
    }

    /// The slot as `slot_bytes / 2` 16-bit values, mutably.
    pub fn slot_u16_mut(&mut self, id: SlotId) -> &mut [u16] {
        let start = self.offset_of(id);
        // SAFETY: as in `slot_u16`, and `&mut self` makes this the only live view.
        unsafe {
            let ptr = self.arena.base_ptr().add(start).cast::<u16>();
            std::slice::from_raw_parts_mut(ptr, self.slot_bytes / 2)
        }
    }

    /// Several distinct slots as 16-bit values (as [`ArenaSlots::slot_u16_mut`]) at once, in the
    /// order of `ids`, so threads can fill them in parallel. Panics on an out-of-range id, as
    /// [`ArenaSlots::slot`]; refuses repeated ids.
    pub fn slots_u16_mut(&mut self, ids: &[SlotId]) -> Result<Vec<&mut [u16]>, StorageError> {
        // SAFETY: every bit pattern is a valid u16.
        unsafe { self.slots_as_mut(ids) }
    }

    /// Several distinct slots as f32 values at once (see [`ArenaSlots::slots_u16_mut`]).
    pub fn slots_f32_mut(&mut self, ids: &[SlotId]) -> Result<Vec<&mut [f32]>, StorageError> {
        // SAFETY: every bit pattern is a valid f32.
        unsafe { self.slots_as_mut(ids) }
    }

    /// Several distinct slots as bytes at once (see [`ArenaSlots::slots_u16_mut`]).
    pub fn slots_bytes_mut(&mut self, ids: &[SlotId]) -> Result<Vec<&mut [u8]>, StorageError> {
        // SAFETY: every bit pattern is a valid u8.
        unsafe { self.slots_as_mut(ids) }
    }

    /// Distinct slots as `slot_bytes / size_of::<T>()` values of `T` each.
    ///
    /// # Safety
    /// Every bit pattern must be a valid `T`, and `T`'s size and alignment must divide 4 (as
    /// `u16` and `f32` do).
    unsafe fn slots_as_mut<T>(&mut self, ids: &[SlotId]) -> Result<Vec<&mut [T]>, StorageError> {
        self.check_distinct(ids)?;
        let n = self.slot_bytes / std::mem::size_of::<T>();
        Ok(ids
            .iter()
            .map(|&id| {
                let start = self.offset_of(id);
                // SAFETY: in bounds (`offset_of`), aligned (slots start at multiples of the
                // arena alignment, ≥ 4096) and `slot_bytes % 4 == 0`, so n values of T fit; any
                // bit pattern is a T (the caller's contract); the ids are distinct (checked
                // above) and slots never overlap, so the views are disjoint, and `&mut self`
                // keeps every other view out while they live.
                unsafe {
                    let ptr = self.arena.base_ptr().add(start).cast::<T>();
                    std::slice::from_raw_parts_mut(ptr, n)
                }
            })
            .collect())
    }

    fn check_distinct(&self, ids: &[SlotId]) -> Result<(), StorageError> {
        let mut sorted: Vec<u32> = ids.iter().map(|id| id.0).collect();
        sorted.sort_unstable();
        match sorted.windows(2).find(|w| w[0] == w[1]) {
            Some(w) => Err(StorageError::InvalidSlot {
                slot: w[0],
                reason: "asked for twice",
            }),
            None => Ok(()),
        }
    }

    /// The arena's base address and length in bytes, for page-locking it for DMA (a GPU copy
    /// engine). Writing through the pointer is the caller's `unsafe` business.
    pub fn raw_region(&self) -> (*mut u8, usize) {
        (self.arena.base_ptr(), self.arena.len())
    }

    /// A slot's first byte, for a DMA engine to write into (see [`ArenaSlots::raw_region`]).
    /// Panics on an out-of-range id, as [`ArenaSlots::slot`].
    pub fn slot_ptr(&mut self, id: SlotId) -> *mut u8 {
        let start = self.offset_of(id);
        self.arena.base_ptr().wrapping_add(start)
    }

    /// Number of slots.
    pub fn capacity(&self) -> usize {
        self.in_use.len()
    }

    /// Number of allocated slots.
    pub fn in_use(&self) -> usize {
        self.capacity() - self.free.len()
    }

    /// Size of one slot in bytes.
    pub fn slot_bytes(&self) -> usize {
        self.slot_bytes
    }

    /// Distance between consecutive slots in bytes (slot `i` starts at `i · stride` from the
    /// region's base).
    pub fn slot_stride(&self) -> usize {
        self.stride
    }

    fn offset_of(&self, id: SlotId) -> usize {
        let index = id.0 as usize;
        assert!(
            index < self.in_use.len(),
            "slot {index} is not a slot of this arena"
        );
        index * self.stride
    }
}

/// Views bytes read from the store as the f32s they were written from (little-endian, as the
/// host wrote them). Staging buffers are page-aligned, so this borrows; an unaligned slice
/// (never produced by this crate) is copied instead.
pub fn f32_view(bytes: &[u8]) -> std::borrow::Cow<'_, [f32]> {
    // SAFETY: every bit pattern is a valid f32, and `align_to` only hands out the correctly
    // aligned middle part of the slice.
    let (pre, mid, post) = unsafe { bytes.align_to::<f32>() };
    if pre.is_empty() && post.is_empty() {
        std::borrow::Cow::Borrowed(mid)
    } else {
        std::borrow::Cow::Owned(
            bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        )
    }
}

/// Views bytes read from the store as the 16-bit values (f16 or bf16 bits) they were written
/// from, like [`f32_view`].
pub fn u16_view(bytes: &[u8]) -> std::borrow::Cow<'_, [u16]> {
    // SAFETY: every bit pattern is a valid u16, and `align_to` only hands out the correctly
    // aligned middle part of the slice.
    let (pre, mid, post) = unsafe { bytes.align_to::<u16>() };
    if pre.is_empty() && post.is_empty() {
        std::borrow::Cow::Borrowed(mid)
    } else {
        std::borrow::Cow::Owned(
            bytes
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arena_is_aligned_and_zeroed() -> Result<(), StorageError> {
        let arena = HostArena::new(3 * 4096 + 5, 4096)?;
        assert_eq!(arena.base_ptr() as usize % 4096, 0);
        assert_eq!(arena.len(), 3 * 4096 + 5);
        // SAFETY: the arena is `len` initialized bytes and no other view exists.
        let bytes = unsafe { std::slice::from_raw_parts(arena.base_ptr(), arena.len()) };
        assert!(bytes.iter().all(|&b| b == 0));
        assert!(HostArena::new(0, 4096).is_err());
        assert!(HostArena::new(4096, 3000).is_err());
        Ok(())
    }

    /// An arena large enough to ask for huge pages is still zeroed and keeps what is written,
    /// across the 2 MiB boundaries a huge page would span.
    #[test]
    fn a_huge_page_arena_is_zeroed_and_keeps_writes() -> Result<(), StorageError> {
        let len = HUGE_PAGE_ARENA_BYTES + 4096;
        let arena = HostArena::new(len, 4096)?;
        // SAFETY: the arena is `len` initialized bytes and this is the only view.
        let bytes = unsafe { std::slice::from_raw_parts_mut(arena.base_ptr(), arena.len()) };
        let probes: Vec<usize> = (0..len).step_by(1 << 20).chain([len - 1]).collect();
        assert!(probes.iter().all(|&i| bytes[i] == 0));
        for (n, &i) in probes.iter().enumerate() {
            bytes[i] = n as u8 | 1;
        }
        for (n, &i) in probes.iter().enumerate() {
            assert_eq!(bytes[i], n as u8 | 1, "byte {i}");
        }
        Ok(())
    }

    #[test]
    fn slots_never_exceed_capacity_and_free_list_is_exact() -> Result<(), StorageError> {
        let mut slots = ArenaSlots::with_slots(8, 1000)?;
        assert_eq!(slots.capacity(), 8);
        let mut taken = Vec::new();
        while let Some(id) = slots.alloc() {
            assert!(slots.in_use() <= slots.capacity());
            taken.push(id);
        }
        assert_eq!(taken.len(), 8);
        assert_eq!(slots.in_use(), 8);
        assert!(slots.alloc().is_none());
        slots.free(taken[3])?;
        assert!(slots.free(taken[3]).is_err(), "double free must be refused");
        assert_eq!(slots.in_use(), 7);
        assert_eq!(slots.alloc(), Some(taken[3]));
        for id in taken {
            slots.free(id)?;
        }
        assert_eq!(slots.in_use(), 0);
        Ok(())
    }

    #[test]
    fn slots_are_disjoint_and_f32_views_alias_bytes() -> Result<(), StorageError> {
        let mut slots = ArenaSlots::with_slots(4, 4096 + 8)?;
        let ids: Vec<SlotId> = (0..4).filter_map(|_| slots.alloc()).collect();
        for (k, &id) in ids.iter().enumerate() {
            slots.slot_mut(id).fill(k as u8 + 1);
        }
        for (k, &id) in ids.iter().enumerate() {
            assert!(slots.slot(id).iter().all(|&b| b == k as u8 + 1));
        }
        slots.slot_f32_mut(ids[1])[0] = 1.5;
        assert_eq!(&slots.slot(ids[1])[..4], &1.5f32.to_ne_bytes());
        assert_eq!(slots.slot_f32(ids[1]).len(), (4096 + 8) / 4);
        slots.slot_u16_mut(ids[2])[3] = 0xbeef;
        assert_eq!(&slots.slot(ids[2])[6..8], &0xbeefu16.to_ne_bytes());
        assert_eq!(slots.slot_u16(ids[2]).len(), (4096 + 8) / 2);
        assert_eq!(
            slots.slot_u16(ids[3])[0],
            0x0404,
            "a neighbour slot changed"
        );
        assert!(ArenaSlots::with_slots(2, 6).is_err());
        Ok(())
    }

    #[test]
    fn several_slots_at_once_are_the_slots_and_distinct() -> Result<(), StorageError> {
        let mut slots = ArenaSlots::with_slots(4, 4096)?;
        let ids: Vec<SlotId> = (0..4).filter_map(|_| slots.alloc()).collect();
        let picked = [ids[3], ids[0], ids[2]];
        for (k, view) in slots.slots_u16_mut(&picked)?.into_iter().enumerate() {
            view.fill(k as u16 + 1);
        }
        assert!(slots.slot_u16(ids[3]).iter().all(|&v| v == 1));
        assert!(slots.slot_u16(ids[0]).iter().all(|&v| v == 2));
        assert!(slots.slot_u16(ids[2]).iter().all(|&v| v == 3));
        assert!(
            slots.slot(ids[1]).iter().all(|&b| b == 0),
            "an unasked slot changed"
        );
        for view in slots.slots_f32_mut(&[ids[1]])? {
            view[1] = 2.5;
        }
        assert_eq!(slots.slot_f32(ids[1])[1], 2.5);
        for (k, view) in slots
            .slots_bytes_mut(&[ids[2], ids[3]])?
            .into_iter()
            .enumerate()
        {
            assert_eq!(view.len(), 4096);
            view[4095] = 7 + k as u8;
        }
        assert_eq!((slots.slot(ids[2])[4095], slots.slot(ids[3])[4095]), (7, 8));
        assert_eq!(
            slots.slot(ids[2])[0],
            3,
            "the bytes of the u16 written before"
        );
        assert!(slots.slots_bytes_mut(&[ids[3], ids[3]]).is_err());
        assert!(slots.slots_u16_mut(&[ids[0], ids[2], ids[0]]).is_err());
        assert!(slots.slots_f32_mut(&[ids[1], ids[1]]).is_err());
        Ok(())
    }

    #[test]
    fn u16_views_read_back_what_was_written_aligned_or_not() {
        let words = [0x3f80u16, 0xc040, 0x0001, 0xffff];
        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        assert_eq!(&*u16_view(&bytes), &words);
        let mut shifted = vec![0u8];
        shifted.extend_from_slice(&bytes);
        assert_eq!(&*u16_view(&shifted[1..]), &words);
    }
}

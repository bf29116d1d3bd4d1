//! Where a loaded model's block weights live: one mapping per [`CHUNK`] of weights, on
//! transparent huge pages, the buffers packed one after the other ([`WeightArena`]), each held
//! as a [`Buf`].
//!
//! Why: batch-1 decode reads every weight once per token, so the weights' TLB misses cost
//! time (with huge pages off for the whole process SmolLM2-135M decodes 20-30% slower on the
//! 2-core EPYC of README "Weight formats"), and their huge pages are worth having; but left
//! in the allocator's heap the weights lie scattered between the holes the load's temporaries
//! leave (rows read, parts stacked, blocks before their panels): the 135M's 94 MB of weights
//! over 65 huge pages of address space, only 21 of them seven-eighths weights. mimalloc asks
//! for huge pages over all its arenas, so the partly used ones stayed resident, 41 MB above
//! the weights with the model loaded (135 MB); asked for over the weights' addresses alone
//! (mimalloc built without them), they covered too little: decode 10-15% slower. Moved here
//! once laid out, the weights are contiguous on huge pages of their own, the only partly used
//! one each chunk's last, and what the load freed goes back to the system whole. Measured
//! (`cargo bench --bench model_throughput`, native): resident 135 -> 114 MB on the 135M,
//! 1197 -> 1140 MB on Qwen2.5-1.5B, whose batch-32 decode went from 106-114 to 124 tokens/s.
//! llama.cpp keeps one host buffer per model for its repacked weights in the same way.

use std::sync::{Arc, Mutex};

/// Bytes of one chunk of the arena (a buffer larger than this gets a mapping of its own size):
/// a model of N bytes leaves at most one partly used huge page per `CHUNK`.
pub const CHUNK: usize = 64 << 20;

/// Bytes of a transparent huge page (x86-64's, and most aarch64 kernels').
const HUGE_PAGE: usize = 2 << 20;

/// Every buffer starts at a multiple of this (a cache line; the kernels' loads are unaligned
/// but never split a line at a buffer's start).
const ALIGN: usize = 64;

/// One anonymous mapping, its usable part starting at a huge page boundary.
struct Chunk {
    /// Owns the mapping (unmapped on drop).
    _map: memmap2::MmapMut,
    /// The first huge page boundary inside the mapping.
    base: *mut u8,
    /// Usable bytes from `base`.
    len: usize,
}

// SAFETY: the chunk is plain memory; every `Buf` in it owns a disjoint range, and the chunk
// itself is only read through `base` by those.
unsafe impl Send for Chunk {}
unsafe impl Sync for Chunk {}

impl Chunk {
    /// A mapping of at least `len` bytes from a huge page boundary, advised for huge pages
    /// before anything touches it, so that its pages fault in as huge ones.
    fn map(len: usize) -> std::io::Result<Chunk> {
        let len = len.div_ceil(HUGE_PAGE) * HUGE_PAGE;
        let mut map = memmap2::MmapMut::map_anon(len + HUGE_PAGE)?;
        let start = map.as_mut_ptr();
        let skip = start.align_offset(HUGE_PAGE).min(HUGE_PAGE);
        #[cfg(target_os = "linux")]
        {
            // Best effort: a kernel without transparent huge pages (or with them `never`)
            // refuses, and the chunk stays on small pages, as any memory would.
            let _ = map.advise_range(memmap2::Advice::HugePage, skip, len);
        }
        Ok(Chunk {
            // SAFETY: `skip + len` ≤ the mapping's `len + HUGE_PAGE` bytes.
            base: unsafe { start.add(skip) },
            _map: map,
            len,
        })
    }
}

/// Weights' memory, filled a buffer at a time by [`WeightArena::place`]; what it has handed
/// out stays mapped as long as a [`Buf`] holds it, whatever becomes of the arena.
#[derive(Default)]
pub struct WeightArena {
    /// The chunk being filled and its bytes used.
    open: Mutex<Option<(Arc<Chunk>, usize)>>,
}

impl WeightArena {
    /// An arena with nothing mapped yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Moves `buf`'s values into the arena (a copy, then the heap buffer is freed); a buffer
    /// already in an arena, or empty, stays where it is. Where no memory can be mapped the
    /// values stay on the heap: the model runs the same, only without huge pages.
    pub fn place<T: Copy>(&self, buf: &mut Buf<T>) {
        let Buf(Repr::Heap(values)) = buf else { return };
        let bytes = std::mem::size_of_val(values.as_slice());
        if bytes == 0 || std::mem::align_of::<T>() > ALIGN {
            return;
        }
        let Some((chunk, offset)) = self.reserve(bytes) else {
            return;
        };
        // SAFETY: `reserve` handed out `bytes` bytes at `offset`, inside the chunk, aligned to
        // ALIGN (≥ T's alignment), to nothing else; the values are `Copy`, so copying their
        // bytes is a move, and the source is dropped right after as a plain Vec.
        let ptr = unsafe {
            let dst = chunk.base.add(offset).cast::<T>();
            std::ptr::copy_nonoverlapping(values.as_ptr(), dst, values.len());
            std::ptr::NonNull::new_unchecked(dst)
        };
        let len = values.len();
        *buf = Buf(Repr::Arena {
            _chunk: chunk,
            ptr,
            len,
        });
    }

    /// `bytes` bytes, aligned, in the open chunk or a new one: the chunk and the offset.
    fn reserve(&self, bytes: usize) -> Option<(Arc<Chunk>, usize)> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((chunk, used)) = open.as_mut() {
            let at = used.next_multiple_of(ALIGN);
            if at + bytes <= chunk.len {
                *used = at + bytes;
                return Some((chunk.clone(), at));
            }
        }
        let chunk = Arc::new(Chunk::map(bytes.max(CHUNK)).ok()?);
        if bytes < CHUNK {
            // A buffer of a chunk's size or more keeps its mapping to itself; the open chunk
            // goes on being filled.
            *open = Some((chunk.clone(), bytes));
        }
        Some((chunk, 0))
    }
}

/// A weight buffer: a plain vector while it is built, its values in a [`WeightArena`] once the
/// model is loaded. Reads as a slice either way; a clone is a vector of its own.
pub struct Buf<T>(Repr<T>);

enum Repr<T> {
    /// On the heap.
    Heap(Vec<T>),
    /// `len` values at `ptr`, inside `chunk`, owned by this buffer alone.
    Arena {
        /// Keeps the mapping alive.
        _chunk: Arc<Chunk>,
        ptr: std::ptr::NonNull<T>,
        len: usize,
    },
}

// SAFETY: a `Buf` owns its values like a `Vec` does (its arena range is its alone), so it may
// cross and be shared between threads whenever its values may.
unsafe impl<T: Send> Send for Buf<T> {}
unsafe impl<T: Sync> Sync for Buf<T> {}

impl<T> Buf<T> {
    /// The buffer as a growable vector (a copy to the heap when it is in an arena): for the
    /// scratch panels that are refilled product after product.
    pub fn vec_mut(&mut self) -> &mut Vec<T>
    where
        T: Copy,
    {
        if let Repr::Arena { .. } = self.0 {
            self.0 = Repr::Heap(self.to_vec());
        }
        match &mut self.0 {
            Repr::Heap(v) => v,
            Repr::Arena { .. } => unreachable!("moved to the heap above"),
        }
    }

    /// Whether the values are in an arena (on its huge pages).
    pub fn in_arena(&self) -> bool {
        matches!(self.0, Repr::Arena { .. })
    }

    /// Whether [`WeightArena::place`] has nothing left to move: the values are in an arena,
    /// or there are none.
    pub fn placed(&self) -> bool {
        self.is_empty() || self.in_arena()
    }
}

impl<T> Default for Buf<T> {
    fn default() -> Self {
        Buf(Repr::Heap(Vec::new()))
    }
}

impl<T> From<Vec<T>> for Buf<T> {
    fn from(v: Vec<T>) -> Self {
        Buf(Repr::Heap(v))
    }
}

impl<T> std::ops::Deref for Buf<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        match &self.0 {
            Repr::Heap(v) => v,
            // SAFETY: `len` initialized values at `ptr` (copied in by `place`), inside the
            // mapping `chunk` keeps alive.
            Repr::Arena { ptr, len, .. } => unsafe {
                std::slice::from_raw_parts(ptr.as_ptr(), *len)
            },
        }
    }
}

impl<T> std::ops::DerefMut for Buf<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        match &mut self.0 {
            Repr::Heap(v) => v,
            // SAFETY: as for `deref`, and no other buffer reaches this range.
            Repr::Arena { ptr, len, .. } => unsafe {
                std::slice::from_raw_parts_mut(ptr.as_ptr(), *len)
            },
        }
    }
}

impl<T: Clone> Clone for Buf<T> {
    fn clone(&self) -> Self {
        Buf(Repr::Heap(self.to_vec()))
    }
}

impl<T: PartialEq> PartialEq for Buf<T> {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl<T: std::fmt::Debug> std::fmt::Debug for Buf<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        (**self).fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placed_buffers_keep_their_values_apart_and_outlive_the_arena() {
        let arena = WeightArena::new();
        let mut a: Buf<u8> = (0..=255u8).cycle().take(1000).collect::<Vec<_>>().into();
        let mut b: Buf<f32> = vec![1.5f32, -2.0, 3.25].into();
        let mut empty: Buf<u64> = Vec::new().into();
        arena.place(&mut a);
        arena.place(&mut b);
        arena.place(&mut empty);
        assert!(a.in_arena() && b.in_arena() && !empty.in_arena());
        drop(arena);
        assert_eq!(a.len(), 1000);
        assert!(a.iter().enumerate().all(|(i, &v)| v == (i % 256) as u8));
        assert_eq!(&b[..], &[1.5, -2.0, 3.25]);
        // The second buffer starts past the first, aligned.
        let (pa, pb) = (a.as_ptr() as usize, b.as_ptr() as usize);
        assert!(pb >= pa + 1000 && pb % ALIGN == 0);
        // Writes through one buffer leave the other as it was; a clone is its own copy.
        b[0] = 9.0;
        let c = b.clone();
        b[1] = 7.0;
        assert_eq!((&c[..], a[0]), (&[9.0, -2.0, 3.25][..], 0));
        assert!(!c.in_arena());
    }

    #[test]
    fn a_buffer_past_the_open_chunk_gets_a_new_one() {
        let arena = WeightArena::new();
        let mut first: Buf<u8> = vec![1u8; CHUNK - 100].into();
        let mut second: Buf<u8> = vec![2u8; 200].into();
        let mut huge: Buf<u8> = vec![3u8; CHUNK + 1].into();
        let mut third: Buf<u8> = vec![4u8; 10].into();
        for b in [&mut first, &mut second, &mut huge, &mut third] {
            arena.place(b);
        }
        let at = |b: &Buf<u8>| b.as_ptr() as usize;
        // `second` did not fit after `first`: it opened a chunk, at a huge page boundary;
        // `huge` got a mapping of its own and `third` went on after `second`.
        assert_eq!(at(&second) % HUGE_PAGE, 0);
        assert_eq!(at(&third), at(&second) + 256);
        assert!(first.iter().all(|&v| v == 1) && second.iter().all(|&v| v == 2));
        assert!(huge.iter().all(|&v| v == 3) && third.iter().all(|&v| v == 4));
        // Turned back into a vector, the buffer grows and keeps its values.
        third.vec_mut().push(5);
        assert_eq!(
            &third[..],
            &[4; 10].iter().copied().chain([5]).collect::<Vec<_>>()[..]
        );
    }
}

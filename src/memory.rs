//! Handing freed memory back to the operating system. The binary's allocator (mimalloc, see
//! `main.rs`) keeps the pages a thread frees for that thread's next allocations, which is what
//! makes the model's per-layer tensors cheap; but a thread that then goes idle (the model server
//! between batches, a training thread at its end) would hold them while another thread (the next
//! training) needs as much again, and the process's peak would be the sum of the two.

/// Returns the calling thread's free pages to the operating system (`mi_collect(true)`). Cheap
/// (it walks the thread's heap, milliseconds); call it when a thread goes idle, not per
/// allocation. Harmless when mimalloc is not the global allocator (its heap is then empty).
pub fn release_free_memory() {
    // SAFETY: mi_collect takes no pointers and may be called from any thread at any time.
    unsafe { libmimalloc_sys::mi_collect(true) }
}

/// [`release_free_memory`] on the calling thread and on every thread of rayon's pool. The
/// model's products run on rayon's threads, so what they allocated and freed (a load's rows
/// and stacked parts, a training's activations) sits in their heaps, which the calling
/// thread's collection does not reach. Call it when a large piece of work has ended, not while
/// a latency matters: it waits for each pool thread to finish the task in hand.
pub fn release_free_memory_everywhere() {
    release_free_memory();
    rayon::broadcast(|_| release_free_memory());
}

//! A global allocator for test binaries that need to see how much a reader allocates: it records, per
//! thread, the largest single request since the last [`reset_peak`], and refuses (so the process
//! aborts with "memory allocation of N bytes failed") any single request above [`HARD_CAP`], so a
//! reader that sizes a buffer from a lying header fails the test instead of exhausting the machine.
//!
//! Include with `#[path = "common/alloc_cap.rs"] mod alloc_cap;` and
//! `#[global_allocator] static A: alloc_cap::CapAlloc = alloc_cap::CapAlloc;`.
//! Only Rust allocations are seen (libhdf5 allocates with its own malloc calls).

#![allow(dead_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

/// No test input is allowed to make one Rust allocation larger than this.
pub const HARD_CAP: usize = 1 << 30;

thread_local! {
    static PEAK: Cell<usize> = const { Cell::new(0) };
}

pub struct CapAlloc;

fn note(size: usize) -> bool {
    // `try_with`: during thread teardown the slot may be gone; still enforce the cap.
    let _ = PEAK.try_with(|p| {
        if size > p.get() {
            p.set(size)
        }
    });
    size <= HARD_CAP
}

unsafe impl GlobalAlloc for CapAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if !note(layout.size()) {
            return std::ptr::null_mut();
        }
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if !note(layout.size()) {
            return std::ptr::null_mut();
        }
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if !note(new_size) {
            return std::ptr::null_mut();
        }
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// Forgets this thread's peak.
pub fn reset_peak() {
    PEAK.with(|p| p.set(0));
}

/// The largest single allocation this thread requested since [`reset_peak`].
pub fn peak() -> usize {
    PEAK.with(|p| p.get())
}

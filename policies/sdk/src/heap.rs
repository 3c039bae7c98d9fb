//! The module's allocator: a bump allocator over the instance's linear memory, growing it only
//! when what is already there runs out.
//!
//! The host gives every evaluation a fresh instance and throws it away afterwards, so nothing
//! allocated ever needs to be reused: handing out the next free bytes and never looking back
//! is all an allocator has to do. It also keeps an evaluation from costing the host kernel
//! work. The toolchain's default allocator asks for new pages (`memory.grow`) on its first
//! allocation, ignoring the free memory the module starts with, and every growth makes the
//! host change the protection of the instance's memory (`mprotect`), twice per evaluation,
//! each a TLB shootdown on every core the host runs on. This one starts at `__heap_base` and
//! uses the module's initial memory (`--initial-memory` in `.cargo/config.toml`) first; only a
//! message too large for it grows memory, up to the host's cap.
//!
//! Freeing the most recent allocation, and growing it in place, give its bytes back, which is
//! what a growing `String` or `Vec` being built does.

use core::alloc::{GlobalAlloc, Layout};
use core::arch::wasm32;
use core::cell::Cell;
use core::ptr;

const PAGE: usize = 65_536;

unsafe extern "C" {
    /// Where the linker put the end of the stack and static data: the first free byte.
    static __heap_base: u8;
}

pub struct Bump {
    /// The next free byte; 0 until the first allocation.
    next: Cell<usize>,
}

// SAFETY: a policy module has one thread (wasm32 without the threads feature).
unsafe impl Sync for Bump {}

#[global_allocator]
static HEAP: Bump = Bump {
    next: Cell::new(0),
};

impl Bump {
    fn next(&self) -> usize {
        match self.next.get() {
            0 => &raw const __heap_base as usize,
            next => next,
        }
    }

    /// Makes `end` addressable, growing memory if it is not yet; false when memory cannot grow.
    fn reserve_to(end: usize) -> bool {
        let have = wasm32::memory_size(0) * PAGE;
        end <= have || wasm32::memory_grow(0, (end - have).div_ceil(PAGE)) != usize::MAX
    }

    fn is_last(&self, ptr: *mut u8, size: usize) -> bool {
        ptr as usize + size == self.next()
    }
}

unsafe impl GlobalAlloc for Bump {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let Some(start) = self.next().checked_next_multiple_of(layout.align()) else {
            return ptr::null_mut();
        };
        let Some(end) = start.checked_add(layout.size()) else {
            return ptr::null_mut();
        };
        if !Self::reserve_to(end) {
            return ptr::null_mut();
        }
        self.next.set(end);
        start as *mut u8
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if self.is_last(ptr, layout.size()) {
            self.next.set(ptr as usize);
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if self.is_last(ptr, layout.size()) {
            let Some(end) = (ptr as usize).checked_add(new_size) else {
                return ptr::null_mut();
            };
            if !Self::reserve_to(end) {
                return ptr::null_mut();
            }
            self.next.set(end);
            return ptr;
        }
        // SAFETY: the layout of the new block is valid: `new_size` with the old alignment.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        // SAFETY: as `GlobalAlloc::realloc` requires of its caller.
        let new = unsafe { self.alloc(new_layout) };
        if !new.is_null() {
            // SAFETY: both blocks are live and distinct (`new` lies after `ptr`'s block).
            unsafe { ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size)) };
        }
        new
    }
}

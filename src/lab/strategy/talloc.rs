//! Samba's talloc over FFI (feature `talloc`, links the system libtalloc): a root is a new
//! top-level context, a linked block is a child allocated on it, and freeing the root frees
//! the whole tree. talloc is not thread-safe, so every call holds one global mutex.

use super::Strategy;
use crate::Scode;
use std::ffi::{c_char, c_int, c_void, CStr};
use std::ptr::{self, NonNull};
use std::sync::{Mutex, MutexGuard, PoisonError};

// The exported functions behind talloc.h's macros: `talloc_size(ctx, n)` expands to
// `talloc_named_const(ctx, n, __location__)` and `talloc_free(p)` to `_talloc_free(p, __location__)`.
unsafe extern "C" {
    fn talloc_named_const(context: *const c_void, size: usize, name: *const c_char) -> *mut c_void;
    fn _talloc_free(ptr: *mut c_void, location: *const c_char) -> c_int;
    #[cfg(test)]
    fn talloc_total_blocks(ptr: *const c_void) -> usize;
}

/// The name talloc stores in each block (talloc.h uses the call site, `__location__`).
const NAME: &CStr = c"mapialloc-lab";

/// Serialises every talloc call: talloc's trees and its global state are not thread-safe.
static LOCK: Mutex<()> = Mutex::new(());

fn lock() -> MutexGuard<'static, ()> {
    LOCK.lock().unwrap_or_else(PoisonError::into_inner)
}

/// talloc, behind a global mutex.
#[derive(Debug, Default)]
pub struct Talloc;

impl Talloc {
    /// `talloc_size(parent, size)`, NULL `parent` for a new top-level context.
    fn allocate(parent: *const c_void, size: usize) -> Result<NonNull<u8>, Scode> {
        let _guard = lock();
        // SAFETY: `parent` is NULL or a live talloc context (the trait's contract on roots);
        // the name is a static C string; the global lock is held.
        let p = unsafe { talloc_named_const(parent, size, NAME.as_ptr()) };
        NonNull::new(p.cast()).ok_or(Scode::MAPI_E_NOT_ENOUGH_MEMORY)
    }
}

impl Strategy for Talloc {
    const NAME: &'static str = "talloc";
    const RACE_SAFE: bool = true;

    fn new() -> Self {
        Talloc
    }

    fn allocate_buffer(&self, size: usize) -> Result<NonNull<u8>, Scode> {
        Talloc::allocate(ptr::null(), size)
    }

    fn allocate_more(&self, size: usize, root: NonNull<u8>) -> Result<NonNull<u8>, Scode> {
        Talloc::allocate(root.as_ptr().cast(), size)
    }

    unsafe fn free_buffer(&self, root: NonNull<u8>) {
        let _guard = lock();
        // SAFETY: `root` is a live top-level context nobody else uses (the caller's
        // contract); the location is a static C string; the global lock is held.
        let status = unsafe { _talloc_free(root.as_ptr().cast(), NAME.as_ptr()) };
        debug_assert_eq!(status, 0, "talloc_free refused a root");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lab::strategy::tests::chain_round_trip;

    #[test]
    fn a_root_and_its_children_form_one_tree() {
        let root = Talloc.allocate_buffer(64).unwrap();
        for _ in 0..10 {
            Talloc.allocate_more(24, root).unwrap();
        }
        let guard = lock();
        // SAFETY: `root` is a live context; the lock is held.
        assert_eq!(unsafe { talloc_total_blocks(root.as_ptr().cast()) }, 11);
        drop(guard);
        // SAFETY: `root` is live and unused afterwards.
        unsafe { Talloc.free_buffer(root) };
    }

    #[test]
    fn round_trip() {
        chain_round_trip(&Talloc, 100);
    }
}

//! The C ABI: MAPI's three memory calls over the process-wide default heap, the provider
//! triple, and the heap's counters for C.
//!
//! `include/mapialloc.h` is generated from this file by cbindgen (`tests/header.rs`, which
//! also fails when the checked-in header is stale), so the doc comments here are the C
//! contracts: they name the C parameters and say what NULL means and who owns what.
//!
//! Invariants of this layer:
//! - No panic crosses the boundary: every export runs inside [`boundary`], which aborts the
//!   process if the engine panics (that is an internal invariant failure). Errors are
//!   returned as SCODEs, never as panics.
//! - Every failing allocation stores NULL through its out pointer; a NULL out pointer is
//!   `MAPI_E_INVALID_PARAMETER` and nothing is allocated.
//! - This module validates arguments and calls [`crate::heap`]; it does no pointer
//!   arithmetic and never reads or writes a block. Pointer validation (foreign, freed and
//!   linked pointers) belongs to the engine.
//!
//! The exports use `extern "system"`, as MAPI does: `__stdcall` on 32-bit Windows, the C
//! calling convention on every other target. The header declares the C convention and
//! refuses to compile on 32-bit Windows.
//!
//! Setting `MAPIALLOC_TRACE=path` records every call of the three MAPI exports into a trace
//! file, and `MAPIALLOC_LEAKS=1` prints the live roots at exit; both are read at the first
//! MAPI call ([`crate::trace`]). Untraced, a call pays one load and a branch for this.
//!
//! Names are MAPI's, verbatim (`MAPIAllocateBuffer`, `cbSize`, `lppBuffer`), so that the
//! header reads like `MAPIX.h` and MAPI's documentation applies word for word.
#![allow(non_snake_case)]

use crate::trace::{self, Call, Status};
use crate::{default_heap, Scode, Stats};
use std::ffi::c_void;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::ptr;

/// MAPI `ULONG`: a 32-bit unsigned integer (here, a byte count).
pub type ULONG = u32;

/// MAPI `SCODE`: a 32-bit status code; success is 0 and errors have the top bit set.
pub type SCODE = i32;

/// MAPI `LPVOID`: an untyped pointer to memory.
pub type LPVOID = *mut c_void;

/// Success.
pub const S_OK: SCODE = 0;

/// The allocator could not get the memory (`0x8007000E`).
pub const MAPI_E_NOT_ENOUGH_MEMORY: SCODE = 0x8007_000E_u32 as SCODE;

/// A parameter was invalid: a NULL out pointer, or a parent that is not a live root
/// (`0x80070057`).
pub const MAPI_E_INVALID_PARAMETER: SCODE = 0x8007_0057_u32 as SCODE;

// The C constants are the engine's codes, spelled as literals so cbindgen can print them.
const _: () = assert!(S_OK == Scode::S_OK.0);
const _: () = assert!(MAPI_E_NOT_ENOUGH_MEMORY == Scode::MAPI_E_NOT_ENOUGH_MEMORY.0);
const _: () = assert!(MAPI_E_INVALID_PARAMETER == Scode::MAPI_E_INVALID_PARAMETER.0);

/// MAPI `LPALLOCATEBUFFER`: a pointer to a function shaped like `MAPIAllocateBuffer`.
pub type LPALLOCATEBUFFER =
    Option<unsafe extern "system" fn(cbSize: ULONG, lppBuffer: *mut LPVOID) -> SCODE>;

/// MAPI `LPALLOCATEMORE`: a pointer to a function shaped like `MAPIAllocateMore`.
pub type LPALLOCATEMORE = Option<
    unsafe extern "system" fn(cbSize: ULONG, lpObject: LPVOID, lppBuffer: *mut LPVOID) -> SCODE,
>;

/// MAPI `LPFREEBUFFER`: a pointer to a function shaped like `MAPIFreeBuffer`.
pub type LPFREEBUFFER = Option<unsafe extern "system" fn(lpBuffer: LPVOID) -> ULONG>;

/// A snapshot of the default heap's counters (`struct mapialloc_stats` in C), filled in by
/// `mapialloc_stats`. Counters are summed over threads when read, so a snapshot taken while
/// other threads allocate is approximate; one taken while no call runs is exact.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MapiallocStats {
    /// Roots allocated and not yet freed.
    pub live_roots: u64,
    /// Blocks allocated and not yet freed: roots plus linked blocks.
    pub live_blocks: u64,
    /// Usable bytes of the live blocks (a block's size-class capacity, or for a small linked
    /// block carved from a chunk its size rounded up to 16; not the size asked for).
    pub live_bytes: u64,
    /// Bytes the heap holds committed from the OS (pages in use or cached, large spans).
    pub os_committed_bytes: u64,
    /// Blocks returned by a thread that did not own their page (a chunk of carved linked
    /// blocks counts once).
    pub remote_frees: u64,
    /// `MAPIFreeBuffer` on a root that was already freed (or that lost a race to free it).
    pub double_frees: u64,
    /// `MAPIFreeBuffer` on a linked block (a linked block is never freed on its own).
    pub linked_frees: u64,
    /// `MAPIFreeBuffer` on a pointer that is not a block start of this allocator.
    pub foreign_frees: u64,
    /// `MAPIAllocateMore` whose `lpObject` is NULL, freed, a linked block, or foreign.
    pub bad_parents: u64,
    /// Block headers found overwritten by a write past the end of the block before them
    /// (checked only by a library built with the `hardened` feature; 0 otherwise).
    pub corruptions: u64,
}

impl From<Stats> for MapiallocStats {
    fn from(s: Stats) -> Self {
        MapiallocStats {
            live_roots: s.live_roots,
            live_blocks: s.live_blocks,
            live_bytes: s.live_bytes,
            os_committed_bytes: s.os_committed_bytes,
            remote_frees: s.remote_frees,
            double_frees: s.double_frees,
            linked_frees: s.linked_frees,
            foreign_frees: s.foreign_frees,
            bad_parents: s.bad_parents,
            corruptions: s.corruptions,
        }
    }
}

/// Runs `f` and returns its result; aborts the process if `f` panics, so that no unwind
/// crosses the C boundary.
///
/// A panic below this layer is an internal invariant failure (argument errors are returned
/// as `Err(Scode)`), and the heap cannot be trusted after one, so aborting is the only
/// answer; the panic hook has already printed the message. `AssertUnwindSafe` is sound
/// because nothing is observed after a panic.
#[inline]
fn boundary<R>(f: impl FnOnce() -> R) -> R {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(_) => abort_after_panic(),
    }
}

/// The only answer to a panic at the boundary (kept out of line: it never runs).
#[cold]
#[inline(never)]
fn abort_after_panic() -> ! {
    std::process::abort()
}

/// The byte count a C caller asked for, as the engine takes it.
fn byte_count(cb_size: ULONG) -> Result<usize, Scode> {
    // Lossless on every target with 32-bit or wider pointers; refused otherwise.
    usize::try_from(cb_size).map_err(|_| Scode::MAPI_E_NOT_ENOUGH_MEMORY)
}

/// Stores an allocation result through a non-NULL out pointer: the block on success, NULL
/// on failure.
///
/// # Safety
/// - `out` is non-NULL, aligned and valid for a pointer-sized write.
unsafe fn store_result(out: *mut LPVOID, result: Result<ptr::NonNull<u8>, Scode>) -> SCODE {
    let (value, code) = match result {
        Ok(block) => (block.as_ptr().cast::<c_void>(), Scode::S_OK),
        Err(code) => (ptr::null_mut(), code),
    };
    // SAFETY: the caller guarantees `out` is non-NULL, aligned and writable.
    unsafe { out.write(value) };
    code.0
}

/// Traces an allocation call that returned `result`, made at `time_ns` (see
/// [`crate::trace`] for which instant). `pointer` is the root's address. Out of line: it is
/// never on the untraced path.
#[cold]
#[inline(never)]
fn record_allocation(
    recorder: &trace::Recorder,
    call: Call,
    cb_size: ULONG,
    pointer: u64,
    result: &Result<ptr::NonNull<u8>, Scode>,
    time_ns: u64,
) {
    let status = result.map_or_else(Status::of_scode, |_| Status::Ok);
    recorder.record(call, status, cb_size, pointer, time_ns);
}

/// Writes `value` through `out` unless `out` is NULL.
///
/// # Safety
/// - `out` is NULL, or aligned and valid for writing one `T`.
unsafe fn write_unless_null<T>(out: *mut T, value: T) {
    if !out.is_null() {
        // SAFETY: `out` is non-NULL, and the caller guarantees it is aligned and writable.
        unsafe { out.write(value) };
    }
}

/// Allocates a root buffer of `cbSize` bytes.
///
/// On success returns `S_OK` and stores in `*lppBuffer` a pointer aligned to 16 bytes, valid
/// for `cbSize` bytes of reads and writes (contents unspecified). `cbSize == 0` succeeds with
/// a unique non-NULL pointer that is freed and linked to like any other. The caller owns the
/// root: release it, and every block linked to it, with one `MAPIFreeBuffer` call.
///
/// Errors:
/// - `MAPI_E_INVALID_PARAMETER` when `lppBuffer` is NULL; nothing is allocated.
/// - `MAPI_E_NOT_ENOUGH_MEMORY` when the memory cannot be had (including sizes near
///   0xFFFFFFFF); `*lppBuffer` is set to NULL.
///
/// Thread-safe: any thread may call it, and any thread may free the result.
///
/// # Safety
/// - `lppBuffer` is NULL, or aligned and valid for writing one pointer.
#[no_mangle]
pub unsafe extern "system" fn MAPIAllocateBuffer(cbSize: ULONG, lppBuffer: *mut LPVOID) -> SCODE {
    boundary(|| {
        if lppBuffer.is_null() {
            return MAPI_E_INVALID_PARAMETER;
        }
        let result = byte_count(cbSize).and_then(|size| default_heap().allocate_buffer(size));
        if let Some(recorder) = trace::recorder() {
            // Timed after the call: the root cannot reach another thread before that.
            let root = result.map_or(0, |block| block.as_ptr() as u64);
            let time_ns = recorder.now();
            record_allocation(
                recorder,
                Call::AllocateBuffer,
                cbSize,
                root,
                &result,
                time_ns,
            );
        }
        // SAFETY: `lppBuffer` is non-NULL (checked above), and the caller guarantees it is
        // aligned and writable.
        unsafe { store_result(lppBuffer, result) }
    })
}

/// Allocates `cbSize` bytes linked to the root `lpObject`: the new block is freed when that
/// root is freed, and never on its own.
///
/// On success returns `S_OK` and stores in `*lppBuffer` a pointer aligned to 16 bytes, valid
/// for `cbSize` bytes (contents unspecified) until `MAPIFreeBuffer(lpObject)`. The root's
/// owner owns the block. Linking costs O(1) however long the chain is, and several threads
/// may link to the same root at once.
///
/// Errors (`*lppBuffer` is set to NULL on each, when `lppBuffer` is not NULL):
/// - `MAPI_E_INVALID_PARAMETER` when `lppBuffer` is NULL (nothing is allocated), or when
///   `lpObject` is NULL, a linked block, a root already freed (or freed while this call
///   runs, when the free wins the race), or a pointer the allocator can tell is not its
///   own. Each bad `lpObject` is counted in `mapialloc_stats.bad_parents`; nothing is
///   corrupted and no memory leaks.
/// - `MAPI_E_NOT_ENOUGH_MEMORY` when the memory cannot be had.
///
/// `lpObject` may hold any value: pointers that are not live roots are answered as above,
/// except a root freed earlier whose address a later allocation has handed out again, which
/// cannot be told from the new block: the link then goes to the new block (as in MAPI).
///
/// # Safety
/// - `lppBuffer` is NULL, or aligned and valid for writing one pointer.
#[no_mangle]
pub unsafe extern "system" fn MAPIAllocateMore(
    cbSize: ULONG,
    lpObject: LPVOID,
    lppBuffer: *mut LPVOID,
) -> SCODE {
    boundary(|| {
        if lppBuffer.is_null() {
            return MAPI_E_INVALID_PARAMETER;
        }
        let parent = lpObject.cast::<u8>();
        let recorder = trace::recorder();
        // Timed before the call: a root freed while the call runs may be handed out again
        // before it returns, and the link belongs to the old root (see `crate::trace`).
        let time_ns = recorder.map(trace::Recorder::now);
        let result = byte_count(cbSize).and_then(|size| default_heap().allocate_more(size, parent));
        if let (Some(recorder), Some(time_ns)) = (recorder, time_ns) {
            let root = parent as u64;
            record_allocation(recorder, Call::AllocateMore, cbSize, root, &result, time_ns);
        }
        // SAFETY: `lppBuffer` is non-NULL (checked above), and the caller guarantees it is
        // aligned and writable.
        unsafe { store_result(lppBuffer, result) }
    })
}

/// Frees the root `lpBuffer` and every block linked to it, in one call. Always returns 0.
///
/// - NULL: nothing is touched.
/// - A live root: the root and its whole chain are freed. Any thread may free any root;
///   no lock is taken. When two threads race to free one root, exactly one frees it.
/// - A linked block, a root already freed, or a pointer the allocator can tell is not its
///   own (outside its memory, or not at a block start): nothing is freed; the misuse is
///   counted in `mapialloc_stats` (`linked_frees`, `double_frees`, `foreign_frees`).
///
/// `lpBuffer` may hold any value.
///
/// # Safety
/// - After the call, neither the root nor any block linked to it is used.
/// - A root freed earlier whose address a later allocation has handed out again cannot be
///   told from the new block: freeing it again frees the new block (undefined in MAPI too).
#[no_mangle]
pub unsafe extern "system" fn MAPIFreeBuffer(lpBuffer: LPVOID) -> ULONG {
    boundary(|| {
        let recorder = trace::recorder();
        // Timed before the call: the address may be handed out again before the call returns
        // (see `crate::trace`).
        let time_ns = recorder.map(trace::Recorder::now);
        // SAFETY: `Heap::free_buffer` accepts any pointer value (it validates before touching
        // anything and answers misuse with a counted no-op); its conditions, no use of the
        // chain after the call and the stale-address caveat, are this function's `# Safety`,
        // passed on to the caller.
        let outcome = unsafe { default_heap().free_buffer(lpBuffer.cast::<u8>()) };
        if let (Some(recorder), Some(time_ns)) = (recorder, time_ns) {
            let status = Status::of_free(outcome);
            recorder.record(Call::FreeBuffer, status, 0, lpBuffer as u64, time_ns);
        }
        0
    })
}

/// Hands out the allocation triple, as `IMAPISupport::GetMemAllocRoutines` does for a
/// provider: `MAPIAllocateBuffer`, `MAPIAllocateMore` and `MAPIFreeBuffer` of this library.
///
/// Pointers obtained through the triple and through the direct exports are
/// interchangeable: a root from one may be linked to or freed through the other.
///
/// Returns `S_OK` with all three out pointers set, or `MAPI_E_INVALID_PARAMETER` when any
/// out pointer is NULL; then every non-NULL out pointer is set to NULL.
///
/// # Safety
/// - Each out pointer is NULL, or aligned and valid for writing one function pointer.
#[no_mangle]
pub unsafe extern "system" fn mapialloc_mem_alloc_routines(
    lpAllocateBuffer: *mut LPALLOCATEBUFFER,
    lpAllocateMore: *mut LPALLOCATEMORE,
    lpFreeBuffer: *mut LPFREEBUFFER,
) -> SCODE {
    boundary(|| {
        let all_present =
            !lpAllocateBuffer.is_null() && !lpAllocateMore.is_null() && !lpFreeBuffer.is_null();
        let (buffer, more, free): (LPALLOCATEBUFFER, LPALLOCATEMORE, LPFREEBUFFER) = if all_present
        {
            (
                Some(MAPIAllocateBuffer),
                Some(MAPIAllocateMore),
                Some(MAPIFreeBuffer),
            )
        } else {
            (None, None, None)
        };
        // SAFETY: the caller guarantees each out pointer is NULL, or aligned and writable.
        unsafe {
            write_unless_null(lpAllocateBuffer, buffer);
            write_unless_null(lpAllocateMore, more);
            write_unless_null(lpFreeBuffer, free);
        }
        if all_present {
            S_OK
        } else {
            MAPI_E_INVALID_PARAMETER
        }
    })
}

/// Fills `*lpStats` with a snapshot of the default heap's counters.
///
/// Returns `S_OK`, or `MAPI_E_INVALID_PARAMETER` when `lpStats` is NULL. Reads the
/// counters without taking a lock; any thread may call it at any time.
///
/// # Safety
/// - `lpStats` is NULL, or aligned and valid for writing one `struct mapialloc_stats`.
#[no_mangle]
pub unsafe extern "system" fn mapialloc_stats(lpStats: *mut MapiallocStats) -> SCODE {
    boundary(|| {
        if lpStats.is_null() {
            return MAPI_E_INVALID_PARAMETER;
        }
        let snapshot = MapiallocStats::from(default_heap().stats());
        // SAFETY: `lpStats` is non-NULL (checked above), and the caller guarantees it is
        // aligned and writable.
        unsafe { lpStats.write(snapshot) };
        S_OK
    })
}

/// Gives the default heap's idle memory back: adopts pages of exited threads, returns the
/// calling thread's empty pages to the pool (decommitting past a small bound) and lets
/// deferred returns to the OS run. Other threads' caches are left alone.
///
/// Live blocks are untouched; any thread may call it at any time.
#[no_mangle]
pub extern "system" fn mapialloc_collect() {
    boundary(|| default_heap().collect());
}

/// Hands the calling thread's cached pages back to the default heap, as thread exit does.
///
/// For threads that stay alive but stop allocating (pool threads going idle). Live blocks
/// stay valid and may still be freed from any thread; the thread may keep allocating
/// afterwards. When no other thread holds a cache of the heap any more (each has exited or
/// called this), the heap's idle pool also shrinks from up to 2 MiB to 1 MiB.
#[no_mangle]
pub extern "system" fn mapialloc_release_thread_cache() {
    boundary(|| default_heap().release_thread_cache());
}

#[cfg(test)]
mod tests {
    //! Argument handling of the exports. Counter deltas are checked from C
    //! (`tests/c/mapi_test.c`), in a process where nothing else allocates at the same time.
    use super::*;

    const SENTINEL: LPVOID = ptr::without_provenance_mut(0x5a5a_5a50);

    #[test]
    fn null_out_pointers_are_invalid_parameter() {
        // SAFETY: NULL out pointers are allowed; the parent is a live root.
        unsafe {
            assert_eq!(
                MAPIAllocateBuffer(8, ptr::null_mut()),
                MAPI_E_INVALID_PARAMETER
            );
            let mut root = SENTINEL;
            assert_eq!(MAPIAllocateBuffer(8, &mut root), S_OK);
            assert_eq!(
                MAPIAllocateMore(8, root, ptr::null_mut()),
                MAPI_E_INVALID_PARAMETER
            );
            assert_eq!(mapialloc_stats(ptr::null_mut()), MAPI_E_INVALID_PARAMETER);
            assert_eq!(MAPIFreeBuffer(root), 0);
        }
    }

    #[test]
    fn failures_store_null() {
        let mut p = SENTINEL;
        // SAFETY: `p` is a valid out pointer; a NULL parent is allowed.
        unsafe {
            assert_eq!(
                MAPIAllocateBuffer(u32::MAX, &mut p),
                MAPI_E_NOT_ENOUGH_MEMORY
            );
            assert!(p.is_null());
            p = SENTINEL;
            assert_eq!(
                MAPIAllocateMore(8, ptr::null_mut(), &mut p),
                MAPI_E_INVALID_PARAMETER
            );
            assert!(p.is_null());
        }
    }

    #[test]
    fn triple_is_the_exports_and_needs_every_out_pointer() {
        let (mut buffer, mut more, mut free): (LPALLOCATEBUFFER, LPALLOCATEMORE, LPFREEBUFFER) =
            (None, None, None);
        // SAFETY: every out pointer is a valid local.
        let code = unsafe { mapialloc_mem_alloc_routines(&mut buffer, &mut more, &mut free) };
        assert_eq!(code, S_OK);
        let (buffer, more, free) = (buffer.unwrap(), more.unwrap(), free.unwrap());
        let (mut root, mut linked) = (SENTINEL, SENTINEL);
        // SAFETY: the triple is the three exports, called with valid out pointers on a
        // root obtained from them.
        unsafe {
            assert_eq!(buffer(16, &mut root), S_OK);
            assert_eq!(more(16, root, &mut linked), S_OK);
            assert_eq!(free(root), 0);
        }

        let mut free_out: LPFREEBUFFER = Some(MAPIFreeBuffer);
        // SAFETY: NULL out pointers are allowed; `free_out` is a valid local.
        let code = unsafe {
            mapialloc_mem_alloc_routines(ptr::null_mut(), ptr::null_mut(), &mut free_out)
        };
        assert_eq!(code, MAPI_E_INVALID_PARAMETER);
        assert!(
            free_out.is_none(),
            "a failure stores NULL through every non-NULL out pointer"
        );
    }

    #[test]
    fn stats_struct_is_nine_u64_counters() {
        assert_eq!(std::mem::size_of::<MapiallocStats>(), 10 * 8);
        assert_eq!(std::mem::align_of::<MapiallocStats>(), 8);
    }
}

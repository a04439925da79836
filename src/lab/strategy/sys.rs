//! The C library's malloc and free, as Wine and Kopano call them, with a per-thread count of
//! live blocks in test builds so that tests can prove a chain frees everything it allocated.

/// `malloc(3)`: at least `size` bytes, 16-aligned on x86-64 glibc, or NULL.
#[inline]
pub(super) fn malloc(size: usize) -> *mut u8 {
    // SAFETY: malloc has no preconditions.
    let p = unsafe { libc::malloc(size) }.cast::<u8>();
    if !p.is_null() {
        live::add(1);
    }
    p
}

/// `free(3)`.
///
/// # Safety
///
/// `p` came from [`malloc`] and is not used again.
#[inline]
pub(super) unsafe fn free(p: *mut u8) {
    live::add(-1);
    // SAFETY: the caller passes a pointer from malloc that it no longer uses.
    unsafe { libc::free(p.cast()) }
}

#[cfg(not(test))]
mod live {
    /// Counting is compiled out of the lab: no cost on the measured paths.
    #[inline(always)]
    pub(super) fn add(_: isize) {}
}

#[cfg(test)]
pub(crate) mod live {
    use std::cell::Cell;

    thread_local! {
        static LIVE: Cell<isize> = const { Cell::new(0) };
    }

    /// Adds `n` to this thread's count of live malloc blocks.
    pub(super) fn add(n: isize) {
        LIVE.with(|live| live.set(live.get() + n));
    }

    /// Blocks this thread allocated through [`super::malloc`] minus those it freed.
    pub(crate) fn count() -> isize {
        LIVE.with(Cell::get)
    }
}

//! PLACEHOLDER so that parallel work compiles: the real engine replaces this file.
//! System allocator, a 16-byte header, a CAS-linked chain, minimal validation.
#![allow(clippy::undocumented_unsafe_blocks, missing_docs)]

use crate::{Scode, Stats};
use std::alloc::{alloc, dealloc, Layout};
use std::marker::PhantomData;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::*};
use std::sync::OnceLock;

/// What `free_buffer` did with a pointer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FreeOutcome {
    /// NULL: nothing touched.
    Null,
    /// The root and its chain were freed.
    Freed,
    /// The root was already freed (or another thread won the race to free it).
    DoubleFree,
    /// A linked block: nothing freed.
    LinkedBlock,
    /// Not a block start of this heap: nothing touched.
    Foreign,
}

const ROOT: usize = 1;
const LINKED: usize = 2;
const FREED: usize = 3;
const CLOSED: usize = 1;

#[repr(C)]
struct Header {
    link: AtomicUsize,
    kind: AtomicUsize,
}

/// An isolated allocator (placeholder).
pub struct Heap {
    live_roots: AtomicU64,
    live_blocks: AtomicU64,
    double_frees: AtomicU64,
    linked_frees: AtomicU64,
    bad_parents: AtomicU64,
}

fn raw_alloc(size: usize, kind: usize) -> Result<NonNull<u8>, Scode> {
    let total = size.checked_add(16).ok_or(Scode::MAPI_E_NOT_ENOUGH_MEMORY)?;
    if total > u32::MAX as usize {
        return Err(Scode::MAPI_E_NOT_ENOUGH_MEMORY);
    }
    let layout = Layout::from_size_align(total + 16, 16).unwrap();
    let p = unsafe { alloc(layout) };
    if p.is_null() {
        return Err(Scode::MAPI_E_NOT_ENOUGH_MEMORY);
    }
    unsafe {
        (p as *mut usize).write(total + 16);
        let h = p.add(16) as *mut Header;
        h.write(Header { link: AtomicUsize::new(0), kind: AtomicUsize::new(kind) });
        Ok(NonNull::new_unchecked(p.add(32)))
    }
}

unsafe fn raw_free(user: *mut u8) {
    unsafe {
        let base = user.sub(32);
        let total = (base as *mut usize).read();
        dealloc(base, Layout::from_size_align(total, 16).unwrap());
    }
}

fn header(p: *mut u8) -> &'static Header {
    unsafe { &*(p.sub(16) as *const Header) }
}

impl Default for Heap {
    fn default() -> Self {
        Self::new()
    }
}

impl Heap {
    pub fn new() -> Heap {
        Heap {
            live_roots: AtomicU64::new(0),
            live_blocks: AtomicU64::new(0),
            double_frees: AtomicU64::new(0),
            linked_frees: AtomicU64::new(0),
            bad_parents: AtomicU64::new(0),
        }
    }
    pub fn allocate_buffer(&self, size: usize) -> Result<NonNull<u8>, Scode> {
        let p = raw_alloc(size, ROOT)?;
        self.live_roots.fetch_add(1, Relaxed);
        self.live_blocks.fetch_add(1, Relaxed);
        Ok(p)
    }
    pub fn allocate_more(&self, size: usize, parent: *mut u8) -> Result<NonNull<u8>, Scode> {
        if parent.is_null() || header(parent).kind.load(Acquire) != ROOT {
            self.bad_parents.fetch_add(1, Relaxed);
            return Err(Scode::MAPI_E_INVALID_PARAMETER);
        }
        let b = raw_alloc(size, LINKED)?;
        let root = header(parent);
        let mut h = root.link.load(Acquire);
        loop {
            if h & CLOSED != 0 {
                unsafe { raw_free(b.as_ptr()) };
                self.bad_parents.fetch_add(1, Relaxed);
                return Err(Scode::MAPI_E_INVALID_PARAMETER);
            }
            header(b.as_ptr()).link.store(h, Relaxed);
            match root.link.compare_exchange(h, b.as_ptr() as usize, AcqRel, Acquire) {
                Ok(_) => break,
                Err(x) => h = x,
            }
        }
        self.live_blocks.fetch_add(1, Relaxed);
        Ok(b)
    }
    /// # Safety
    /// `ptr` is NULL or came from this heap; memory of freed blocks is not used afterwards.
    pub unsafe fn free_buffer(&self, ptr: *mut u8) -> FreeOutcome {
        if ptr.is_null() {
            return FreeOutcome::Null;
        }
        let h = header(ptr);
        match h.kind.compare_exchange(ROOT, FREED, AcqRel, Acquire) {
            Ok(_) => {}
            Err(LINKED) => {
                self.linked_frees.fetch_add(1, Relaxed);
                return FreeOutcome::LinkedBlock;
            }
            Err(_) => {
                self.double_frees.fetch_add(1, Relaxed);
                return FreeOutcome::DoubleFree;
            }
        }
        let mut cur = h.link.swap(CLOSED, AcqRel);
        let mut n = 1;
        while cur != 0 {
            let next = header(cur as *mut u8).link.load(Relaxed);
            unsafe { raw_free(cur as *mut u8) };
            n += 1;
            cur = next;
        }
        // Placeholder leaks the root header so double frees stay detectable.
        self.live_roots.fetch_sub(1, Relaxed);
        self.live_blocks.fetch_sub(n, Relaxed);
        FreeOutcome::Freed
    }
    pub fn stats(&self) -> Stats {
        Stats {
            live_roots: self.live_roots.load(Relaxed),
            live_blocks: self.live_blocks.load(Relaxed),
            double_frees: self.double_frees.load(Relaxed),
            linked_frees: self.linked_frees.load(Relaxed),
            bad_parents: self.bad_parents.load(Relaxed),
            ..Stats::default()
        }
    }
    pub fn collect(&self) {}
    pub fn release_thread_cache(&self) {}
}

pub fn default_heap() -> &'static Heap {
    static H: OnceLock<Heap> = OnceLock::new();
    H.get_or_init(Heap::new)
}

/// RAII root (placeholder).
pub struct Root<'h> {
    heap: &'h Heap,
    ptr: NonNull<u8>,
    len: usize,
    _p: PhantomData<&'h mut [u8]>,
}
impl<'h> Root<'h> {
    pub fn new(heap: &'h Heap, len: usize) -> Result<Root<'h>, Scode> {
        let ptr = heap.allocate_buffer(len)?;
        unsafe { ptr.as_ptr().write_bytes(0, len) };
        Ok(Root { heap, ptr, len, _p: PhantomData })
    }
    #[allow(clippy::mut_from_ref)]
    pub fn alloc_more(&self, len: usize) -> Result<&mut [u8], Scode> {
        let p = self.heap.allocate_more(len, self.ptr.as_ptr())?;
        unsafe {
            p.as_ptr().write_bytes(0, len);
            Ok(std::slice::from_raw_parts_mut(p.as_ptr(), len))
        }
    }
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}
impl Drop for Root<'_> {
    fn drop(&mut self) {
        unsafe { self.heap.free_buffer(self.ptr.as_ptr()) };
    }
}

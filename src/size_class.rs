//! Size classes: block sizes (header included) and the index function from a request size.
//!
//! Blocks are 16-byte granular up to 512 bytes, then four classes per doubling up to
//! [`MAX_BLOCK_SIZE`]. Every block starts with a [`HEADER_SIZE`]-byte header, so the user
//! pointer of every block is 16-aligned. Requests past the largest class are "large": they get
//! a span of their own (see `segment`). No unsafe code lives here.

use crate::chain::HEADER_SIZE;

/// Granularity of the small classes and the alignment of every user pointer.
pub(crate) const ALIGN: usize = 16;

#[cfg(not(loom))]
mod table {
    /// Number of small classes: 31 steps of 16 bytes (32..=512), then 4 per doubling to 16 KiB.
    pub(crate) const NUM_CLASSES: usize = 31 + 5 * 4;

    /// Block size (header included) of class `class`.
    pub(crate) const fn block_size(class: usize) -> usize {
        if class < 31 {
            32 + class * 16
        } else {
            let doubling = (class - 31) / 4;
            let step = (class - 31) % 4;
            (512 << doubling) + (step + 1) * (128 << doubling)
        }
    }

    /// The class of a block of `block` bytes (header included; `block <= MAX_BLOCK_SIZE`).
    pub(crate) const fn class_of_block(block: usize) -> usize {
        if block <= 512 {
            let b = if block < 32 { 32 } else { block };
            b.div_ceil(16) - 2
        } else {
            let b = block - 1;
            let msb = usize::BITS as usize - 1 - b.leading_zeros() as usize;
            let step = (b >> (msb - 2)) & 3;
            31 + (msb - 9) * 4 + step
        }
    }
}

#[cfg(loom)]
mod table {
    //! Loom's tiny configuration: two classes, so models stay small.
    use super::ALIGN;
    use crate::chain::HEADER_SIZE;

    pub(crate) const NUM_CLASSES: usize = 2;

    /// 16 and 80 user bytes: the second class is a chunk with room for three carved blocks.
    pub(crate) const fn block_size(class: usize) -> usize {
        HEADER_SIZE + ALIGN * (1 + 4 * class)
    }

    pub(crate) const fn class_of_block(block: usize) -> usize {
        if block <= block_size(0) {
            0
        } else {
            1
        }
    }
}

pub(crate) use table::NUM_CLASSES;

/// Block sizes by class, computed at compile time so the fast paths index instead of branch.
const BLOCK_SIZES: [usize; NUM_CLASSES] = {
    let mut sizes = [0; NUM_CLASSES];
    let mut class = 0;
    while class < NUM_CLASSES {
        sizes[class] = table::block_size(class);
        class += 1;
    }
    sizes
};

/// Classes of the blocks up to 512 bytes, indexed by block size / 16.
const SMALL_CLASSES: [u8; 33] = {
    let mut classes = [0; 33];
    let mut i = 0;
    while i < 33 {
        classes[i] = table::class_of_block(i * ALIGN) as u8;
        i += 1;
    }
    classes
};

/// Block size (header included) of class `class`.
#[inline]
pub(crate) const fn block_size(class: usize) -> usize {
    BLOCK_SIZES[class]
}

/// The largest block a small class serves (header included).
pub(crate) const MAX_BLOCK_SIZE: usize = block_size(NUM_CLASSES - 1);

/// The largest request a small class serves.
pub(crate) const MAX_SMALL_REQUEST: usize = MAX_BLOCK_SIZE - HEADER_SIZE;

/// The class serving a request of `size` user bytes, or `None` when it needs a large span.
#[inline]
pub(crate) fn class_of(size: usize) -> Option<usize> {
    if size > MAX_SMALL_REQUEST {
        return None;
    }
    let block = (size + HEADER_SIZE + ALIGN - 1) & !(ALIGN - 1);
    if block <= 512 {
        return Some(SMALL_CLASSES[block / ALIGN] as usize);
    }
    Some(table::class_of_block(block))
}

/// The class of a block of `block` bytes (header included; `block <= MAX_BLOCK_SIZE`).
pub(crate) const fn class_of_block(block: usize) -> usize {
    table::class_of_block(block)
}

/// Usable bytes of a block of class `class`.
#[inline]
pub(crate) const fn usable_size(class: usize) -> usize {
    block_size(class) - HEADER_SIZE
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn classes_are_increasing_and_aligned() {
        for c in 0..NUM_CLASSES {
            assert_eq!(block_size(c) % ALIGN, 0, "class {c}");
            if c > 0 {
                assert!(block_size(c) > block_size(c - 1), "class {c}");
            }
        }
        assert_eq!(MAX_BLOCK_SIZE, 16 * 1024);
    }

    #[test]
    fn class_of_is_the_smallest_class_that_fits() {
        for size in 0..=MAX_SMALL_REQUEST {
            let c = class_of(size).unwrap();
            assert!(usable_size(c) >= size, "size {size} class {c}");
            assert!(
                c == 0 || usable_size(c - 1) < size,
                "size {size} class {c} not tight"
            );
        }
        assert_eq!(class_of(MAX_SMALL_REQUEST + 1), None);
        assert_eq!(class_of(0), Some(0));
    }

    #[test]
    fn waste_is_bounded() {
        // Geometric classes past 512 bytes keep internal waste under 25%.
        for size in 1..=MAX_SMALL_REQUEST {
            let b = block_size(class_of(size).unwrap());
            assert!(
                b - HEADER_SIZE - size < 16.max(b / 4),
                "size {size} block {b}"
            );
        }
    }
}

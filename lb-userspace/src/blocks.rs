//! Space for Maglev tables in the flat LB_MAGLEV array: a buddy allocator over power-of-two
//! blocks (256 slots up to the largest table), so services with tables of different sizes share
//! one array without fragmenting it. A table of M slots lives in the smallest block ≥ M (with
//! automatic sizing every M is a power of two, so nothing is wasted; a fixed prime such as 16381
//! wastes 3 slots of 16384).
//!
//! Deterministic: the lowest free block of the smallest fitting order is taken, and a freed block
//! merges with its free buddy at once.

use std::collections::BTreeSet;

/// Smallest block: 256 slots.
pub const MIN_ORDER: u32 = 8;

#[derive(Debug, Clone)]
pub struct Blocks {
    max_order: u32,
    /// Free block offsets by order (index order - MIN_ORDER).
    free: Vec<BTreeSet<u32>>,
    free_slots: u64,
}

/// The order of the block that holds a table of `size` slots.
pub fn order_of(size: u32) -> u32 {
    size.max(1)
        .next_power_of_two()
        .trailing_zeros()
        .max(MIN_ORDER)
}

impl Blocks {
    /// `capacity` slots (a multiple of `2^max_order`), all free.
    pub fn new(capacity: u32, max_order: u32) -> Self {
        assert!(max_order >= MIN_ORDER && max_order < 32);
        assert!(
            capacity % (1 << max_order) == 0,
            "capacity {capacity} not whole blocks"
        );
        let mut free = vec![BTreeSet::new(); (max_order - MIN_ORDER + 1) as usize];
        free[(max_order - MIN_ORDER) as usize] =
            (0..capacity >> max_order).map(|i| i << max_order).collect();
        Self {
            max_order,
            free,
            free_slots: capacity as u64,
        }
    }

    pub fn free_slots(&self) -> u64 {
        self.free_slots
    }

    /// The largest table size a block can hold.
    pub fn max_size(&self) -> u32 {
        1 << self.max_order
    }

    /// Offset of a free block for a table of `size` slots, or None when no block is left.
    pub fn alloc(&mut self, size: u32) -> Option<u32> {
        let order = order_of(size);
        if order > self.max_order {
            return None;
        }
        let from = (order..=self.max_order).find(|&o| !self.list(o).is_empty())?;
        let offset = self.list_mut(from).pop_first().expect("non-empty");
        // Split down: the upper half of each split stays free.
        for o in (order..from).rev() {
            self.list_mut(o).insert(offset + (1 << o));
        }
        self.free_slots -= 1 << order;
        Some(offset)
    }

    /// Returns the block of a table of `size` slots at `offset`, merging free buddies.
    pub fn free(&mut self, mut offset: u32, size: u32) {
        let mut order = order_of(size);
        self.free_slots += 1 << order;
        while order < self.max_order {
            let buddy = offset ^ (1 << order);
            if !self.list_mut(order).remove(&buddy) {
                break;
            }
            offset = offset.min(buddy);
            order += 1;
        }
        self.list_mut(order).insert(offset);
    }

    /// Marks the block of a table of `size` slots at `offset` as used (adopting pinned state).
    /// False if that block is not free (overlap, or not aligned to its size).
    pub fn reserve(&mut self, offset: u32, size: u32) -> bool {
        let order = order_of(size);
        if order > self.max_order || offset % (1 << order) != 0 {
            return false;
        }
        let Some(from) = (order..=self.max_order)
            .find(|&o| self.list(o).contains(&(offset & !((1u32 << o) - 1))))
        else {
            return false;
        };
        let mut base = offset & !((1u32 << from) - 1);
        self.list_mut(from).remove(&base);
        for o in (order..from).rev() {
            // Keep the half that holds `offset` split, free the other.
            let upper = base + (1 << o);
            if offset >= upper {
                self.list_mut(o).insert(base);
                base = upper;
            } else {
                self.list_mut(o).insert(upper);
            }
        }
        self.free_slots -= 1 << order;
        true
    }

    /// Whether tables of all these sizes would fit (tried on a copy, largest first).
    pub fn fits(&self, sizes: &[u32]) -> bool {
        let mut sizes = sizes.to_vec();
        sizes.sort_unstable_by(|a, b| b.cmp(a));
        let mut copy = self.clone();
        sizes.iter().all(|&s| copy.alloc(s).is_some())
    }

    fn list(&self, order: u32) -> &BTreeSet<u32> {
        &self.free[(order - MIN_ORDER) as usize]
    }

    fn list_mut(&mut self, order: u32) -> &mut BTreeSet<u32> {
        &mut self.free[(order - MIN_ORDER) as usize]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alloc_splits_and_free_merges_back() {
        let mut b = Blocks::new(1 << 12, 12);
        let a = b.alloc(256).unwrap();
        let c = b.alloc(1000).unwrap();
        let d = b.alloc(256).unwrap();
        assert_eq!((a, c, d), (0, 1024, 256));
        assert_eq!(b.free_slots(), 4096 - 256 - 1024 - 256);
        assert_eq!(b.alloc(4096), None, "no whole 4096 block left");
        b.free(a, 256);
        b.free(d, 256);
        b.free(c, 1000);
        assert_eq!(b.free_slots(), 4096);
        assert_eq!(b.alloc(4096), Some(0), "everything merged back");
    }

    #[test]
    fn prime_sizes_take_the_next_power_of_two() {
        let mut b = Blocks::new(1 << 16, 14);
        assert_eq!(b.alloc(16381), Some(0));
        assert_eq!(b.alloc(16381), Some(16384));
        assert_eq!(b.alloc(16385), None, "larger than the largest block");
        assert!(b.fits(&[16381, 16381]));
        assert!(!b.fits(&[16381, 16381, 256]));
    }

    #[test]
    fn reserve_takes_exactly_the_adopted_blocks() {
        let mut fresh = Blocks::new(1 << 14, 14);
        let offsets: Vec<u32> = [1024, 256, 4096, 256]
            .iter()
            .map(|&s| fresh.alloc(s).unwrap())
            .collect();
        let mut adopted = Blocks::new(1 << 14, 14);
        for (&o, s) in offsets.iter().zip([1024, 256, 4096, 256]) {
            assert!(adopted.reserve(o, s), "{o}/{s}");
        }
        assert_eq!(adopted.free_slots(), fresh.free_slots());
        assert!(!adopted.reserve(offsets[0], 1024), "already used");
        assert!(!adopted.reserve(300, 256), "not aligned");
        // Both allocators hand out the same blocks from here on.
        for s in [256, 2048, 512] {
            assert_eq!(adopted.alloc(s), fresh.alloc(s));
        }
    }
}

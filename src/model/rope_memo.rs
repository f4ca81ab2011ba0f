//! RoPE tables kept for the positions they were made for. A denoising loop runs its DiT on
//! the same positions at every step, and a 4096-token table (the cosine and sine of 260k
//! angles) takes the host 3–5 ms to make: time in which the GPU has nothing queued at the
//! start of a step, and in which a streamed pass cannot queue the decoding of its first
//! pieces. Made once, a table is handed out again while its positions are among the last
//! [`KEPT`] asked for.

use std::sync::{Arc, Mutex, PoisonError};

/// Position sets whose tables are kept: a step asks for up to three (Z-Image's image,
/// caption and joint sequences), a batch of images of one size shares them.
pub const KEPT: usize = 4;

/// A position set and its table.
type Entry<P> = (Vec<P>, Arc<Vec<f32>>);

/// The tables of the last [`KEPT`] position sets asked for, most recent first.
pub struct TableMemo<P> {
    recent: Mutex<Vec<Entry<P>>>,
}

impl<P: PartialEq + Clone> Default for TableMemo<P> {
    fn default() -> Self {
        TableMemo {
            recent: Mutex::new(Vec::new()),
        }
    }
}

impl<P: PartialEq + Clone> TableMemo<P> {
    /// The table for `positions`: the one kept for equal positions, or `make()`'s, kept.
    pub fn get(&self, positions: &[P], make: impl FnOnce() -> Vec<f32>) -> Arc<Vec<f32>> {
        // A poisoned lock holds whole entries only (each is pushed complete), so it is sound.
        let mut recent = self.recent.lock().unwrap_or_else(PoisonError::into_inner);
        let entry = match recent.iter().position(|(p, _)| p.as_slice() == positions) {
            Some(i) => recent.remove(i),
            None => (positions.to_vec(), Arc::new(make())),
        };
        let table = entry.1.clone();
        recent.insert(0, entry);
        recent.truncate(KEPT);
        table
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_positions_get_the_kept_table_and_old_ones_are_dropped() {
        let memo = TableMemo::<[u32; 3]>::default();
        let made = std::cell::Cell::new(0);
        let table = |n: u32| {
            let positions: Vec<[u32; 3]> = (0..n).map(|i| [i, 0, 0]).collect();
            memo.get(&positions, || {
                made.set(made.get() + 1);
                positions.iter().map(|p| p[0] as f32).collect()
            })
        };
        let a = table(3);
        assert_eq!(*a, vec![0.0, 1.0, 2.0]);
        assert!(
            Arc::ptr_eq(&a, &table(3)),
            "equal positions: the same table"
        );
        assert_eq!(made.get(), 1);
        let b = table(2);
        assert_eq!(*b, vec![0.0, 1.0]);
        assert_eq!(made.get(), 2);
        // KEPT more position sets push the first out: it is made again.
        for n in 10..10 + KEPT as u32 {
            table(n);
        }
        assert_eq!(made.get(), 2 + KEPT);
        let again = table(3);
        assert!(!Arc::ptr_eq(&a, &again));
        assert_eq!(*again, *a);
        assert_eq!(made.get(), 3 + KEPT);
    }
}

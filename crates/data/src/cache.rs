//! A byte-budgeted LRU cache of decompressed HDF5 chunks.
//!
//! Small datasets (Fashion-MNIST is 47 MB) end up entirely in memory after the first epoch, so later
//! epochs never touch the disk or the decompressor; large ones keep the most recently used chunks, which
//! the batch being assembled always holds on to via its own `Arc`s.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

pub struct ChunkCache {
    budget: usize,
    used: usize,
    tick: u64,
    map: HashMap<usize, (Arc<Vec<u8>>, u64)>,
    lru: BTreeMap<u64, usize>,
}

impl ChunkCache {
    pub fn new(budget_bytes: usize) -> Self {
        Self {
            budget: budget_bytes,
            used: 0,
            tick: 0,
            map: HashMap::new(),
            lru: BTreeMap::new(),
        }
    }

    pub fn get(&mut self, k: usize) -> Option<Arc<Vec<u8>>> {
        let (data, stamp) = self.map.get_mut(&k)?;
        self.lru.remove(stamp);
        self.tick += 1;
        *stamp = self.tick;
        self.lru.insert(self.tick, k);
        Some(data.clone())
    }

    pub fn insert(&mut self, k: usize, data: Arc<Vec<u8>>) {
        let len = data.len();
        if len > self.budget || self.map.contains_key(&k) {
            return;
        }
        while self.used + len > self.budget {
            let Some((_, victim)) = self.lru.pop_first() else {
                break;
            };
            if let Some((d, _)) = self.map.remove(&victim) {
                self.used -= d.len();
            }
        }
        self.tick += 1;
        self.lru.insert(self.tick, k);
        self.map.insert(k, (data, self.tick));
        self.used += len;
    }

    pub fn used_bytes(&self) -> usize {
        self.used
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_least_recently_used() {
        let mut c = ChunkCache::new(30);
        c.insert(1, Arc::new(vec![0; 10]));
        c.insert(2, Arc::new(vec![0; 10]));
        c.insert(3, Arc::new(vec![0; 10]));
        assert!(c.get(1).is_some()); // 2 is now the oldest
        c.insert(4, Arc::new(vec![0; 10]));
        assert!(c.get(2).is_none());
        assert!(c.get(1).is_some() && c.get(3).is_some() && c.get(4).is_some());
        assert_eq!(c.used_bytes(), 30);
        c.insert(5, Arc::new(vec![0; 31])); // larger than the budget: not cached
        assert!(c.get(5).is_none());
    }
}

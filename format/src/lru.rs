//! A least-recently-used map bounded by a cost budget.
//!
//! Two memories of Thinline keep what was read most recently within a budget: the
//! [`MetadataCache`](crate::MetadataCache) of format tables (cost: bytes) and the
//! remote fetch engine's memory of fetched blocks in `thinline-nbd` (cost: one per
//! block). Both use this map so eviction works the same way in both. It does no
//! locking and no I/O; its owner wraps it in whatever lock it needs.

use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;

/// A map from keys to values that each have a cost; once the total cost exceeds the
/// budget, the least recently used entries are dropped (but at least one entry is
/// always kept, whatever its cost, so progress is possible).
///
/// Inserting or reading an entry with [`get`](Self::get) makes it the most recently
/// used; [`contains_key`](Self::contains_key) does not.
#[derive(Debug, Clone)]
pub struct Lru<K, V> {
    /// Key → (value, cost, last use stamp).
    entries: HashMap<K, (V, usize, u64)>,
    /// Last use stamp → key, oldest first.
    by_age: BTreeMap<u64, K>,
    cost: usize,
    budget: usize,
    clock: u64,
}

impl<K: Eq + Hash + Clone, V> Default for Lru<K, V> {
    /// An empty map with an unlimited budget.
    fn default() -> Self {
        Lru::new(usize::MAX)
    }
}

impl<K: Eq + Hash + Clone, V> Lru<K, V> {
    /// An empty map that keeps at most `budget` of cost (and always at least one entry).
    pub fn new(budget: usize) -> Self {
        Lru {
            entries: HashMap::new(),
            by_age: BTreeMap::new(),
            cost: 0,
            budget,
            clock: 0,
        }
    }

    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    /// The value at `key`, if present; it becomes the most recently used.
    pub fn get(&mut self, key: &K) -> Option<&V> {
        let now = self.tick();
        let (value, _, stamp) = self.entries.get_mut(key)?;
        self.by_age.remove(stamp);
        *stamp = now;
        self.by_age.insert(now, key.clone());
        Some(value)
    }

    /// Whether `key` is present (without making it the most recently used).
    pub fn contains_key(&self, key: &K) -> bool {
        self.entries.contains_key(key)
    }

    /// Inserts (or replaces) the value at `key` as the most recently used, then drops
    /// the least recently used entries while the total cost exceeds the budget and
    /// more than one entry is left. Returns how many entries were dropped (a replaced
    /// value is not counted).
    pub fn insert(&mut self, key: K, value: V, cost: usize) -> usize {
        self.insert_with(key, value, cost, drop)
    }

    /// [`insert`](Self::insert), handing each dropped value to `evicted` (in the order
    /// they are dropped, oldest first) instead of dropping it; a replaced value is
    /// dropped.
    pub fn insert_with(
        &mut self,
        key: K,
        value: V,
        cost: usize,
        mut evicted: impl FnMut(V),
    ) -> usize {
        let now = self.tick();
        if let Some((_, old_cost, stamp)) = self.entries.insert(key.clone(), (value, cost, now)) {
            self.cost -= old_cost;
            self.by_age.remove(&stamp);
        }
        self.by_age.insert(now, key);
        self.cost += cost;
        let mut count = 0;
        while self.cost > self.budget && self.entries.len() > 1 {
            let Some((_, oldest)) = self.by_age.pop_first() else {
                break;
            };
            if let Some((value, old_cost, _)) = self.entries.remove(&oldest) {
                self.cost -= old_cost;
                count += 1;
                evicted(value);
            }
        }
        count
    }

    /// Removes the value at `key` and returns it.
    pub fn remove(&mut self, key: &K) -> Option<V> {
        let (value, cost, stamp) = self.entries.remove(key)?;
        self.by_age.remove(&stamp);
        self.cost -= cost;
        Some(value)
    }

    /// The total cost of the entries held.
    pub fn cost(&self) -> usize {
        self.cost
    }

    /// The budget given to [`new`](Self::new).
    pub fn budget(&self) -> usize {
        self.budget
    }

    /// The number of entries held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the map holds nothing.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_least_recently_used_entry_is_dropped_first() {
        let mut lru = Lru::new(3);
        for i in 0..3 {
            assert_eq!(lru.insert(i, i * 10, 1), 0);
        }
        assert_eq!(lru.get(&0), Some(&0)); // 1 is now the oldest
        assert_eq!(lru.insert(3, 30, 1), 1);
        assert!(!lru.contains_key(&1));
        assert!(lru.contains_key(&0) && lru.contains_key(&2) && lru.contains_key(&3));
        assert_eq!((lru.len(), lru.cost()), (3, 3));
    }

    #[test]
    fn contains_key_does_not_count_as_a_use() {
        let mut lru = Lru::new(2);
        lru.insert("a", (), 1);
        lru.insert("b", (), 1);
        assert!(lru.contains_key(&"a"));
        lru.insert("c", (), 1);
        assert!(!lru.contains_key(&"a"), "a stayed the oldest");
        assert!(lru.contains_key(&"b"));
    }

    #[test]
    fn costs_are_summed_and_eviction_stops_within_the_budget() {
        let mut lru = Lru::new(100);
        lru.insert(1, (), 40);
        lru.insert(2, (), 40);
        assert_eq!(lru.cost(), 80);
        assert_eq!(lru.insert(3, (), 50), 1, "dropping 1 is enough");
        assert_eq!(lru.cost(), 90);
        assert!(!lru.contains_key(&1) && lru.contains_key(&2));
    }

    #[test]
    fn replacing_a_value_replaces_its_cost_and_is_not_an_eviction() {
        let mut lru = Lru::new(10);
        lru.insert(1, "old", 6);
        assert_eq!(lru.insert(1, "new", 4), 0);
        assert_eq!((lru.len(), lru.cost()), (1, 4));
        assert_eq!(lru.get(&1), Some(&"new"));
    }

    #[test]
    fn an_entry_over_the_budget_is_kept_alone() {
        let mut lru = Lru::new(10);
        assert_eq!(lru.insert(1, (), 100), 0);
        assert!(lru.contains_key(&1));
        assert_eq!(lru.insert(2, (), 100), 1);
        assert!(!lru.contains_key(&1) && lru.contains_key(&2));
        assert_eq!(lru.budget(), 10);
    }

    #[test]
    fn insert_with_hands_over_the_dropped_values_oldest_first() {
        let mut lru = Lru::new(2);
        lru.insert(1, "one", 1);
        lru.insert(2, "two", 1);
        let mut dropped = Vec::new();
        assert_eq!(lru.insert_with(3, "three", 2, |v| dropped.push(v)), 2);
        assert_eq!(dropped, ["one", "two"]);
        assert_eq!((lru.len(), lru.cost()), (1, 2));
    }

    #[test]
    fn a_missing_key_is_absent_and_the_default_map_is_unbounded() {
        let mut lru: Lru<u64, u64> = Lru::default();
        assert!(lru.is_empty());
        assert_eq!(lru.get(&7), None);
        for i in 0..1000 {
            assert_eq!(lru.insert(i, i, 1 << 20), 0);
        }
        assert_eq!(lru.len(), 1000);
    }
}

//! A sorted set of disjoint, inclusive `u64` ranges.
//!
//! The WAL keeps per-sink state as ranges rather than one row or entry per
//! record: a batch of a thousand records in flight is one range, and a sink
//! that acknowledges in order never holds more than one.

/// Disjoint inclusive ranges `(first, last)`, sorted, never adjacent (adjacent
/// ranges are merged on insert).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RangeSet {
    ranges: Vec<(u64, u64)>,
}

impl RangeSet {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// The ranges in ascending order.
    pub fn ranges(&self) -> &[(u64, u64)] {
        &self.ranges
    }

    /// True when no value is in the set.
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// How many values the set holds.
    pub fn len(&self) -> u64 {
        self.ranges.iter().map(|(a, b)| b - a + 1).sum()
    }

    /// True when `v` is in the set (binary search).
    pub fn contains(&self, v: u64) -> bool {
        let i = self.ranges.partition_point(|&(_, b)| b < v);
        self.ranges.get(i).is_some_and(|&(a, _)| a <= v)
    }

    /// The maximal ranges of `(after, upto]` outside the set, in order.
    pub fn gaps(&self, after: u64, upto: u64) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut pos = after; // everything <= pos is handled
        let start = self.ranges.partition_point(|&(_, b)| b <= after);
        for &(a, b) in &self.ranges[start..] {
            if pos >= upto {
                break;
            }
            if a > pos + 1 {
                out.push((pos + 1, (a - 1).min(upto)));
            }
            pos = pos.max(b);
        }
        if pos < upto {
            out.push((pos + 1, upto));
        }
        out
    }

    /// Adds `first..=last`, merging with overlapping or adjacent ranges.
    /// O(log n) to find the place, one splice to put it there.
    pub fn insert(&mut self, first: u64, last: u64) {
        debug_assert!(first <= last);
        // ranges[lo..hi] overlap or touch first..=last.
        let lo = self
            .ranges
            .partition_point(|&(_, b)| b.saturating_add(1) < first);
        let hi = self
            .ranges
            .partition_point(|&(a, _)| a <= last.saturating_add(1));
        let (mut a, mut b) = (first, last);
        if lo < hi {
            a = a.min(self.ranges[lo].0);
            b = b.max(self.ranges[hi - 1].1);
        }
        self.ranges.splice(lo..hi, [(a, b)]);
    }

    /// Removes `first..=last` from the set.
    pub fn remove(&mut self, first: u64, last: u64) {
        // ranges[lo..hi] overlap first..=last.
        let lo = self.ranges.partition_point(|&(_, b)| b < first);
        let hi = self.ranges.partition_point(|&(a, _)| a <= last);
        if lo >= hi {
            return;
        }
        let (a0, b1) = (self.ranges[lo].0, self.ranges[hi - 1].1);
        let mut keep = Vec::with_capacity(2);
        if a0 < first {
            keep.push((a0, first - 1));
        }
        if b1 > last {
            keep.push((last + 1, b1));
        }
        self.ranges.splice(lo..hi, keep);
    }

    /// Removes every value `<= upto`.
    pub fn remove_upto(&mut self, upto: u64) {
        if upto > 0 {
            self.remove(0, upto);
        } else {
            self.remove(0, 0);
        }
    }

    /// If the lowest range starts at `next`, removes it and returns its end:
    /// the new cursor after merging contiguous completions.
    pub fn pop_contiguous(&mut self, next: u64) -> Option<u64> {
        match self.ranges.first() {
            Some(&(a, b)) if a <= next => {
                self.ranges.remove(0);
                Some(b)
            }
            _ => None,
        }
    }

    /// The set of ascending `values` (repeats allowed), built in one pass.
    pub fn from_sorted(values: impl IntoIterator<Item = u64>) -> RangeSet {
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        for v in values {
            match ranges.last_mut() {
                Some((_, b)) if v <= b.saturating_add(1) => *b = (*b).max(v),
                _ => ranges.push((v, v)),
            }
        }
        RangeSet { ranges }
    }

    /// The values of `self` that are not in `other`, in one merge pass.
    pub fn difference(&self, other: &RangeSet) -> RangeSet {
        let mut out = Vec::with_capacity(self.ranges.len());
        let mut j = 0;
        for &(a, b) in &self.ranges {
            let mut start = a;
            while j < other.ranges.len() && other.ranges[j].1 < start {
                j += 1;
            }
            let mut k = j;
            while start <= b {
                match other.ranges.get(k) {
                    Some(&(x, y)) if x <= b => {
                        if x > start {
                            out.push((start, x - 1));
                        }
                        if y >= b {
                            start = b.saturating_add(1);
                            if y == u64::MAX {
                                break;
                            }
                        } else {
                            start = y + 1;
                            k += 1;
                        }
                    }
                    _ => {
                        out.push((start, b));
                        break;
                    }
                }
            }
        }
        RangeSet { ranges: out }
    }

    /// The union of two sets, in one merge pass.
    pub fn union(&self, other: &RangeSet) -> RangeSet {
        let (x, y) = (&self.ranges, &other.ranges);
        let mut out: Vec<(u64, u64)> = Vec::with_capacity(x.len() + y.len());
        let (mut i, mut j) = (0, 0);
        while i < x.len() || j < y.len() {
            let next = match (x.get(i), y.get(j)) {
                (Some(a), Some(b)) if a.0 <= b.0 => {
                    i += 1;
                    *a
                }
                (_, Some(b)) => {
                    j += 1;
                    *b
                }
                (Some(a), None) => {
                    i += 1;
                    *a
                }
                (None, None) => break,
            };
            match out.last_mut() {
                Some(last) if next.0 <= last.1.saturating_add(1) => last.1 = last.1.max(next.1),
                _ => out.push(next),
            }
        }
        RangeSet { ranges: out }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_merges_overlapping_and_adjacent_ranges() {
        let mut s = RangeSet::new();
        s.insert(5, 7);
        s.insert(1, 2);
        s.insert(3, 4);
        assert_eq!(s.ranges(), &[(1, 7)]);
        s.insert(10, 12);
        s.insert(9, 9);
        assert_eq!(s.ranges(), &[(1, 7), (9, 12)]);
        assert_eq!(s.len(), 11);
    }

    #[test]
    fn remove_splits_ranges() {
        let mut s = RangeSet::new();
        s.insert(1, 10);
        s.remove(4, 6);
        assert_eq!(s.ranges(), &[(1, 3), (7, 10)]);
        s.remove_upto(8);
        assert_eq!(s.ranges(), &[(9, 10)]);
        assert!(s.contains(9) && !s.contains(8));
    }

    #[test]
    fn from_sorted_merges_runs_and_difference_cuts_holes() {
        let s = RangeSet::from_sorted([1, 2, 3, 3, 5, 7, 8, 9]);
        assert_eq!(s.ranges(), &[(1, 3), (5, 5), (7, 9)]);
        let mut cut = RangeSet::new();
        cut.insert(2, 2);
        cut.insert(5, 8);
        assert_eq!(s.difference(&cut).ranges(), &[(1, 1), (3, 3), (9, 9)]);
        assert_eq!(s.difference(&RangeSet::new()), s);
        let mut all = RangeSet::new();
        all.insert(0, 100);
        assert!(s.difference(&all).is_empty());
        // Same as removing range by range.
        let mut slow = s.clone();
        for &(a, b) in cut.ranges() {
            slow.remove(a, b);
        }
        assert_eq!(slow, s.difference(&cut));
    }

    #[test]
    fn insert_remove_and_union_agree_with_a_set_of_values() {
        use std::collections::BTreeSet;
        let mut rng = 7u64;
        let mut next = || {
            rng = rng
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            rng >> 33
        };
        let (mut s, mut t) = (RangeSet::new(), RangeSet::new());
        let (mut sv, mut tv) = (BTreeSet::new(), BTreeSet::new());
        for _ in 0..2000 {
            let a = next() % 300;
            let b = a + next() % 8;
            match next() % 4 {
                0 | 1 => {
                    s.insert(a, b);
                    sv.extend(a..=b);
                }
                2 => {
                    s.remove(a, b);
                    (a..=b).for_each(|v| {
                        sv.remove(&v);
                    });
                }
                _ => {
                    t.insert(a, b);
                    tv.extend(a..=b);
                }
            }
            assert_eq!(s, RangeSet::from_sorted(sv.iter().copied()));
            let u = s.union(&t);
            assert_eq!(u, RangeSet::from_sorted(sv.union(&tv).copied()));
            assert_eq!(
                s.difference(&t),
                RangeSet::from_sorted(sv.difference(&tv).copied())
            );
        }
    }

    #[test]
    fn pop_contiguous_only_takes_a_range_touching_the_cursor() {
        let mut s = RangeSet::new();
        s.insert(5, 9);
        assert_eq!(s.pop_contiguous(4), None);
        assert_eq!(s.pop_contiguous(5), Some(9));
        assert!(s.is_empty());
    }

    #[test]
    fn gaps_are_what_the_set_leaves_out() {
        let mut s = RangeSet::new();
        s.insert(3, 4);
        s.insert(8, 9);
        assert_eq!(s.gaps(0, 10), vec![(1, 2), (5, 7), (10, 10)]);
        assert_eq!(s.gaps(3, 9), vec![(5, 7)]);
        assert_eq!(s.gaps(4, 8), vec![(5, 7)]);
        assert_eq!(s.gaps(9, 9), vec![]);
        assert_eq!(RangeSet::new().gaps(5, 7), vec![(6, 7)]);
        assert!(s.contains(3) && s.contains(9) && !s.contains(5) && !s.contains(10));
    }
}

//! Byte-level BPE training: chunk counting and the merge loop. No Python in here.
//!
//! Merges never cross chunk boundaries: the text is first split by the regex pattern, identical
//! chunks are counted once with a multiplicity ("words"), and pairs are counted inside words.
//!
//! Tie-break rule (the Python reference in tests/test_rustbpe.py implements the same): the pair
//! with the highest count is merged; among equal counts, the lexicographically smallest pair of
//! token ids `(left, right)` wins. Within a word, occurrences are merged left to right without
//! overlap, so `a a a` merged on `(a, a)` becomes `aa a`. Merge `k` creates token id `256 + k`.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use ahash::{AHashMap, AHashSet};
use rayon::prelude::*;

use crate::split::Splitter;

pub type Pair = (u32, u32);

/// Counts the regex chunks of `texts` in parallel. Keys borrow from `texts`, so the caller
/// copies only chunks it has not seen before into its own map.
pub fn count_chunks<'t>(
    splitter: &Splitter,
    texts: &'t [String],
) -> Result<AHashMap<&'t str, i64>, fancy_regex::Error> {
    texts
        .par_iter()
        .try_fold(AHashMap::new, |mut counts, text| {
            splitter.for_each_chunk(text, |chunk| *counts.entry(chunk).or_insert(0) += 1)?;
            Ok(counts)
        })
        .try_reduce(AHashMap::new, |a, b| Ok(merge_counts(a, b)))
}

/// Adds the smaller map into the larger one (fewer hash operations than the other way round).
fn merge_counts<K: std::hash::Hash + Eq>(
    a: AHashMap<K, i64>,
    b: AHashMap<K, i64>,
) -> AHashMap<K, i64> {
    let (mut big, small) = if a.len() >= b.len() { (a, b) } else { (b, a) };
    for (key, count) in small {
        *big.entry(key).or_insert(0) += count;
    }
    big
}

/// A merge candidate in the priority queue. Entries may be stale: the queue is fixed up lazily
/// when an entry reaches the top (see `learn_merges`).
#[derive(PartialEq, Eq)]
struct Candidate {
    count: i64,
    pair: Pair,
}

impl Ord for Candidate {
    fn cmp(&self, other: &Self) -> Ordering {
        // Max-heap: higher count first, then the *smaller* pair (hence `other` vs `self`).
        self.count
            .cmp(&other.count)
            .then_with(|| other.pair.cmp(&self.pair))
    }
}

impl PartialOrd for Candidate {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// Learns up to `num_merges` merges from `(chunk, count)` words. Returns fewer when no pair is
/// left (every word is a single token).
pub fn learn_merges(words: Vec<(Vec<u8>, i64)>, num_merges: usize) -> Vec<Pair> {
    let (mut words, counts): (Vec<Vec<u32>>, Vec<i64>) = words
        .into_iter()
        .filter(|(bytes, _)| bytes.len() >= 2)
        .map(|(bytes, count)| (bytes.into_iter().map(u32::from).collect(), count))
        .unzip();

    let (mut pair_counts, mut positions) = initial_pairs(&words, &counts);

    // Invariant: every pair with a positive count has a queue entry whose count is >= its
    // current count (entries are pushed whenever a count rises). So a popped entry that matches
    // the current count is the true maximum, and ties resolve by the `Ord` above.
    let mut queue: BinaryHeap<Candidate> = pair_counts
        .iter()
        .map(|(&pair, &count)| Candidate { count, pair })
        .collect();

    // Bounded: `num_merges` may be huge while the corpus runs out of pairs much earlier.
    let mut merges = Vec::with_capacity(num_merges.min(1 << 16));
    let mut risen: AHashSet<Pair> = AHashSet::new();
    while merges.len() < num_merges {
        let top = match queue.pop() {
            Some(top) => top,
            None => break, // every word is a single token
        };
        let current = pair_counts.get(&top.pair).copied().unwrap_or(0);
        if current <= 0 {
            continue;
        }
        if current != top.count {
            queue.push(Candidate {
                count: current,
                pair: top.pair,
            });
            continue;
        }

        let new_id = 256 + merges.len() as u32;
        merges.push(top.pair);
        pair_counts.remove(&top.pair);

        // Word lists may hold stale entries (the pair was destroyed by an earlier merge);
        // merging such a word is a no-op, so they are harmless.
        let mut where_found = positions.remove(&top.pair).unwrap_or_default();
        where_found.sort_unstable();
        where_found.dedup();

        risen.clear();
        for &word_index in &where_found {
            let count = counts[word_index as usize];
            merge_word(
                &mut words[word_index as usize],
                top.pair,
                new_id,
                |pair, delta| {
                    if pair == top.pair {
                        return; // already removed from pair_counts
                    }
                    *pair_counts.entry(pair).or_insert(0) += delta * count;
                    if delta > 0 {
                        // New pairs always contain `new_id`, so this word list starts empty.
                        let list = positions.entry(pair).or_default();
                        if list.last() != Some(&word_index) {
                            list.push(word_index);
                        }
                        risen.insert(pair);
                    }
                },
            );
        }
        for &pair in &risen {
            let count = pair_counts.get(&pair).copied().unwrap_or(0);
            if count > 0 {
                queue.push(Candidate { count, pair });
            }
        }
    }
    merges
}

type PairCounts = AHashMap<Pair, i64>;
type PairPositions = AHashMap<Pair, Vec<u32>>;

/// Weighted pair counts over all words, and for each pair the words that contain it.
fn initial_pairs(words: &[Vec<u32>], counts: &[i64]) -> (PairCounts, PairPositions) {
    words
        .par_iter()
        .enumerate()
        .fold(
            || (PairCounts::new(), PairPositions::new()),
            |(mut pair_counts, mut positions), (word_index, ids)| {
                let word_index = word_index as u32;
                for window in ids.windows(2) {
                    let pair = (window[0], window[1]);
                    *pair_counts.entry(pair).or_insert(0) += counts[word_index as usize];
                    let list = positions.entry(pair).or_default();
                    if list.last() != Some(&word_index) {
                        list.push(word_index);
                    }
                }
                (pair_counts, positions)
            },
        )
        .reduce(
            || (PairCounts::new(), PairPositions::new()),
            |(counts_a, mut positions_a), (counts_b, positions_b)| {
                for (pair, list) in positions_b {
                    positions_a.entry(pair).or_default().extend(list);
                }
                (merge_counts(counts_a, counts_b), positions_a)
            },
        )
}

/// Replaces each occurrence of `pair` in `ids`, scanning left to right without overlap, by
/// `new_id`, in place. Reports every change of the word's pair multiset as
/// `on_delta(pair, +1 | -1)`.
fn merge_word(ids: &mut Vec<u32>, pair: Pair, new_id: u32, mut on_delta: impl FnMut(Pair, i64)) {
    let (left, right) = pair;
    let mut read = 0;
    let mut write = 0;
    // Writing never overtakes reading (write <= read), so the unread tail stays intact.
    while read < ids.len() {
        if read + 1 < ids.len() && ids[read] == left && ids[read + 1] == right {
            on_delta(pair, -1);
            if write > 0 {
                // The token before may itself be a fresh `new_id`: the deltas still balance.
                let prev = ids[write - 1];
                on_delta((prev, left), -1);
                on_delta((prev, new_id), 1);
            }
            if let Some(&next) = ids.get(read + 2) {
                on_delta((right, next), -1);
                on_delta((new_id, next), 1);
            }
            ids[write] = new_id;
            read += 2;
        } else {
            ids[write] = ids[read];
            read += 1;
        }
        write += 1;
    }
    ids.truncate(write);
}

/// Byte string of every token id: 256 single bytes, then one per merge.
pub fn token_bytes(merges: &[Pair]) -> Vec<Vec<u8>> {
    let mut vocab: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
    for &(left, right) in merges {
        let mut bytes = vocab[left as usize].clone();
        bytes.extend_from_slice(&vocab[right as usize]);
        vocab.push(bytes);
    }
    vocab
}

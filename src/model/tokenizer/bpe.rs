//! Rank-based BPE merging over token ids (GPT-2 style, as llama.cpp's `llm_tokenizer_bpe` and
//! Hugging Face's `BPE` model): repeatedly merge the adjacent pair with the lowest merge rank,
//! the leftmost one on ties, until no adjacent pair has a merge.
//!
//! Pairs are looked up by `(left id, right id)` in one hash map that also gives the merged
//! token, so no string is built while merging. Words are short, but a pathological word (a long
//! run of one symbol) stays O(n log n) through the heap and the linked list of live symbols.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};

/// A merge: its rank (lower merges first) and the token it produces.
#[derive(Debug, Clone, Copy)]
pub struct Merge {
    /// Position in the merges list.
    pub rank: u32,
    /// The token id of the concatenation.
    pub merged: u32,
}

/// The merge table: `(left, right) -> Merge`.
pub type MergeMap = HashMap<(u32, u32), Merge>;

/// One live or merged-away symbol of a word.
#[derive(Clone, Copy)]
struct Sym {
    id: u32,
    prev: usize,
    next: usize,
    alive: bool,
}

/// Marks the absence of a neighbour.
const NONE: usize = usize::MAX;

/// Merges the initial symbols `ids` of one word and appends the resulting ids to `out`.
pub fn merge_word(ids: &[u32], merges: &MergeMap, out: &mut Vec<u32>) {
    if ids.len() < 2 {
        out.extend_from_slice(ids);
        return;
    }
    let mut syms: Vec<Sym> = ids
        .iter()
        .enumerate()
        .map(|(i, &id)| Sym {
            id,
            prev: if i == 0 { NONE } else { i - 1 },
            next: if i + 1 == ids.len() { NONE } else { i + 1 },
            alive: true,
        })
        .collect();
    // Min-heap on (rank, left position); entries go stale when a side merges and are checked
    // against the current symbols when popped.
    let mut heap: BinaryHeap<Reverse<(u32, usize, u32, u32)>> = BinaryHeap::new();
    let push = |heap: &mut BinaryHeap<_>, syms: &[Sym], left: usize| {
        if left == NONE {
            return;
        }
        let right = syms[left].next;
        if right == NONE {
            return;
        }
        let (l, r) = (syms[left].id, syms[right].id);
        if let Some(m) = merges.get(&(l, r)) {
            heap.push(Reverse((m.rank, left, l, r)));
        }
    };
    for i in 0..syms.len() - 1 {
        push(&mut heap, &syms, i);
    }
    while let Some(Reverse((_, left, l, r))) = heap.pop() {
        let right = syms[left].next;
        if !syms[left].alive || right == NONE || syms[left].id != l || syms[right].id != r {
            continue;
        }
        let Some(m) = merges.get(&(l, r)) else {
            continue;
        };
        syms[left].id = m.merged;
        syms[right].alive = false;
        let after = syms[right].next;
        syms[left].next = after;
        if after != NONE {
            syms[after].prev = left;
        }
        push(&mut heap, &syms, syms[left].prev);
        push(&mut heap, &syms, left);
    }
    let mut i = 0;
    while i != NONE {
        out.push(syms[i].id);
        i = syms[i].next;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lowest_rank_first_and_leftmost_on_ties() {
        // Symbols a=0 b=1; merges: (a,a)->2 rank 0, (2,b)->3 rank 1.
        let mut m = MergeMap::new();
        m.insert((0, 0), Merge { rank: 0, merged: 2 });
        m.insert((2, 1), Merge { rank: 1, merged: 3 });
        let mut out = Vec::new();
        // "aaab": the leftmost (a,a) merges first -> [aa, a, b]; (aa,b) is not adjacent.
        merge_word(&[0, 0, 0, 1], &m, &mut out);
        assert_eq!(out, [2, 0, 1]);
        out.clear();
        // "aab" -> [aa, b] -> [aab].
        merge_word(&[0, 0, 1], &m, &mut out);
        assert_eq!(out, [3]);
    }
}

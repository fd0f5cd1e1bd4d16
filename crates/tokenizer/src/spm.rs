//! SentencePiece (`tokenizer.ggml.model = llama`): spaces become `▁`, then the adjacent pair
//! whose concatenation is the highest-scoring token merges first; characters left without a
//! token fall back to `<0xHH>` byte tokens.
//!
//! Follows llama.cpp's `llm_tokenizer_spm_session` (src/llama-vocab.cpp).

use std::collections::BinaryHeap;

use crate::vocab::Vocab;

/// A candidate merge; ordered so the heap pops the highest score, then the leftmost pair.
#[derive(Debug, PartialEq)]
struct Bigram {
    score: f32,
    left: usize,
    right: usize,
    len: usize,
}

impl Eq for Bigram {}

impl Ord for Bigram {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.score
            .total_cmp(&other.score)
            .then_with(|| other.left.cmp(&self.left))
    }
}

impl PartialOrd for Bigram {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

struct Sym {
    start: usize,
    len: usize,
    prev: Option<usize>,
    next: Option<usize>,
}

/// Append the ids of raw (non-special) `text` to `out`; `text` already has `▁` for spaces.
pub fn encode(vocab: &Vocab, text: &str, out: &mut Vec<u32>) {
    let mut syms: Vec<Sym> = Vec::with_capacity(text.len());
    for (i, (start, c)) in text.char_indices().enumerate() {
        syms.push(Sym {
            start,
            len: c.len_utf8(),
            prev: i.checked_sub(1),
            next: None,
        });
    }
    let n = syms.len();
    for (i, s) in syms.iter_mut().enumerate() {
        s.next = (i + 1 < n).then_some(i + 1);
    }

    let mut heap = BinaryHeap::new();
    let try_add = |heap: &mut BinaryHeap<Bigram>, syms: &[Sym], left: usize, right: usize| {
        let (s, len) = (syms[left].start, syms[left].len + syms[right].len);
        if let Some(id) = vocab.id(&text[s..s + len]) {
            heap.push(Bigram {
                score: vocab.score(id),
                left,
                right,
                len,
            });
        }
    };
    for i in 1..n {
        try_add(&mut heap, &syms, i - 1, i);
    }
    while let Some(b) = heap.pop() {
        let (l, r) = (b.left, b.right);
        // Skip pairs made stale by an earlier merge.
        if syms[l].len == 0 || syms[r].len == 0 || syms[l].len + syms[r].len != b.len {
            continue;
        }
        syms[l].len += syms[r].len;
        syms[r].len = 0;
        syms[l].next = syms[r].next;
        if let Some(nx) = syms[r].next {
            syms[nx].prev = Some(l);
        }
        if let Some(p) = syms[l].prev {
            try_add(&mut heap, &syms, p, l);
        }
        if let Some(nx) = syms[l].next {
            try_add(&mut heap, &syms, l, nx);
        }
    }

    let mut i = if n > 0 { Some(0) } else { None };
    while let Some(at) = i {
        let s = &syms[at];
        let piece = &text[s.start..s.start + s.len];
        match vocab.id(piece) {
            Some(id) => out.push(id),
            None => {
                for b in piece.bytes() {
                    if let Some(id) = vocab.byte_tokens[b as usize].or(vocab.unk) {
                        out.push(id);
                    }
                }
            }
        }
        i = s.next;
    }
}

//! A pushdown matcher over a [`Grammar`]: the set of parse stacks after the text so far
//! (as llama.cpp's grammar sampler keeps them), advanced one character at a time, and a
//! vocabulary walk that finds every token the grammar allows next, sharing the work of
//! tokens with a common prefix.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use crate::gbnf::{Elem, Grammar};
use crate::{Error, Result};

/// A position in a sequence: rule, alternative, element index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Pos {
    rule: u32,
    alt: u32,
    at: u32,
}

/// The top is the element to match next; below it, where to continue after each rule.
type Stack = Vec<Pos>;

/// Most parse stacks alive at once: an ambiguous grammar fails clearly instead of growing
/// without bound.
pub const MAX_STACKS: usize = 4096;
/// Deepest chain of rules entered without a character in between.
pub const MAX_DEPTH: usize = 1000;

/// A grammar and the state of matching it against the text generated so far.
#[derive(Debug, Clone)]
pub struct Matcher {
    grammar: Arc<Grammar>,
    stacks: Vec<Stack>,
}

impl Matcher {
    pub fn new(grammar: Arc<Grammar>) -> Result<Self> {
        let root = grammar.root as u32;
        let mut stacks = Vec::new();
        let mut seen = HashSet::new();
        for alt in 0..grammar.rules[grammar.root].len() {
            expand(
                &grammar,
                vec![Pos {
                    rule: root,
                    alt: alt as u32,
                    at: 0,
                }],
                &mut stacks,
                &mut seen,
            )?;
        }
        Ok(Self { grammar, stacks })
    }

    /// Whether the text so far is a complete match (generation may end here).
    pub fn is_accepting(&self) -> bool {
        self.stacks.iter().any(Vec::is_empty)
    }

    /// Whether no more characters can follow (only ending is allowed).
    pub fn is_finished(&self) -> bool {
        self.stacks.iter().all(Vec::is_empty)
    }

    /// Advance by `text`; an error (and no change) if the grammar does not allow it.
    pub fn accept(&mut self, text: &str) -> Result<()> {
        let mut stacks = self.stacks.clone();
        for c in text.chars() {
            stacks = step(&self.grammar, &stacks, c)?;
            if stacks.is_empty() {
                return Err(Error::Rejected(text.to_string()));
            }
        }
        self.stacks = stacks;
        Ok(())
    }

    /// Whether `text` may come next.
    pub fn allows(&self, text: &str) -> bool {
        let mut stacks = self.stacks.clone();
        for c in text.chars() {
            match step(&self.grammar, &stacks, c) {
                Ok(s) if !s.is_empty() => stacks = s,
                _ => return false,
            }
        }
        true
    }

    /// Marks `allowed[id]` for every token of `vocab` that may come next. The sorted
    /// vocabulary is walked as a trie: at each depth only the characters the stacks can
    /// take are looked up (binary searches), each (stack set, character) step is computed
    /// once per walk over interned stack sets, and a refused prefix drops every token that
    /// starts with it at once.
    pub fn allowed(&self, vocab: &Vocabulary, allowed: &mut [bool]) -> Result<()> {
        let mut w = Walk {
            g: &self.grammar,
            vocab,
            sets: vec![self.stacks.clone()],
            ids: HashMap::from([(self.stacks.clone(), 0)]),
            memo: HashMap::new(),
            ranges: HashMap::new(),
            allowed,
        };
        w.walk(0, vocab.order.len(), 0, 0)
    }
}

struct Walk<'a> {
    g: &'a Grammar,
    vocab: &'a Vocabulary,
    sets: Vec<Vec<Stack>>,
    ids: HashMap<Vec<Stack>, u32>,
    memo: HashMap<(u32, char), Option<u32>>,
    ranges: HashMap<u32, Vec<(char, char)>>,
    allowed: &'a mut [bool],
}

impl Walk<'_> {
    fn char_at(&self, k: usize, depth: usize) -> char {
        self.vocab.chars[self.vocab.order[k] as usize][depth]
    }

    /// Tokens `order[lo..hi]` share their first `depth` characters, after which the
    /// stacks are set `set`.
    fn walk(&mut self, lo: usize, hi: usize, depth: usize, set: u32) -> Result<()> {
        let order = &self.vocab.order;
        let mut i = lo;
        // The tokens that end here come first (a prefix sorts before its extensions).
        while i < hi && self.vocab.chars[order[i] as usize].len() == depth {
            if depth > 0
                && let Some(a) = self.allowed.get_mut(order[i] as usize)
            {
                *a = true;
            }
            i += 1;
        }
        if i == hi {
            return Ok(());
        }
        let ranges = self.next_ranges(set);
        for (a, b) in ranges {
            let mut j =
                i + order[i..hi].partition_point(|&t| self.vocab.chars[t as usize][depth] < a);
            while j < hi && self.char_at(j, depth) <= b {
                let c = self.char_at(j, depth);
                let end =
                    j + order[j..hi].partition_point(|&t| self.vocab.chars[t as usize][depth] == c);
                if let Some(next) = self.step(set, c)? {
                    self.walk(j, end, depth + 1, next)?;
                }
                j = end;
            }
        }
        Ok(())
    }

    fn step(&mut self, set: u32, c: char) -> Result<Option<u32>> {
        if let Some(&n) = self.memo.get(&(set, c)) {
            return Ok(n);
        }
        let out = step(self.g, &self.sets[set as usize], c)?;
        let n = if out.is_empty() {
            None
        } else if let Some(&i) = self.ids.get(&out) {
            Some(i)
        } else {
            let i = self.sets.len() as u32;
            self.ids.insert(out.clone(), i);
            self.sets.push(out);
            Some(i)
        };
        self.memo.insert((set, c), n);
        Ok(n)
    }

    /// The characters any stack of `set` can take next, as sorted disjoint ranges.
    fn next_ranges(&mut self, set: u32) -> Vec<(char, char)> {
        if let Some(r) = self.ranges.get(&set) {
            return r.clone();
        }
        let mut all: Vec<(u32, u32)> = Vec::new();
        for s in &self.sets[set as usize] {
            let Some(top) = s.last() else { continue };
            if let Elem::Chars { ranges, negated } =
                &self.g.rules[top.rule as usize][top.alt as usize][top.at as usize]
            {
                let mut rs: Vec<(u32, u32)> =
                    ranges.iter().map(|&(a, b)| (a as u32, b as u32)).collect();
                rs.sort_unstable();
                if *negated {
                    let mut next = 0u32;
                    for (a, b) in rs {
                        if a > next {
                            all.push((next, a - 1));
                        }
                        next = next.max(b + 1);
                    }
                    if next <= char::MAX as u32 {
                        all.push((next, char::MAX as u32));
                    }
                } else {
                    all.extend(rs);
                }
            }
        }
        all.sort_unstable();
        let mut merged: Vec<(char, char)> = Vec::new();
        let mut cur: Option<(u32, u32)> = None;
        for (a, b) in all {
            cur = match cur {
                Some((x, y)) if a <= y.saturating_add(1) => Some((x, y.max(b))),
                Some(r) => {
                    merged.extend(to_chars(r));
                    Some((a, b))
                }
                None => Some((a, b)),
            };
        }
        merged.extend(cur.and_then(to_chars));
        self.ranges.insert(set, merged.clone());
        merged
    }
}

/// A code-point range as chars (surrogates cannot be chars: clipped around them).
fn to_chars((a, b): (u32, u32)) -> Option<(char, char)> {
    let lo = (a..=b).find_map(char::from_u32)?;
    let hi = (a..=b).rev().find_map(char::from_u32)?;
    Some((lo, hi))
}

/// A vocabulary prepared for [`Matcher::allowed`]: each token's characters (tokens that
/// are not whole UTF-8 text are left out: the grammar never allows them), in sorted order.
#[derive(Debug, Default)]
pub struct Vocabulary {
    chars: Vec<Vec<char>>,
    order: Vec<u32>,
}

impl Vocabulary {
    /// From each token's bytes (`None`: a token the grammar must never allow, such as a
    /// control token).
    pub fn new(tokens: impl IntoIterator<Item = Option<Vec<u8>>>) -> Self {
        let chars: Vec<Vec<char>> = tokens
            .into_iter()
            .map(|b| {
                b.and_then(|b| String::from_utf8(b).ok())
                    .map(|s| s.chars().collect())
                    .unwrap_or_default()
            })
            .collect();
        let mut order: Vec<u32> = (0..chars.len() as u32)
            .filter(|&i| !chars[i as usize].is_empty())
            .collect();
        order.sort_by(|&a, &b| chars[a as usize].cmp(&chars[b as usize]));
        Self { chars, order }
    }

    pub fn len(&self) -> usize {
        self.chars.len()
    }

    pub fn is_empty(&self) -> bool {
        self.chars.is_empty()
    }
}

/// The stacks after matching `c` on each of `stacks`.
fn step(g: &Grammar, stacks: &[Stack], c: char) -> Result<Vec<Stack>> {
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    for s in stacks {
        let Some(&top) = s.last() else { continue };
        let elem = &g.rules[top.rule as usize][top.alt as usize][top.at as usize];
        if elem.matches(c) {
            let mut next = s.clone();
            let last = next.len() - 1;
            next[last].at += 1;
            expand(g, next, &mut out, &mut seen)?;
        }
    }
    Ok(out)
}

/// Moves `stack` forward until its top is a character element (or it is empty: the end of
/// the grammar), pushing every way of doing so onto `out`.
fn expand(
    g: &Grammar,
    stack: Stack,
    out: &mut Vec<Stack>,
    seen: &mut HashSet<Stack>,
) -> Result<()> {
    expand_at(g, stack, out, seen, 0)
}

fn expand_at(
    g: &Grammar,
    mut stack: Stack,
    out: &mut Vec<Stack>,
    seen: &mut HashSet<Stack>,
    depth: usize,
) -> Result<()> {
    if depth > MAX_DEPTH || stack.len() > 4 * MAX_DEPTH {
        return Err(Error::Grammar(format!(
            "rules nest more than {MAX_DEPTH} deep before any character"
        )));
    }
    while let Some(&top) = stack.last() {
        let seq = &g.rules[top.rule as usize][top.alt as usize];
        match seq.get(top.at as usize) {
            None => {
                // The end of this alternative: continue in the rule that used it.
                stack.pop();
            }
            Some(Elem::Chars { .. }) => break,
            Some(Elem::Rule(r)) => {
                let r = *r;
                let last = stack.len() - 1;
                stack[last].at += 1;
                // A rule in tail position needs no frame to come back to: popping finished
                // frames keeps repetitions (right recursion) from growing the stack.
                while let Some(&t) = stack.last() {
                    if (t.at as usize) < g.rules[t.rule as usize][t.alt as usize].len() {
                        break;
                    }
                    stack.pop();
                }
                for alt in 0..g.rules[r].len() {
                    let mut s = stack.clone();
                    s.push(Pos {
                        rule: r as u32,
                        alt: alt as u32,
                        at: 0,
                    });
                    expand_at(g, s, out, seen, depth + 1)?;
                }
                return Ok(());
            }
        }
    }
    if seen.insert(stack.clone()) {
        if out.len() >= MAX_STACKS {
            return Err(Error::Grammar(format!(
                "the grammar is too ambiguous: more than {MAX_STACKS} ways to parse the text"
            )));
        }
        out.push(stack);
    }
    Ok(())
}

//! A pushdown matcher over a [`Grammar`]: the set of parse stacks after the text so far
//! (as llama.cpp's grammar sampler keeps them), advanced one character at a time, and a
//! vocabulary walk that finds every token the grammar allows next, sharing the work of
//! tokens with a common prefix.

use std::collections::HashSet;
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

    /// Marks `allowed[id]` for every token of `vocab` that may come next.
    pub fn allowed(&self, vocab: &Vocabulary, allowed: &mut [bool]) -> Result<()> {
        // Per prefix depth, the stacks after that many characters of the current token.
        let mut at_depth: Vec<Vec<Stack>> = vec![self.stacks.clone()];
        // The shallowest depth whose stacks are empty (every longer prefix is dead too).
        let mut dead = usize::MAX;
        for (k, &id) in vocab.order.iter().enumerate() {
            let chars = &vocab.chars[id as usize];
            let lcp = vocab.lcp[k] as usize;
            at_depth.truncate(lcp + 1);
            if dead <= lcp {
                continue;
            }
            dead = usize::MAX;
            let mut ok = true;
            for (d, &c) in chars.iter().enumerate().skip(lcp) {
                let next = step(&self.grammar, &at_depth[d], c)?;
                if next.is_empty() {
                    dead = d + 1;
                    ok = false;
                    break;
                }
                at_depth.push(next);
            }
            if ok && !chars.is_empty() {
                allowed[id as usize] = true;
            }
        }
        Ok(())
    }
}

/// A vocabulary prepared for [`Matcher::allowed`]: each token's characters (tokens that
/// are not whole UTF-8 text are left out: the grammar never allows them), in sorted order
/// with the length each shares with the one before.
#[derive(Debug, Default)]
pub struct Vocabulary {
    chars: Vec<Vec<char>>,
    order: Vec<u32>,
    lcp: Vec<u32>,
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
        let mut lcp = Vec::with_capacity(order.len());
        let mut prev: &[char] = &[];
        for &id in &order {
            let c = &chars[id as usize];
            lcp.push(c.iter().zip(prev).take_while(|(a, b)| a == b).count() as u32);
            prev = c;
        }
        Self { chars, order, lcp }
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
    mut stack: Stack,
    out: &mut Vec<Stack>,
    seen: &mut HashSet<Stack>,
) -> Result<()> {
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
                    expand(g, s, out, seen)?;
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

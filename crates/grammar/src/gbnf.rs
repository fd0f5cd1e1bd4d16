//! GBNF, llama.cpp's grammar format: `name ::= alternatives`, with string literals, character
//! classes (`[a-z]`, `[^"\\]`), `.`, grouping, `|`, `*`, `+`, `?`, `{m}`, `{m,}`, `{m,n}`
//! and `#` comments. Repetitions and groups become rules of their own, so the compiled
//! grammar is plain rules of alternatives of sequences.

use std::collections::HashMap;

use crate::{Error, Result};

/// One element of a sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Elem {
    /// One character in (or, negated, outside) the inclusive ranges.
    Chars {
        ranges: Vec<(char, char)>,
        negated: bool,
    },
    /// Another rule.
    Rule(usize),
}

impl Elem {
    pub fn matches(&self, c: char) -> bool {
        match self {
            Elem::Chars { ranges, negated } => {
                ranges.iter().any(|&(lo, hi)| lo <= c && c <= hi) != *negated
            }
            Elem::Rule(_) => false,
        }
    }
}

/// A compiled grammar: per rule, its alternatives, each a sequence of elements.
#[derive(Debug, Clone)]
pub struct Grammar {
    pub rules: Vec<Vec<Vec<Elem>>>,
    pub names: Vec<String>,
    pub root: usize,
}

/// Most rules a grammar may have (after expanding repetitions): bounds hostile input.
pub const MAX_RULES: usize = 10_000;
/// Longest grammar text accepted.
pub const MAX_GRAMMAR_LEN: usize = 1 << 20;
/// Largest `{m,n}` bound.
pub const MAX_REPEAT: u32 = 1000;
/// Deepest nesting of parentheses.
pub const MAX_NESTING: usize = 64;

struct Parser<'a> {
    src: &'a str,
    at: usize,
    depth: usize,
    names: Vec<String>,
    by_name: HashMap<String, usize>,
    rules: Vec<Option<Vec<Vec<Elem>>>>,
}

impl Grammar {
    /// Parse GBNF text; the start rule is `root`.
    pub fn parse(src: &str) -> Result<Self> {
        if src.len() > MAX_GRAMMAR_LEN {
            return Err(Error::Grammar(format!(
                "the grammar is {} bytes, over the limit of {MAX_GRAMMAR_LEN}",
                src.len()
            )));
        }
        let mut p = Parser {
            src,
            at: 0,
            depth: 0,
            names: Vec::new(),
            by_name: HashMap::new(),
            rules: Vec::new(),
        };
        p.skip_space(true);
        while p.at < src.len() {
            let name = p.name()?;
            p.skip_space(false);
            if !p.eat("::=") {
                return Err(p.error("expected ::= after the rule name"));
            }
            p.skip_space(true);
            let alts = p.alternatives(false)?;
            let id = p.rule_id(&name)?;
            if p.rules[id].is_some() {
                return Err(Error::Grammar(format!(
                    "the rule '{name}' is defined twice"
                )));
            }
            p.rules[id] = Some(alts);
            p.skip_space(true);
        }
        let root = *p
            .by_name
            .get("root")
            .ok_or_else(|| Error::Grammar("the grammar has no 'root' rule".into()))?;
        let mut rules = Vec::with_capacity(p.rules.len());
        for (i, r) in p.rules.into_iter().enumerate() {
            match r {
                Some(r) => rules.push(r),
                None => {
                    return Err(Error::Grammar(format!(
                        "the rule '{}' is used but not defined",
                        p.names[i]
                    )));
                }
            }
        }
        let g = Grammar {
            rules,
            names: p.names,
            root,
        };
        g.check_left_recursion()?;
        Ok(g)
    }

    /// Whether rule `r` can match the empty string (fixed point over all rules).
    fn nullable(&self) -> Vec<bool> {
        let mut null = vec![false; self.rules.len()];
        loop {
            let mut changed = false;
            for (r, alts) in self.rules.iter().enumerate() {
                if null[r] {
                    continue;
                }
                let n = alts.iter().any(|seq| {
                    seq.iter().all(|e| match e {
                        Elem::Rule(x) => null[*x],
                        Elem::Chars { .. } => false,
                    })
                });
                if n {
                    null[r] = true;
                    changed = true;
                }
            }
            if !changed {
                return null;
            }
        }
    }

    /// A rule that can reach itself without consuming a character would make matching
    /// loop forever: refused, naming it.
    fn check_left_recursion(&self) -> Result<()> {
        let null = self.nullable();
        // Edges r → x where x can start r's match (after a nullable prefix).
        let edges: Vec<Vec<usize>> = self
            .rules
            .iter()
            .map(|alts| {
                let mut out = Vec::new();
                for seq in alts {
                    for e in seq {
                        match e {
                            Elem::Rule(x) => {
                                out.push(*x);
                                if !null[*x] {
                                    break;
                                }
                            }
                            Elem::Chars { .. } => break,
                        }
                    }
                }
                out
            })
            .collect();
        // Iterative DFS with colours.
        let mut colour = vec![0u8; self.rules.len()];
        for start in 0..self.rules.len() {
            if colour[start] != 0 {
                continue;
            }
            let mut stack = vec![(start, 0usize)];
            colour[start] = 1;
            while let Some(&mut (r, ref mut i)) = stack.last_mut() {
                if let Some(&x) = edges[r].get(*i) {
                    *i += 1;
                    match colour[x] {
                        0 => {
                            colour[x] = 1;
                            stack.push((x, 0));
                        }
                        1 => {
                            return Err(Error::Grammar(format!(
                                "the rule '{}' is left-recursive",
                                self.names[x]
                            )));
                        }
                        _ => {}
                    }
                } else {
                    colour[r] = 2;
                    stack.pop();
                }
            }
        }
        Ok(())
    }
}

impl Parser<'_> {
    fn error(&self, what: &str) -> Error {
        let line = self.src[..self.at].matches('\n').count() + 1;
        let near: String = self.src[self.at..].chars().take(20).collect();
        Error::Grammar(format!("line {line}: {what} (near {near:?})"))
    }

    fn peek(&self) -> Option<char> {
        self.src[self.at..].chars().next()
    }

    fn bump(&mut self) -> Option<char> {
        let c = self.peek()?;
        self.at += c.len_utf8();
        Some(c)
    }

    fn eat(&mut self, s: &str) -> bool {
        if self.src[self.at..].starts_with(s) {
            self.at += s.len();
            true
        } else {
            false
        }
    }

    /// Spaces and comments; newlines too where `newlines` (between rules, or inside
    /// parentheses).
    fn skip_space(&mut self, newlines: bool) {
        while let Some(c) = self.peek() {
            if c == '#' {
                while let Some(c) = self.peek() {
                    if c == '\n' {
                        break;
                    }
                    self.bump();
                }
            } else if c == ' ' || c == '\t' || (newlines && (c == '\n' || c == '\r')) {
                self.bump();
            } else {
                break;
            }
        }
    }

    fn name(&mut self) -> Result<String> {
        let start = self.at;
        while self
            .peek()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            self.bump();
        }
        if self.at == start {
            return Err(self.error("expected a rule name"));
        }
        Ok(self.src[start..self.at].to_string())
    }

    fn rule_id(&mut self, name: &str) -> Result<usize> {
        if let Some(&id) = self.by_name.get(name) {
            return Ok(id);
        }
        self.new_rule(name.to_string(), None)
    }

    fn new_rule(&mut self, name: String, body: Option<Vec<Vec<Elem>>>) -> Result<usize> {
        if self.rules.len() >= MAX_RULES {
            return Err(Error::Grammar(format!(
                "more than {MAX_RULES} rules (after expanding repetitions)"
            )));
        }
        let id = self.rules.len();
        self.by_name.insert(name.clone(), id);
        self.names.push(name);
        self.rules.push(body);
        Ok(id)
    }

    fn helper(&mut self, body: Vec<Vec<Elem>>) -> Result<usize> {
        let name = format!("_{}", self.rules.len());
        self.new_rule(name, Some(body))
    }

    /// `seq (| seq)*`, up to the end of the line (or `)` when `nested`).
    fn alternatives(&mut self, nested: bool) -> Result<Vec<Vec<Elem>>> {
        let mut alts = vec![self.sequence(nested)?];
        while self.eat("|") {
            self.skip_space(true);
            alts.push(self.sequence(nested)?);
        }
        Ok(alts)
    }

    fn sequence(&mut self, nested: bool) -> Result<Vec<Elem>> {
        let mut seq: Vec<Elem> = Vec::new();
        loop {
            self.skip_space(nested);
            let Some(c) = self.peek() else { break };
            let start = seq.len();
            match c {
                '"' => {
                    self.bump();
                    loop {
                        match self.peek() {
                            None | Some('\n') => return Err(self.error("unterminated string")),
                            Some('"') => {
                                self.bump();
                                break;
                            }
                            _ => {
                                let ch = self.char_in_literal()?;
                                seq.push(Elem::Chars {
                                    ranges: vec![(ch, ch)],
                                    negated: false,
                                });
                            }
                        }
                    }
                    // A repetition after a literal applies to the whole literal.
                    if seq.len() - start > 1 && self.repetition_follows() {
                        let lit: Vec<Elem> = seq.drain(start..).collect();
                        let id = self.helper(vec![lit])?;
                        seq.push(Elem::Rule(id));
                    }
                }
                '[' => {
                    self.bump();
                    let negated = self.eat("^");
                    let mut ranges = Vec::new();
                    loop {
                        match self.peek() {
                            None | Some('\n') => {
                                return Err(self.error("unterminated character class"));
                            }
                            Some(']') => {
                                self.bump();
                                break;
                            }
                            _ => {
                                let lo = self.char_in_literal()?;
                                let hi = if self.peek() == Some('-')
                                    && !self.src[self.at + 1..].starts_with(']')
                                {
                                    self.bump();
                                    self.char_in_literal()?
                                } else {
                                    lo
                                };
                                if hi < lo {
                                    return Err(self.error("a character range runs backwards"));
                                }
                                ranges.push((lo, hi));
                            }
                        }
                    }
                    seq.push(Elem::Chars { ranges, negated });
                }
                '.' => {
                    self.bump();
                    seq.push(Elem::Chars {
                        ranges: vec![('\n', '\n')],
                        negated: true,
                    });
                }
                '(' => {
                    self.bump();
                    self.skip_space(true);
                    self.depth += 1;
                    if self.depth > MAX_NESTING {
                        return Err(self.error("parentheses nested more than 64 deep"));
                    }
                    let alts = self.alternatives(true)?;
                    self.depth -= 1;
                    self.skip_space(true);
                    if !self.eat(")") {
                        return Err(self.error("expected )"));
                    }
                    let id = self.helper(alts)?;
                    seq.push(Elem::Rule(id));
                }
                c if c.is_ascii_alphanumeric() || c == '-' || c == '_' => {
                    // A rule reference, unless it starts the next rule (`name ::=`).
                    let save = self.at;
                    let name = self.name()?;
                    self.skip_space(false);
                    if self.src[self.at..].starts_with("::=") {
                        self.at = save;
                        break;
                    }
                    self.at = save + name.len();
                    let id = self.rule_id(&name)?;
                    seq.push(Elem::Rule(id));
                }
                '|' | ')' => break,
                '\n' | '\r' => break,
                _ => return Err(self.error("unexpected character")),
            }
            if seq.len() > start {
                self.postfix(&mut seq, start)?;
            }
        }
        Ok(seq)
    }

    fn repetition_follows(&self) -> bool {
        matches!(self.peek(), Some('*' | '+' | '?' | '{'))
    }

    /// `*`, `+`, `?`, `{m}`, `{m,}`, `{m,n}` after the element at `seq[start]`.
    fn postfix(&mut self, seq: &mut Vec<Elem>, start: usize) -> Result<()> {
        let (min, max) = match self.peek() {
            Some('*') => (0, None),
            Some('+') => (1, None),
            Some('?') => (0, Some(1)),
            Some('{') => {
                self.bump();
                let m = self.number()?;
                let n = if self.eat(",") {
                    if self.peek() == Some('}') {
                        None
                    } else {
                        Some(self.number()?)
                    }
                } else {
                    Some(m)
                };
                if !self.eat("}") {
                    return Err(self.error("expected } to close a repetition"));
                }
                if n.is_some_and(|n| n < m) {
                    return Err(self.error("a repetition's maximum is below its minimum"));
                }
                self.repeat(seq, start, m, n)?;
                return Ok(());
            }
            _ => return Ok(()),
        };
        self.bump();
        self.repeat(seq, start, min, max)
    }

    fn number(&mut self) -> Result<u32> {
        self.skip_space(false);
        let s = self.at;
        while self.peek().is_some_and(|c| c.is_ascii_digit()) {
            self.bump();
        }
        let n: u32 = self.src[s..self.at]
            .parse()
            .map_err(|_| self.error("expected a number"))?;
        self.skip_space(false);
        if n > MAX_REPEAT {
            return Err(self.error("a repetition bound over 1000"));
        }
        Ok(n)
    }

    /// Replace `seq[start]` by `min` copies of it followed by up to `max - min` optional
    /// ones (or a `*` loop when unbounded), through helper rules.
    fn repeat(
        &mut self,
        seq: &mut Vec<Elem>,
        start: usize,
        min: u32,
        max: Option<u32>,
    ) -> Result<()> {
        let item = seq.drain(start..).collect::<Vec<_>>();
        for _ in 0..min {
            seq.extend(item.iter().cloned());
        }
        match max {
            None => {
                // R ::= item R | ε
                let id = self.helper(Vec::new())?;
                let mut body = item.clone();
                body.push(Elem::Rule(id));
                self.rules[id] = Some(vec![body, Vec::new()]);
                seq.push(Elem::Rule(id));
            }
            Some(max) if max > min => {
                // Nested optionals: R_k ::= item R_{k-1} | ε, so at most `max - min` more.
                let mut next: Option<usize> = None;
                for _ in min..max {
                    let mut body = item.clone();
                    if let Some(n) = next {
                        body.push(Elem::Rule(n));
                    }
                    next = Some(self.helper(vec![body, Vec::new()])?);
                }
                if let Some(n) = next {
                    seq.push(Elem::Rule(n));
                }
            }
            Some(_) => {}
        }
        Ok(())
    }

    /// One character of a literal or class, with `\` escapes (`\n`, `\t`, `\r`, `\\`,
    /// `\"`, `\]`, `\[`, `\-`, `\xHH`, `\uHHHH`, `\UHHHHHHHH`).
    fn char_in_literal(&mut self) -> Result<char> {
        let c = self.bump().ok_or_else(|| self.error("unexpected end"))?;
        if c != '\\' {
            return Ok(c);
        }
        let e = self
            .bump()
            .ok_or_else(|| self.error("unexpected end after \\"))?;
        let hex = |p: &mut Self, n: usize| -> Result<char> {
            let s = p.at;
            for _ in 0..n {
                if !p.peek().is_some_and(|c| c.is_ascii_hexdigit()) {
                    return Err(p.error("bad hex escape"));
                }
                p.bump();
            }
            u32::from_str_radix(&p.src[s..p.at], 16)
                .ok()
                .and_then(char::from_u32)
                .ok_or_else(|| p.error("bad code point"))
        };
        Ok(match e {
            'n' => '\n',
            't' => '\t',
            'r' => '\r',
            'x' => hex(self, 2)?,
            'u' => hex(self, 4)?,
            'U' => hex(self, 8)?,
            '\\' | '"' | '[' | ']' | '-' | '^' | '/' | '.' => e,
            _ => return Err(self.error("unknown escape")),
        })
    }
}

//! Byte-level BPE (`tokenizer.ggml.model = gpt2`): regex pre-tokenization chosen by
//! `tokenizer.ggml.pre`, GPT-2's byte-to-unicode mapping, then merges by rank.
//!
//! Follows llama.cpp's `llm_tokenizer_bpe_session` (src/llama-vocab.cpp) and its
//! `unicode_regex_split`: each regex splits every piece the previous one left, keeping both
//! the matches and the text between them.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};

use fancy_regex::Regex;
use realm_gguf::{Array, Metadata};

use crate::vocab::Vocab;
use crate::{Result, TokenizerError};

const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
const LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
// Qwen 3.5: letters with their combining marks (\p{M}) kept in one word.
const QWEN35: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
// CJK ideographs, Hangul and the blocks between, as one run (DeepSeek's tokenizer.json).
const CJK_RUN: &str = "[\u{4E00}-\u{9FA5}\u{800}-\u{4E00}\u{AC00}-\u{D7FF}]+";
// DeepSeek LLM's letters: the Latin, Greek, Cyrillic, Armenian, Georgian, Cherokee, … letter
// ranges its tokenizer.json lists.
const DEEPSEEK_LETTERS: &str = "\\s?[A-Za-z\u{B5}\u{C0}-\u{D6}\u{D8}-\u{F6}\u{F8}-\u{1BA}\u{1BC}-\u{1BF}\u{1C4}-\u{293}\u{295}-\u{2AF}\u{370}-\u{373}\u{376}\u{377}\u{37B}-\u{37D}\u{37F}\u{386}\u{388}-\u{38A}\u{38C}\u{38E}-\u{3A1}\u{3A3}-\u{3F5}\u{3F7}-\u{481}\u{48A}-\u{52F}\u{531}-\u{556}\u{10A0}-\u{10C5}\u{13A0}-\u{13F5}\u{13F8}-\u{13FD}\u{1C90}-\u{1CBA}\u{1CBD}-\u{1CBF}\u{1D00}-\u{1D2B}\u{1D6B}-\u{1D77}\u{1D79}-\u{1D9A}\u{1E00}-\u{1F15}\u{1F18}-\u{1F1D}\u{1F20}-\u{1F45}\u{1F48}-\u{1F4D}\u{1F50}-\u{1F57}\u{1F59}\u{1F5B}\u{1F5D}\u{1F5F}-\u{1F7D}\u{1F80}-\u{1FB4}\u{1FB6}-\u{1FBC}\u{1FBE}\u{1FC2}-\u{1FC4}\u{1FC6}-\u{1FCC}\u{1FD0}-\u{1FD3}\u{1FD6}-\u{1FDB}\u{1FE0}-\u{1FEC}\u{1FF2}-\u{1FF4}\u{1FF6}-\u{1FFC}\u{2102}\u{2107}\u{210A}-\u{2113}\u{2115}\u{2119}-\u{211D}\u{2124}\u{2126}\u{2128}\u{212A}-\u{212D}\u{212F}-\u{2134}\u{2139}\u{213C}-\u{213F}\u{2145}-\u{2149}\u{214E}\u{2183}\u{2184}\u{2C00}-\u{2C7B}\u{2C7E}-\u{2CE4}\u{2CEB}-\u{2CEE}\u{2CF2}\u{2CF3}\u{A640}-\u{A66D}\u{A680}-\u{A69B}\u{A722}-\u{A76F}\u{A771}-\u{A787}\u{A78B}-\u{A78E}\u{AB70}-\u{ABBF}\u{FB00}-\u{FB06}\u{FB13}-\u{FB17}\u{FF21}-\u{FF3A}\u{FF41}-\u{FF5A}\u{10400}-\u{1044F}\u{104B0}-\u{104D3}\u{104D8}-\u{104FB}\u{10C80}-\u{10CB2}\u{10CC0}-\u{10CF2}\u{118A0}-\u{118DF}\u{1E900}-\u{1E943}]+";

/// Pre-tokenizer regexes by `tokenizer.ggml.pre`, as llama.cpp's `llm_tokenizer_bpe` sets them.
const PRETOKENIZERS: &[(&[&str], &[&str])] = &[
    (
        &[
            "default", "gpt2", "gpt-2", "olmo", "jais", "mpt", "trillion",
        ],
        &[GPT2],
    ),
    (
        &["deepseek-llm"],
        &[
            r"[\r\n]",
            DEEPSEEK_LETTERS,
            "\\s?[!-/:-~\u{FF01}-\u{FF0F}\u{FF1A}-\u{FF5E}\u{2018}-\u{201F}\u{3000}-\u{3002}]+",
            r"\s+$",
            CJK_RUN,
            r"\p{N}+",
        ],
    ),
    (
        &["deepseek-coder"],
        &[r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", CJK_RUN, r"\p{N}"],
    ),
    (
        &["falcon"],
        &[r"[\p{P}\$\+<=>\^~\|`]+", GPT2, r"[0-9][0-9][0-9]"],
    ),
    (&["qwen35"], &[QWEN35]),
    // Gemma 4: SentencePiece-style BPE over the whole text, split only at newlines.
    (&["gemma4"], &[r"[^\n]+|[\n]+"]),
    (
        &[
            "smollm",
            "starcoder",
            "refact",
            "command-r",
            "codeshell",
            "exaone",
            "minerva",
        ],
        &[r"\p{N}", GPT2],
    ),
    (
        &[
            "llama3",
            "llama-bpe",
            "llama-v3",
            "falcon3",
            "pixtral",
            "dbrx",
            "smaug-bpe",
        ],
        &[LLAMA3],
    ),
    (
        &[
            "qwen2",
            "deepseek-r1-qwen",
            "stablelm2",
            "hunyuan",
            "megrez",
        ],
        &[QWEN2],
    ),
];

/// The pre-tokenizers for which llama.cpp takes a word that is a token whole as that token.
const IGNORE_MERGES: &[&str] = &["llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral"];

/// GPT-2's reversible map from bytes to printable characters.
fn byte_to_char_table() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut next = 256u32;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        table[b as usize] = if printable {
            char::from(b)
        } else {
            let c = char::from_u32(next).unwrap_or('\u{FFFD}');
            next += 1;
            c
        };
    }
    table
}

#[derive(Debug)]
pub struct Bpe {
    regexes: Vec<Regex>,
    /// A word that is a token whole is that token, merges or not (llama.cpp's
    /// `ignore_merges`, set for the Llama 3 family of pre-tokenizers).
    ignore_merges: bool,
    /// Gemma 4's BPE: raw UTF-8 symbols (no GPT-2 byte mapping), spaces written as `▁`.
    raw: bool,
    /// (left id, right id) → (rank, merged id); ids past the vocabulary name merge
    /// intermediates that are not tokens themselves.
    merges: HashMap<(u32, u32), (u32, u32)>,
    /// Symbol text → id for vocabulary tokens and merge intermediates.
    symbols: HashMap<String, u32>,
    byte_to_char: [char; 256],
    char_to_byte: HashMap<char, u8>,
}

impl Bpe {
    pub fn new(md: &Metadata, vocab: &Vocab) -> Result<Self> {
        // Gemma 4's model has one pre-tokenizer, whatever the file says (as llama.cpp).
        let raw = md.opt_str("tokenizer.ggml.model")? == Some("gemma4");
        let pre = match raw {
            true => "gemma4",
            false => md.opt_str("tokenizer.ggml.pre")?.unwrap_or("default"),
        };
        let exprs = PRETOKENIZERS
            .iter()
            .find(|(names, _)| names.contains(&pre))
            .map(|(_, exprs)| *exprs)
            .ok_or_else(|| TokenizerError::UnknownPretokenizer {
                name: pre.into(),
                known: PRETOKENIZERS
                    .iter()
                    .flat_map(|(n, _)| n.iter().copied())
                    .collect::<Vec<_>>()
                    .join(", "),
            })?;
        let regexes = exprs
            .iter()
            .map(|e| Regex::new(e).map_err(|err| TokenizerError::Regex(err.to_string())))
            .collect::<Result<_>>()?;

        const MERGES: &str = "tokenizer.ggml.merges";
        let merge_texts = match md.array(MERGES)? {
            Array::String(v) => v,
            other => {
                return Err(TokenizerError::WrongArrayType {
                    key: MERGES,
                    expected: "string",
                    found: other.element_type().name(),
                });
            }
        };
        let mut symbols = vocab.token_to_id.clone();
        let intern = |s: &str, symbols: &mut HashMap<String, u32>| -> u32 {
            let next = symbols.len() as u32;
            *symbols.entry(s.to_string()).or_insert(next)
        };
        let mut merges = HashMap::with_capacity(merge_texts.len());
        for (rank, m) in merge_texts.iter().enumerate() {
            // Split at the first space after the first character, as llama.cpp does.
            let split = m
                .char_indices()
                .skip(1)
                .find(|&(_, c)| c == ' ')
                .map(|(i, _)| i);
            let Some(at) = split else {
                return Err(TokenizerError::BadMerge {
                    index: rank,
                    text: m.clone(),
                });
            };
            let (left, right) = (&m[..at], &m[at + 1..]);
            let l = intern(left, &mut symbols);
            let r = intern(right, &mut symbols);
            let merged = intern(&format!("{left}{right}"), &mut symbols);
            // The first (lowest-rank) occurrence of a pair wins.
            merges.entry((l, r)).or_insert((rank as u32, merged));
        }
        let byte_to_char = byte_to_char_table();
        let char_to_byte = byte_to_char
            .iter()
            .enumerate()
            .map(|(b, &c)| (c, b as u8))
            .collect();
        let ignore_merges = IGNORE_MERGES.contains(&pre);
        Ok(Self {
            regexes,
            ignore_merges,
            raw,
            merges,
            symbols,
            byte_to_char,
            char_to_byte,
        })
    }

    /// Gemma 4's raw-UTF-8 BPE (its byte tokens are `<0xHH>`, as SentencePiece's).
    pub fn is_raw(&self) -> bool {
        self.raw
    }

    /// Split `text` into pre-tokenizer words.
    fn words<'t>(&self, text: &'t str) -> Result<Vec<&'t str>> {
        let mut pieces = vec![text];
        for re in &self.regexes {
            let mut next = Vec::with_capacity(pieces.len());
            for piece in pieces {
                let mut last = 0;
                for m in re.find_iter(piece) {
                    let m = m.map_err(|e| TokenizerError::Regex(e.to_string()))?;
                    if m.start() > last {
                        next.push(&piece[last..m.start()]);
                    }
                    if m.end() > m.start() {
                        next.push(m.as_str());
                    }
                    last = m.end();
                }
                if last < piece.len() {
                    next.push(&piece[last..]);
                }
            }
            pieces = next;
        }
        Ok(pieces)
    }

    /// Append the ids of raw (non-special) `text` to `out`.
    pub fn encode(&self, vocab: &Vocab, text: &str, out: &mut Vec<u32>) -> Result<()> {
        if self.raw {
            let escaped = text.replace(' ', "\u{2581}");
            for word in self.words(&escaped)? {
                // A run of newlines that is a token is that token (llama.cpp's Gemma 4 rule).
                match vocab.token_to_id.get(word) {
                    Some(&id) if word.bytes().all(|b| b == b'\n') => out.push(id),
                    _ => self.merge_word(vocab, word, out),
                }
            }
            return Ok(());
        }
        for word in self.words(text)? {
            let mapped: String = word
                .bytes()
                .map(|b| self.byte_to_char[b as usize])
                .collect();
            match vocab.token_to_id.get(&mapped) {
                Some(&id) if self.ignore_merges => out.push(id),
                _ => self.merge_word(vocab, &mapped, out),
            }
        }
        Ok(())
    }

    fn merge_word(&self, vocab: &Vocab, word: &str, out: &mut Vec<u32>) {
        struct Sym {
            id: u32,
            start: usize,
            end: usize,
            prev: Option<usize>,
            next: Option<usize>,
        }
        let mut syms: Vec<Sym> = Vec::with_capacity(word.len());
        for (i, (start, c)) in word.char_indices().enumerate() {
            let text = &word[start..start + c.len_utf8()];
            syms.push(Sym {
                id: self.symbols.get(text).copied().unwrap_or(u32::MAX),
                start,
                end: start + c.len_utf8(),
                prev: i.checked_sub(1),
                next: None,
            });
        }
        let n = syms.len();
        for (i, s) in syms.iter_mut().enumerate() {
            s.next = (i + 1 < n).then_some(i + 1);
        }
        // Min-heap on (rank, left index): the lowest rank merges first, leftmost on ties.
        let mut heap = BinaryHeap::new();
        let push = |heap: &mut BinaryHeap<_>, syms: &[Sym], l: usize, r: usize| {
            if let Some(&(rank, _)) = self.merges.get(&(syms[l].id, syms[r].id)) {
                heap.push(Reverse((rank, l, r, syms[l].id, syms[r].id)));
            }
        };
        for i in 1..n {
            push(&mut heap, &syms, i - 1, i);
        }
        while let Some(Reverse((_, l, r, lid, rid))) = heap.pop() {
            // Skip pairs made stale by an earlier merge.
            if syms[l].id != lid
                || syms[r].id != rid
                || syms[l].next != Some(r)
                || syms[l].end == syms[l].start
            {
                continue;
            }
            let (_, merged) = self.merges[&(lid, rid)];
            syms[l].id = merged;
            syms[l].end = syms[r].end;
            syms[l].next = syms[r].next;
            syms[r].start = syms[r].end;
            syms[r].id = u32::MAX;
            if let Some(nx) = syms[l].next {
                syms[nx].prev = Some(l);
            }
            if let Some(p) = syms[l].prev {
                push(&mut heap, &syms, p, l);
            }
            if let Some(nx) = syms[l].next {
                push(&mut heap, &syms, l, nx);
            }
        }
        let mut i = if n > 0 { Some(0) } else { None };
        while let Some(at) = i {
            let s = &syms[at];
            let text = &word[s.start..s.end];
            match vocab.id(text) {
                Some(id) => out.push(id),
                // Gemma 4's raw BPE falls back to its `<0xHH>` byte tokens.
                None if self.raw => {
                    out.extend(text.bytes().filter_map(|b| vocab.byte_tokens[b as usize]))
                }
                // llama.cpp falls back to single bytes of the symbol, dropping unknown ones.
                None => out.extend(
                    text.bytes()
                        .filter_map(|b| vocab.id(std::str::from_utf8(&[b]).unwrap_or(""))),
                ),
            }
            i = s.next;
        }
    }

    /// The bytes a normal token stands for (GPT-2 characters mapped back to bytes).
    pub fn decode_token(&self, text: &str, out: &mut Vec<u8>) {
        if self.raw {
            out.extend_from_slice(text.replace('\u{2581}', " ").as_bytes());
            return;
        }
        for c in text.chars() {
            match self.char_to_byte.get(&c) {
                Some(&b) => out.push(b),
                None => {
                    let mut buf = [0u8; 4];
                    out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                }
            }
        }
    }
}

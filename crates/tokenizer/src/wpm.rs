//! WordPiece (`tokenizer.ggml.model = bert`), as llama.cpp's `llm_tokenizer_wpm_session`:
//! BERT's normalization (lowercase and accents stripped through NFD, unless the file says
//! otherwise; control characters dropped), words split at whitespace, with punctuation,
//! ASCII symbols and CJK ideographs each a word of their own; then each word, with a
//! leading `▁`, greedily as the longest vocabulary pieces from the left — a word with an
//! unmatchable rest is the unknown token.

use fancy_regex::Regex;
use realm_gguf::Metadata;
use unicode_normalization::UnicodeNormalization;

use crate::vocab::Vocab;
use crate::{Result, TokenizerError};

#[derive(Debug)]
pub struct Wpm {
    lowercase: bool,
    strip_accents: bool,
    /// Longest token, in bytes.
    max_len: usize,
    punctuation: Regex,
    symbol: Regex,
    accent: Regex,
    control: Regex,
}

/// BERT's CJK ideograph blocks, as llama.cpp (and Hugging Face's Rust tokenizers) list them.
fn is_chinese(c: char) -> bool {
    matches!(u32::from(c),
        0x4E00..=0x9FFF | 0x3400..=0x4DBF | 0x20000..=0x2A6DF | 0x2A700..=0x2B73F
        | 0x2B740..=0x2B81F | 0x2B920..=0x2CEAF | 0xF900..=0xFAFF | 0x2F800..=0x2FA1F)
}

impl Wpm {
    pub fn new(md: &Metadata, vocab: &Vocab) -> Result<Self> {
        let flag = |key: &str| md.get(key).and_then(|v| v.as_bool());
        let lowercase = flag("tokenizer.ggml.normalizer.lowercase").unwrap_or(true);
        let strip_accents = flag("tokenizer.ggml.normalizer.strip_accents").unwrap_or(lowercase);
        let class = |e: &str| Regex::new(e).map_err(|err| TokenizerError::Regex(err.to_string()));
        Ok(Self {
            lowercase,
            strip_accents,
            max_len: vocab.tokens.iter().map(String::len).max().unwrap_or(0),
            punctuation: class(r"^\p{P}$")?,
            symbol: class(r"^\p{S}$")?,
            accent: class(r"^\p{Mn}$")?,
            control: class(r"^\p{C}$")?,
        })
    }

    fn is(re: &Regex, c: char) -> bool {
        let mut buf = [0u8; 4];
        re.is_match(c.encode_utf8(&mut buf)).unwrap_or(false)
    }

    /// BERT's words of `text`.
    fn words(&self, text: &str) -> Vec<String> {
        let chars: Vec<char> = if self.strip_accents {
            text.nfd().collect()
        } else {
            text.chars().collect()
        };
        let mut words = vec![String::new()];
        for c in chars {
            if c.is_whitespace() {
                if !words.last().is_some_and(String::is_empty) {
                    words.push(String::new());
                }
                continue;
            }
            if c == '\0' || c == '\u{FFFD}' || Self::is(&self.control, c) {
                continue;
            }
            if self.strip_accents && Self::is(&self.accent, c) {
                continue;
            }
            // One-to-one lowercase, as llama.cpp's table (the first of a longer mapping).
            let c = if self.lowercase {
                c.to_lowercase().next().unwrap_or(c)
            } else {
                c
            };
            let alone = Self::is(&self.punctuation, c)
                || (u32::from(c) < 0x7F && Self::is(&self.symbol, c))
                || is_chinese(c);
            if alone {
                if !words.last().is_some_and(String::is_empty) {
                    words.push(String::new());
                }
                if let Some(w) = words.last_mut() {
                    w.push(c);
                }
                words.push(String::new());
            } else if let Some(w) = words.last_mut() {
                w.push(c);
            }
        }
        words.retain(|w| !w.is_empty());
        words
    }

    /// Append the ids of `text` to `out`.
    pub fn encode(&self, vocab: &Vocab, text: &str, out: &mut Vec<u32>) {
        for word in self.words(text) {
            let word = format!("\u{2581}{word}");
            let start = out.len();
            let mut i = 0;
            while i < word.len() {
                // The longest vocabulary piece at byte i (piece ends on character boundaries).
                let end = (i + self.max_len).min(word.len());
                let found = (i + 1..=end)
                    .rev()
                    .filter(|&j| word.is_char_boundary(j))
                    .find_map(|j| vocab.token_to_id.get(&word[i..j]).map(|&id| (id, j)));
                match found {
                    Some((id, j)) => {
                        out.push(id);
                        i = j;
                    }
                    None => {
                        out.truncate(start);
                        break;
                    }
                }
            }
            if out.len() == start {
                out.extend(vocab.unk);
            }
        }
    }
}

//! Tokenizers and chat templates built from a GGUF file's own metadata, token-exact with
//! llama.cpp: byte-level BPE (`gpt2`) and SentencePiece (`llama`), special tokens matched
//! whole, and a streaming decoder that never splits a UTF-8 character.

mod bpe;
mod chat;
mod error;
mod spm;
mod stream;
mod vocab;
mod wpm;

pub use chat::{Builtin, ChatTemplate, Message, Rendered};
pub use error::{Result, TokenizerError};
pub use stream::Utf8Stream;
pub use vocab::{Defaults, TokenType, Vocab};

use realm_gguf::Metadata;

/// Which algorithm the file's `tokenizer.ggml.model` names.
#[derive(Debug)]
enum Kind {
    Bpe(Box<bpe::Bpe>),
    Spm,
    Wpm(Box<wpm::Wpm>),
}

/// A tokenizer for one model file.
#[derive(Debug)]
pub struct Tokenizer {
    vocab: Vocab,
    kind: Kind,
    /// Ids matched whole before the algorithm runs (control, user-defined, unknown tokens),
    /// longest text first, as llama.cpp's `cache_special_tokens`.
    specials: Vec<u32>,
}

enum Fragment<'t> {
    Token(u32),
    Raw(&'t str),
}

impl Tokenizer {
    pub fn from_metadata(md: &Metadata) -> Result<Self> {
        let model = md.str("tokenizer.ggml.model")?;
        if !matches!(model, "gpt2" | "llama" | "bert" | "gemma4") {
            return Err(TokenizerError::UnknownModel(model.into()));
        }
        let pre = md.opt_str("tokenizer.ggml.pre")?;
        let vocab = Vocab::from_metadata(md, Defaults::for_model(model, pre))?;
        let kind = match model {
            "llama" => Kind::Spm,
            "bert" => Kind::Wpm(Box::new(wpm::Wpm::new(md, &vocab)?)),
            _ => Kind::Bpe(Box::new(bpe::Bpe::new(md, &vocab)?)),
        };
        let mut specials: Vec<u32> = (0..vocab.len() as u32)
            .filter(|&id| {
                matches!(
                    vocab.token_type(id),
                    TokenType::Control | TokenType::UserDefined | TokenType::Unknown
                ) && !vocab.tokens[id as usize].is_empty()
            })
            .collect();
        specials.sort_by_key(|&id| std::cmp::Reverse(vocab.tokens[id as usize].len()));
        Ok(Self {
            vocab,
            kind,
            specials,
        })
    }

    pub fn vocab(&self) -> &Vocab {
        &self.vocab
    }

    /// `"bpe"` or `"spm"`.
    pub fn kind_name(&self) -> &'static str {
        match self.kind {
            Kind::Bpe(_) => "bpe",
            Kind::Spm => "spm",
            Kind::Wpm(_) => "wpm",
        }
    }

    /// Token ids for `text`. `add_special` adds BOS/EOS as the file asks; `parse_special`
    /// matches control tokens such as `<|im_start|>` written in the text (user-defined
    /// tokens are always matched, as in llama.cpp).
    pub fn encode(&self, text: &str, add_special: bool, parse_special: bool) -> Result<Vec<u32>> {
        let whole = 0..text.len();
        let literal = if parse_special {
            &[][..]
        } else {
            std::slice::from_ref(&whole)
        };
        self.encode_guarded(text, add_special, literal)
    }

    /// Token ids for a chat prompt: control tokens are matched everywhere except in the
    /// `literal` byte ranges (the messages' contents, see [`Rendered`]), where their text
    /// is ordinary characters. A user cannot type a turn marker into being.
    pub fn encode_guarded(
        &self,
        text: &str,
        add_special: bool,
        literal: &[std::ops::Range<usize>],
    ) -> Result<Vec<u32>> {
        let mut out = Vec::with_capacity(text.len() / 3 + 2);
        if add_special && self.vocab.add_bos {
            out.extend(self.vocab.bos);
        }
        let mut prev_special = true;
        for frag in self.partition(text, literal) {
            match frag {
                Fragment::Token(id) => {
                    out.push(id);
                    prev_special = true;
                }
                Fragment::Raw(raw) => {
                    match &self.kind {
                        Kind::Bpe(bpe) => bpe.encode(&self.vocab, raw, &mut out)?,
                        Kind::Wpm(wpm) => wpm.encode(&self.vocab, raw, &mut out),
                        Kind::Spm => {
                            let mut s = String::with_capacity(raw.len() + 3);
                            if self.vocab.add_space_prefix && prev_special {
                                s.push('▁');
                            }
                            s.extend(raw.chars().map(|c| if c == ' ' { '▁' } else { c }));
                            spm::encode(&self.vocab, &s, &mut out);
                        }
                    }
                    prev_special = false;
                }
            }
        }
        if add_special && self.vocab.add_eos {
            out.extend(self.vocab.eos);
        }
        Ok(out)
    }

    /// The text of a control token that `text` contains, if any.
    pub fn control_token_in(&self, text: &str) -> Option<&str> {
        self.specials
            .iter()
            .filter(|&&id| {
                matches!(
                    self.vocab.token_type(id),
                    TokenType::Control | TokenType::Unknown
                )
            })
            .map(|&id| self.vocab.tokens[id as usize].as_str())
            .find(|t| !t.is_empty() && text.contains(t))
    }

    /// Split `text` at every occurrence of a special token, longest tokens first; control
    /// (and unknown-type) tokens are not matched where they overlap a `literal` range.
    fn partition<'t>(
        &self,
        text: &'t str,
        literal: &[std::ops::Range<usize>],
    ) -> Vec<Fragment<'t>> {
        let mut frags = vec![Fragment::Raw(text)];
        if text.is_empty() {
            return Vec::new();
        }
        let base = text.as_ptr() as usize;
        for &id in &self.specials {
            let guarded = matches!(
                self.vocab.token_type(id),
                TokenType::Control | TokenType::Unknown
            );
            if guarded && literal.iter().any(|r| r.start == 0 && r.end >= text.len()) {
                continue;
            }
            let needle = self.vocab.tokens[id as usize].as_str();
            if !frags
                .iter()
                .any(|f| matches!(f, Fragment::Raw(r) if r.contains(needle)))
            {
                continue;
            }
            let mut next = Vec::with_capacity(frags.len() + 2);
            for f in frags {
                match f {
                    Fragment::Raw(r) => {
                        // Where `r` starts in `text` (it is a slice of it).
                        let off = r.as_ptr() as usize - base;
                        let mut from = 0;
                        for (at, _) in r.match_indices(needle) {
                            let (s, e) = (off + at, off + at + needle.len());
                            if at < from
                                || guarded && literal.iter().any(|l| s < l.end && e > l.start)
                            {
                                continue;
                            }
                            if at > from {
                                next.push(Fragment::Raw(&r[from..at]));
                            }
                            next.push(Fragment::Token(id));
                            from = at + needle.len();
                        }
                        if from < r.len() {
                            next.push(Fragment::Raw(&r[from..]));
                        }
                    }
                    tok => next.push(tok),
                }
            }
            frags = next;
        }
        frags
    }

    /// The bytes token `id` stands for. Control tokens give their text only when `special`.
    pub fn token_bytes(&self, id: u32, special: bool, out: &mut Vec<u8>) -> Result<()> {
        let text = self.vocab.text(id)?;
        match self.vocab.token_type(id) {
            TokenType::Control | TokenType::Unknown | TokenType::Unused => {
                if special {
                    out.extend_from_slice(text.as_bytes());
                }
            }
            TokenType::UserDefined => out.extend_from_slice(text.as_bytes()),
            TokenType::Byte
                if matches!(&self.kind, Kind::Spm)
                    || matches!(&self.kind, Kind::Bpe(b) if b.is_raw()) =>
            {
                if let Some(b) = self.vocab.byte_tokens.iter().position(|&t| t == Some(id)) {
                    out.push(b as u8);
                }
            }
            _ => match &self.kind {
                Kind::Bpe(bpe) => bpe.decode_token(text, out),
                Kind::Spm | Kind::Wpm(_) => {
                    for c in text.chars() {
                        let c = if c == '▁' { ' ' } else { c };
                        let mut buf = [0u8; 4];
                        out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                    }
                }
            },
        }
        Ok(())
    }

    /// The text of `ids`; control tokens are dropped unless `special`. Invalid UTF-8 (a
    /// sequence cut mid-character) becomes U+FFFD.
    pub fn decode(&self, ids: &[u32], special: bool) -> Result<String> {
        let mut bytes = Vec::with_capacity(ids.len() * 4);
        for &id in ids {
            self.token_bytes(id, special, &mut bytes)?;
        }
        if (matches!(self.kind, Kind::Wpm(_))
            || matches!(self.kind, Kind::Spm) && self.vocab.add_space_prefix)
            && bytes.first() == Some(&b' ')
        {
            bytes.remove(0);
        }
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }
}

#[cfg(test)]
mod tests;

//! The vocabulary of a GGUF file: token texts, types, scores and special ids, each checked
//! against the others (lengths agree, ids are in range, byte tokens are well-formed).

use std::collections::{HashMap, HashSet};

use realm_gguf::{Array, Metadata};

use crate::{Result, TokenizerError};

/// Largest vocabulary accepted (the largest real ones are ~256k).
pub const MAX_VOCAB: usize = 1 << 24;

/// llama.cpp's `llama_token_type`, stored per token in `tokenizer.ggml.token_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenType {
    Undefined,
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
}

impl TokenType {
    fn from_i32(v: i32) -> Option<Self> {
        use TokenType::*;
        Some(match v {
            0 => Undefined,
            1 => Normal,
            2 => Unknown,
            3 => Control,
            4 => UserDefined,
            5 => Unused,
            6 => Byte,
            _ => return None,
        })
    }
}

/// Token texts end-of-generation by convention, as llama.cpp's vocab loader lists them.
const EOG_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "<|end_of_text|>",
];

#[derive(Debug, Clone)]
pub struct Vocab {
    pub tokens: Vec<String>,
    pub types: Vec<TokenType>,
    /// Empty when the file has no scores (byte-level BPE).
    pub scores: Vec<f32>,
    pub token_to_id: HashMap<String, u32>,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub eot: Option<u32>,
    pub unk: Option<u32>,
    pub pad: Option<u32>,
    pub add_bos: bool,
    pub add_eos: bool,
    pub add_space_prefix: bool,
    /// SentencePiece `<0xHH>` tokens by byte value.
    pub byte_tokens: Box<[Option<u32>; 256]>,
    eog: HashSet<u32>,
}

/// What llama.cpp assumes when a file leaves out `tokenizer.ggml.{bos,eos,unknown}_token_id`
/// or `add_{bos,eos}_token` / `add_space_prefix` (llama-vocab.cpp, `llama_vocab::impl::load`):
/// by tokenizer model, and for byte-level BPE by pre-tokenizer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Defaults {
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub unk: Option<u32>,
    pub add_bos: bool,
    pub add_eos: bool,
    pub add_space_prefix: bool,
}

impl Defaults {
    /// For `tokenizer.ggml.model` = `model` and `tokenizer.ggml.pre` = `pre`.
    pub fn for_model(model: &str, pre: Option<&str>) -> Self {
        match model {
            // SentencePiece: <unk> 0, <s> 1, </s> 2, BOS added, a space prefix.
            "llama" => Self {
                bos: Some(1),
                eos: Some(2),
                unk: Some(0),
                add_bos: true,
                add_eos: false,
                add_space_prefix: true,
            },
            // WordPiece (BERT): [CLS] 101 and [SEP] 102 around the text, [UNK] 100.
            "bert" => Self {
                bos: Some(101),
                eos: Some(102),
                unk: Some(100),
                add_bos: true,
                add_eos: true,
                add_space_prefix: false,
            },
            // Gemma 4's BPE: the ids come from the file; BOS always added (llama.cpp).
            "gemma4" => Self {
                bos: None,
                eos: None,
                unk: None,
                add_bos: true,
                add_eos: false,
                add_space_prefix: false,
            },
            // Byte-level BPE: id 11 for both (GPT-2's '<|endoftext|>' in llama.cpp's
            // original vocabularies); BOS only for the pre-tokenizers llama.cpp flags.
            _ => Self {
                bos: Some(11),
                eos: Some(11),
                unk: None,
                add_bos: matches!(
                    pre.unwrap_or("default"),
                    "llama3"
                        | "llama-v3"
                        | "llama-bpe"
                        | "falcon3"
                        | "falcon-h1"
                        | "pixtral"
                        | "midm-2.0"
                        | "lfm2"
                        | "jina-v5-nano"
                        | "tekken"
                        | "chameleon"
                ),
                add_eos: false,
                add_space_prefix: false,
            },
        }
    }
}

fn wrong(key: &'static str, expected: &'static str, a: &Array) -> TokenizerError {
    TokenizerError::WrongArrayType {
        key,
        expected,
        found: a.element_type().name(),
    }
}

impl Vocab {
    /// Read `tokenizer.ggml.*`; what the file leaves out comes from `defaults`.
    pub fn from_metadata(md: &Metadata, defaults: Defaults) -> Result<Self> {
        const TOKENS: &str = "tokenizer.ggml.tokens";
        let tokens = match md.array(TOKENS)? {
            Array::String(v) => v.clone(),
            other => return Err(wrong(TOKENS, "string", other)),
        };
        let n_vocab = tokens.len();
        if n_vocab == 0 {
            return Err(TokenizerError::EmptyVocab);
        }
        if n_vocab > MAX_VOCAB {
            return Err(TokenizerError::VocabTooLarge {
                n_vocab,
                limit: MAX_VOCAB,
            });
        }
        let check_len = |key: &'static str, len: usize| {
            if len == n_vocab {
                Ok(())
            } else {
                Err(TokenizerError::LengthMismatch { key, len, n_vocab })
            }
        };

        const TYPES: &str = "tokenizer.ggml.token_type";
        let types = match md.get(TYPES).map(|_| md.array(TYPES)).transpose()? {
            None => vec![TokenType::Normal; n_vocab],
            Some(Array::I32(v)) => {
                check_len(TYPES, v.len())?;
                v.iter()
                    .enumerate()
                    .map(|(id, &t)| {
                        TokenType::from_i32(t).ok_or(TokenizerError::BadTokenType {
                            id: id as u32,
                            ty: t,
                        })
                    })
                    .collect::<Result<_>>()?
            }
            Some(other) => return Err(wrong(TYPES, "i32", other)),
        };

        const SCORES: &str = "tokenizer.ggml.scores";
        let scores = match md.get(SCORES).map(|_| md.array(SCORES)).transpose()? {
            None => Vec::new(),
            Some(Array::F32(v)) => {
                check_len(SCORES, v.len())?;
                v.clone()
            }
            Some(other) => return Err(wrong(SCORES, "f32", other)),
        };

        let special = |name: &str| -> Result<Option<u32>> {
            let key = format!("tokenizer.ggml.{name}_token_id");
            match md.get(&key) {
                None => Ok(None),
                Some(v) => {
                    let id = v.as_u64().ok_or_else(|| realm_gguf::GgufError::WrongType {
                        key: key.clone(),
                        expected: "non-negative integer",
                        found: v.value_type().name(),
                    })?;
                    if id >= n_vocab as u64 {
                        return Err(TokenizerError::SpecialIdOutOfRange { key, id, n_vocab });
                    }
                    Ok(Some(id as u32))
                }
            }
        };
        // A default id past the vocabulary is dropped, as llama.cpp does.
        let or_default = |id: Option<u32>, default: Option<u32>| {
            id.or(default.filter(|&d| (d as usize) < n_vocab))
        };
        let (bos, eos, eot, unk, pad) = (
            or_default(special("bos")?, defaults.bos),
            or_default(special("eos")?, defaults.eos),
            special("eot")?,
            or_default(special("unknown")?, defaults.unk),
            special("padding")?,
        );
        let eom = special("eom")?;

        let mut token_to_id = HashMap::with_capacity(n_vocab);
        for (id, t) in tokens.iter().enumerate() {
            // Later duplicates win, as in llama.cpp's loader.
            token_to_id.insert(t.clone(), id as u32);
        }

        let mut byte_tokens = Box::new([None; 256]);
        for (id, (text, ty)) in tokens.iter().zip(&types).enumerate() {
            if *ty == TokenType::Byte {
                let byte = parse_byte_token(text).ok_or_else(|| TokenizerError::BadByteToken {
                    id: id as u32,
                    text: text.clone(),
                })?;
                byte_tokens[byte as usize] = Some(id as u32);
            }
        }

        let mut eog: HashSet<u32> = [eos, eot, eom].into_iter().flatten().collect();
        for (id, (text, ty)) in tokens.iter().zip(&types).enumerate() {
            if matches!(ty, TokenType::Control | TokenType::UserDefined)
                && EOG_TEXTS.contains(&text.as_str())
            {
                eog.insert(id as u32);
            }
        }

        Ok(Self {
            tokens,
            types,
            scores,
            token_to_id,
            bos,
            eos,
            eot,
            unk,
            pad,
            add_bos: md
                .opt_bool("tokenizer.ggml.add_bos_token")?
                .unwrap_or(defaults.add_bos),
            add_eos: md
                .opt_bool("tokenizer.ggml.add_eos_token")?
                .unwrap_or(defaults.add_eos),
            add_space_prefix: md
                .opt_bool("tokenizer.ggml.add_space_prefix")?
                .unwrap_or(defaults.add_space_prefix),
            byte_tokens,
            eog,
        })
    }

    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    pub fn id(&self, text: &str) -> Option<u32> {
        self.token_to_id.get(text).copied()
    }

    pub fn text(&self, id: u32) -> Result<&str> {
        self.tokens
            .get(id as usize)
            .map(String::as_str)
            .ok_or(TokenizerError::UnknownId {
                id,
                n_vocab: self.tokens.len(),
            })
    }

    pub fn token_type(&self, id: u32) -> TokenType {
        self.types
            .get(id as usize)
            .copied()
            .unwrap_or(TokenType::Undefined)
    }

    pub fn score(&self, id: u32) -> f32 {
        self.scores.get(id as usize).copied().unwrap_or(0.0)
    }

    /// Whether generating `id` ends the turn (EOS, EOT, and the conventional end tokens).
    pub fn is_eog(&self, id: u32) -> bool {
        self.eog.contains(&id)
    }

    /// The end-of-generation ids, sorted.
    pub fn eog_ids(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self.eog.iter().copied().collect();
        v.sort_unstable();
        v
    }
}

/// `<0xHH>` → the byte; anything else (`<0x-1>`, `<0xZZ>`, `<0x100>`) → `None`.
fn parse_byte_token(text: &str) -> Option<u8> {
    let hex = text.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_tokens_parse_strictly() {
        assert_eq!(parse_byte_token("<0x0A>"), Some(10));
        assert_eq!(parse_byte_token("<0xff>"), Some(255));
        for bad in ["<0x-1>", "<0xZZ>", "<0x100>", "<0x1>", "0x0A", "<0x+A>"] {
            assert_eq!(parse_byte_token(bad), None, "{bad}");
        }
    }
}

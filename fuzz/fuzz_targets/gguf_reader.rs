//! Fuzz the whole format core on arbitrary bytes: header, tensor placement, dequantization,
//! hyper-parameters, tokenizer, chat template. Any panic is a bug; errors are expected.

#![no_main]

use libfuzzer_sys::fuzz_target;
use realm_gguf::{GgufFile, Hparams};
use realm_tokenizer::{Builtin, ChatTemplate, Message, Tokenizer};

fuzz_target!(|data: &[u8]| {
    let Ok(file) = GgufFile::read(data) else { return };
    for t in &file.tensors {
        let _ = file.dequantize(data, t);
    }
    let _ = Hparams::from_gguf(&file);
    let Ok(tok) = Tokenizer::from_metadata(&file.metadata) else { return };
    if let Ok(ids) = tok.encode("Hello <|im_start|> wörld 123 🦙", true, true) {
        let _ = tok.decode(&ids, true);
    }
    if let Ok(tmpl) = ChatTemplate::from_metadata(&file.metadata, tok.vocab(), Builtin::ChatMl) {
        let _ = tmpl.render(&[Message::new("user", "hi")], true);
    }
});

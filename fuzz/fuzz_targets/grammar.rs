//! Fuzz constrained output's parsers on arbitrary text: GBNF grammars and JSON Schemas
//! (both arrive from the network), then a few steps of matching. Any panic, hang or stack
//! overflow is a bug; errors are expected.

#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use realm_grammar::{Constraint, Matcher};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    for c in [
        Constraint::Gbnf(text.to_string()),
        Constraint::JsonSchema(text.to_string()),
    ] {
        let Ok(g) = c.compile() else { continue };
        let Ok(mut m) = Matcher::new(Arc::new(g)) else { continue };
        for piece in ["{", "\"", "a", " ", "1", "}", "]"] {
            let _ = m.allows(piece);
            let _ = m.accept(piece);
        }
        let _ = m.is_accepting();
    }
});

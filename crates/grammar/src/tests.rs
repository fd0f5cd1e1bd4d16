use std::sync::Arc;

use super::*;

fn matcher(g: &str) -> Matcher {
    Matcher::new(Arc::new(Grammar::parse(g).expect("grammar parses"))).expect("matcher")
}

fn full_match(g: &str, text: &str) -> bool {
    let mut m = matcher(g);
    m.accept(text).is_ok() && m.is_accepting()
}

#[test]
fn gbnf_literals_classes_groups_and_repetitions() {
    let g = r#"
        # a comment
        root ::= greeting (" " name)? "!"{1,3}
        greeting ::= "hello" | "hi"
        name ::= [A-Z] [a-z]* # names
    "#;
    for ok in ["hello!", "hi Bob!!", "hello Z!!!"] {
        assert!(full_match(g, ok), "{ok}");
    }
    for bad in ["hello", "hi bob!", "hello!!!!", "hey!", "hi Bob !"] {
        assert!(!full_match(g, bad), "{bad}");
    }
    // Escapes, negated classes, `.`, and a repeated literal.
    let g = r#"root ::= "\x41\u00e9\"" [^a-c\n]+ . ("ab"){2}"#;
    assert!(full_match(g, "Aé\"xyz!abab"));
    assert!(!full_match(g, "Aé\"xbz!abab"));
    assert!(!full_match(g, "Aé\"xyz!ab"));
}

#[test]
fn bad_grammars_are_clear_errors() {
    for (g, needle) in [
        ("rot ::= \"a\"", "no 'root'"),
        ("root ::= a", "not defined"),
        ("root ::= \"a\"\nroot ::= \"b\"", "twice"),
        ("root ::= root \"a\" | \"b\"", "left-recursive"),
        ("root ::= x\nx ::= y? root\ny ::= \"a\"", "left-recursive"),
        ("root ::= \"abc", "unterminated"),
        ("root ::= [a-", "unexpected end"),
        ("root ::= [z-a]", "backwards"),
        ("root ::= \"a\"{3,2}", "maximum"),
        ("root ::= \"a\"{5000}", "over 1000"),
        ("root ::= \"\\q\"", "escape"),
        ("root ::= (\"a\"", "expected )"),
        ("root ::= \"a\" @", "unexpected"),
    ] {
        let e = Grammar::parse(g).expect_err(g).to_string();
        assert!(e.contains(needle), "{g:?}: {e}");
    }
}

#[test]
fn ambiguity_is_bounded() {
    // Every split of a run of a's is a parse: the stack count must stay bounded.
    let g = "root ::= x*\nx ::= \"a\" | \"aa\" | \"aaa\"";
    let mut m = matcher(g);
    assert!(m.accept(&"a".repeat(200)).is_ok() && m.is_accepting());
}

#[test]
fn the_vocabulary_walk_equals_checking_every_token() {
    let g = r#"root ::= "{" ws "\"k\"" ws ":" ws [0-9]+ ws "}"
ws ::= [ ]?"#;
    let tokens = [
        "{", "{\"", "\"k", "\"k\"", ":", " ", ": ", "1", "12", "123x", "}", "} ", "a", "{ ", "\"",
        "k", "\"k\":", "9}", "",
    ];
    let vocab = Vocabulary::new(tokens.iter().map(|t| Some(t.as_bytes().to_vec())));
    let mut m = matcher(g);
    for step in ["{", " ", "\"k\"", ":", " ", "12"] {
        let mut allowed = vec![false; tokens.len()];
        m.allowed(&vocab, &mut allowed).expect("walk");
        for (i, t) in tokens.iter().enumerate() {
            assert_eq!(
                allowed[i],
                !t.is_empty() && m.allows(t),
                "after {step:?}: token {t:?}"
            );
        }
        m.accept(step).expect("allowed");
    }
    assert!(!m.is_accepting());
    m.accept("}").expect("closes");
    assert!(m.is_accepting() && m.is_finished());
}

/// Random walks through a grammar: choose any allowed next character until the grammar
/// may end (or a length cap), and check the text with serde_json.
fn random_documents(grammar: &str, n: usize, check: impl Fn(&serde_json::Value)) {
    let g = Arc::new(Grammar::parse(grammar).expect("parses"));
    let alphabet: Vec<char> = "{}[]\",:-.0123456789eE+ abcdefghijklmnopqrstuvwxyzAB\\/"
        .chars()
        .collect();
    let mut seed = 0x9E37_79B9_7F4A_7C15u64;
    let mut rand = move |k: usize| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed % k as u64) as usize
    };
    let mut made = 0;
    for _ in 0..n * 20 {
        let mut m = Matcher::new(g.clone()).expect("matcher");
        let mut text = String::new();
        while !m.is_finished() && text.len() < 300 {
            // Prefer ending once possible, half of the time, so documents stay small.
            if m.is_accepting() && rand(2) == 0 {
                break;
            }
            let options: Vec<char> = alphabet
                .iter()
                .copied()
                .filter(|c| m.allows(&c.to_string()))
                .collect();
            if options.is_empty() {
                break;
            }
            let c = options[rand(options.len())];
            m.accept(&c.to_string()).expect("allowed");
            text.push(c);
        }
        if !m.is_accepting() {
            continue;
        }
        let v: serde_json::Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON: {text:?}: {e}"));
        check(&v);
        made += 1;
        if made == n {
            return;
        }
    }
    panic!("only {made} complete documents out of {}", n * 20);
}

#[test]
fn json_mode_makes_only_json_objects() {
    random_documents(&json_object_grammar(), 30, |v| {
        assert!(v.is_object(), "{v}")
    });
}

#[test]
fn schemas_make_only_matching_documents() {
    let schema = serde_json::json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 3},
            "age": {"type": "integer"},
            "tags": {"type": "array", "items": {"enum": ["a", "b", 1]}, "minItems": 1, "maxItems": 2},
            "kind": {"const": "x"},
            "opt": {"type": ["boolean", "null"]},
            "ref": {"$ref": "#/$defs/point"}
        },
        "required": ["name"],
        "$defs": {"point": {"type": "object", "properties": {"x": {"type": "number"}}}}
    });
    let g = schema_to_gbnf(&schema).expect("converts");
    random_documents(&g, 20, |v| {
        let o = v.as_object().expect("object");
        let keys: Vec<&str> = o.keys().map(String::as_str).collect();
        assert_eq!(keys.len(), 6, "{v}");
        assert!(
            o["name"].as_str().is_some_and(|s| s.chars().count() <= 3),
            "{v}"
        );
        assert!(o["age"].is_i64(), "{v}");
        let tags = o["tags"].as_array().expect("tags");
        assert!((1..=2).contains(&tags.len()), "{v}");
        assert!(tags.iter().all(|t| t == "a" || t == "b" || t == 1), "{v}");
        assert_eq!(o["kind"], "x");
        assert!(o["opt"].is_boolean() || o["opt"].is_null(), "{v}");
        assert!(o["ref"]["x"].is_number(), "{v}");
    });
}

#[test]
fn schema_keywords_a_grammar_cannot_keep_are_refused() {
    for (s, needle) in [
        (
            serde_json::json!({"type": "string", "pattern": "^a"}),
            "pattern",
        ),
        (
            serde_json::json!({"type": "integer", "minimum": 3}),
            "minimum",
        ),
        (
            serde_json::json!({"type": "string", "format": "date"}),
            "format",
        ),
        (serde_json::json!({"$ref": "http://x/y"}), "local"),
        (serde_json::json!({"$ref": "#/$defs/nope"}), "nowhere"),
        (serde_json::json!({"type": "wat"}), "unknown type"),
        (
            serde_json::json!({"type": "object", "properties": {}, "required": ["a"]}),
            "required",
        ),
        (
            serde_json::json!({"type": "array", "minItems": 3, "maxItems": 2}),
            "maxItems",
        ),
        (serde_json::json!(false), "matches nothing"),
    ] {
        let e = schema_to_gbnf(&s).expect_err(&s.to_string()).to_string();
        assert!(e.contains(needle), "{s}: {e}");
    }
    // Recursive schemas work through their references.
    let tree = serde_json::json!({
        "$defs": {"node": {"type": "object", "properties": {
            "v": {"type": "integer"}, "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}, "maxItems": 2}}}},
        "$ref": "#/$defs/node"
    });
    let g = schema_to_gbnf(&tree).expect("converts");
    Grammar::parse(&g).expect("parses");
}

/// Hostile grammars and schemas (random text, deep nesting, long rule chains) are errors
/// or work; nothing panics or overflows the stack.
#[test]
fn hostile_grammars_fail_cleanly() {
    let alphabet: Vec<char> = "root ::= ab|()[]^-*+?{}0123456789,\"\\.#\n x-y"
        .chars()
        .collect();
    let mut seed = 0x2545_F491_4F6C_DD1Du64;
    let mut rand = move |k: usize| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed % k as u64) as usize
    };
    for _ in 0..3000 {
        let n = 9 + rand(40);
        let text: String = "root ::= "
            .chars()
            .chain((0..n).map(|_| alphabet[rand(alphabet.len())]))
            .collect();
        if let Ok(g) = Grammar::parse(&text)
            && let Ok(mut m) = Matcher::new(Arc::new(g))
        {
            for c in ["a", "b", "x", "-"] {
                let _ = m.accept(c);
            }
        }
    }
    let deep = format!("root ::= {}\"a\"{}", "(".repeat(10_000), ")".repeat(10_000));
    assert!(
        Grammar::parse(&deep)
            .expect_err("deep")
            .to_string()
            .contains("nested")
    );
    let mut chain = String::from("root ::= r0\n");
    for i in 0..5000 {
        chain.push_str(&format!("r{i} ::= r{}\n", i + 1));
    }
    chain.push_str("r5000 ::= \"a\"\n");
    let g = Grammar::parse(&chain).expect("a long chain parses");
    assert!(
        Matcher::new(Arc::new(g))
            .expect_err("too deep")
            .to_string()
            .contains("nest")
    );
    let nested = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    assert!(Constraint::JsonSchema(nested).compile().is_err());
}

//! JSON Schema → GBNF, for the keywords whose every match a grammar can guarantee: `type`
//! (one or a list), `properties` (all of them are written, in order: valid whether or not
//! they are `required`), `items`, `minItems` / `maxItems`, `enum`, `const`, `anyOf` /
//! `oneOf`, local `$ref`s into `$defs` / `definitions`, `minLength` / `maxLength` on
//! strings. Keywords a grammar cannot keep (`pattern`, `format`, numeric bounds, …) are
//! refused by name rather than ignored, so that every output validates.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::{Error, Result};

/// Whitespace between JSON tokens: bounded, so that a model cannot pad forever.
const SPACE: &str = r#"space ::= ([ \t\n] ([ \t\n] ([ \t\n] [ \t\n]?)?)?)?"#;

const PRIMITIVES: &[(&str, &str)] = &[
    ("boolean", r#"boolean ::= ("true" | "false") space"#),
    ("null", r#"null ::= "null" space"#),
    (
        "integer",
        r#"integer ::= ("-"? ([0-9] | [1-9] [0-9]{1,15})) space"#,
    ),
    (
        "number",
        r#"number ::= ("-"? ([0-9] | [1-9] [0-9]{1,15}) ("." [0-9]{1,16})? ([eE] [-+]? [0-9]{1,2})?) space"#,
    ),
    (
        "char",
        r#"char ::= [^"\\\x00-\x1f] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F]{4})"#,
    ),
    ("string", r#"string ::= "\"" char* "\"" space"#),
    (
        "value",
        r#"value ::= (object | array | string | number | boolean | null)"#,
    ),
    (
        "object",
        r#"object ::= "{" space (string ":" space value ("," space string ":" space value)*)? "}" space"#,
    ),
    (
        "array",
        r#"array ::= "[" space (value ("," space value)*)? "]" space"#,
    ),
];

/// Keywords that do not constrain what a grammar must produce (annotations).
const ANNOTATIONS: &[&str] = &[
    "title",
    "description",
    "$schema",
    "$id",
    "$comment",
    "examples",
    "default",
    "deprecated",
    "readOnly",
    "writeOnly",
    "$defs",
    "definitions",
    "required",
    "additionalProperties",
    "strict",
];

/// A grammar for any JSON object (OpenAI's `json_object` response format).
pub fn json_object_grammar() -> String {
    let mut out = String::from("root ::= object\n");
    for (_, rule) in PRIMITIVES {
        out.push_str(rule);
        out.push('\n');
    }
    out.push_str(SPACE);
    out.push('\n');
    out
}

struct Converter<'a> {
    root: &'a Value,
    rules: BTreeMap<String, String>,
    /// `$ref` targets already given a rule.
    refs: BTreeMap<String, String>,
    next: usize,
}

/// The GBNF text whose matches are JSON documents valid against `schema`.
pub fn schema_to_gbnf(schema: &Value) -> Result<String> {
    let mut c = Converter {
        root: schema,
        rules: BTreeMap::new(),
        refs: BTreeMap::new(),
        next: 0,
    };
    let body = c.visit(schema, "root")?;
    let mut out = format!("root ::= {body}\n");
    for (name, rule) in &c.rules {
        out.push_str(&format!("{name} ::= {rule}\n"));
    }
    for (_, rule) in PRIMITIVES {
        out.push_str(rule);
        out.push('\n');
    }
    out.push_str(SPACE);
    out.push('\n');
    Ok(out)
}

/// A GBNF string literal matching exactly `s`.
fn literal(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\x{:02x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

impl Converter<'_> {
    fn fresh(&mut self, hint: &str) -> String {
        self.next += 1;
        let clean: String = hint
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .take(40)
            .collect();
        format!("{clean}-{}", self.next)
    }

    /// The GBNF expression for `schema`.
    fn visit(&mut self, schema: &Value, hint: &str) -> Result<String> {
        let obj = match schema {
            Value::Bool(true) => return Ok("value".into()),
            Value::Bool(false) => {
                return Err(Error::Schema("a `false` schema matches nothing".into()));
            }
            Value::Object(o) => o,
            _ => return Err(Error::Schema("a schema must be an object".into())),
        };
        if let Some(r) = obj.get("$ref") {
            return self.reference(r);
        }
        if let Some(v) = obj.get("const") {
            return Ok(format!("{} space", literal(&compact(v))));
        }
        if let Some(vals) = obj.get("enum") {
            let vals = vals
                .as_array()
                .filter(|a| !a.is_empty())
                .ok_or_else(|| Error::Schema("`enum` must be a non-empty list".into()))?;
            let alts: Vec<String> = vals.iter().map(|v| literal(&compact(v))).collect();
            return Ok(format!("({}) space", alts.join(" | ")));
        }
        for key in ["anyOf", "oneOf"] {
            if let Some(list) = obj.get(key) {
                let list = list
                    .as_array()
                    .filter(|a| !a.is_empty())
                    .ok_or_else(|| Error::Schema(format!("`{key}` must be a non-empty list")))?;
                let mut alts = Vec::new();
                for (i, s) in list.iter().enumerate() {
                    alts.push(self.visit(s, &format!("{hint}-{i}"))?);
                }
                return Ok(format!("({})", alts.join(" | ")));
            }
        }
        for key in obj.keys() {
            let known = ANNOTATIONS.contains(&key.as_str())
                || matches!(
                    key.as_str(),
                    "type"
                        | "properties"
                        | "items"
                        | "minItems"
                        | "maxItems"
                        | "minLength"
                        | "maxLength"
                );
            if !known {
                return Err(Error::Schema(format!(
                    "the keyword `{key}` is not supported in constrained output (its matches \
                     cannot be guaranteed by a grammar)"
                )));
            }
        }
        if let Some(ap) = obj.get("additionalProperties")
            && !matches!(ap, Value::Bool(_) | Value::Object(_))
        {
            return Err(Error::Schema(
                "`additionalProperties` must be a boolean or schema".into(),
            ));
        }
        let types: Vec<&str> = match obj.get("type") {
            None if obj.contains_key("properties") => vec!["object"],
            None if obj.contains_key("items") => vec!["array"],
            None => return Ok("value".into()),
            Some(Value::String(t)) => vec![t.as_str()],
            Some(Value::Array(ts)) => ts
                .iter()
                .map(|t| {
                    t.as_str()
                        .ok_or_else(|| Error::Schema("`type` lists must hold strings".into()))
                })
                .collect::<Result<_>>()?,
            Some(_) => return Err(Error::Schema("`type` must be a string or a list".into())),
        };
        let mut alts = Vec::new();
        for t in types {
            alts.push(match t {
                "object" => self.object(obj, hint)?,
                "array" => self.array(obj, hint)?,
                "string" => self.string(obj)?,
                "number" | "integer" | "boolean" | "null" => t.to_string(),
                other => {
                    return Err(Error::Schema(format!("unknown type `{other}`")));
                }
            });
        }
        Ok(if alts.len() == 1 {
            alts.remove(0)
        } else {
            format!("({})", alts.join(" | "))
        })
    }

    fn object(&mut self, obj: &serde_json::Map<String, Value>, hint: &str) -> Result<String> {
        let Some(props) = obj.get("properties") else {
            return Ok("object".into());
        };
        let props = props
            .as_object()
            .ok_or_else(|| Error::Schema("`properties` must be an object".into()))?;
        if let Some(req) = obj.get("required").and_then(Value::as_array) {
            for r in req {
                let name = r.as_str().unwrap_or("");
                if !props.contains_key(name) {
                    return Err(Error::Schema(format!(
                        "`required` names `{name}`, which is not in `properties`"
                    )));
                }
            }
        }
        if props.is_empty() {
            return Ok(r#""{" space "}" space"#.into());
        }
        let mut parts = Vec::new();
        for (i, (name, sub)) in props.iter().enumerate() {
            let value = self.visit(sub, &format!("{hint}-{name}"))?;
            let rule = self.fresh(&format!("{hint}-{name}"));
            self.rules.insert(rule.clone(), value);
            let sep = if i == 0 { "" } else { r#""," space "# };
            parts.push(format!(
                r#"{sep}{} space ":" space {rule}"#,
                literal(&compact(&Value::String(name.clone())))
            ));
        }
        Ok(format!(r#""{{" space {} "}}" space"#, parts.join(" ")))
    }

    fn array(&mut self, obj: &serde_json::Map<String, Value>, hint: &str) -> Result<String> {
        let item = match obj.get("items") {
            None => "value".to_string(),
            Some(s) => {
                let body = self.visit(s, &format!("{hint}-item"))?;
                let rule = self.fresh(&format!("{hint}-item"));
                self.rules.insert(rule.clone(), body);
                rule
            }
        };
        let (min, max) = (
            bound(obj, "minItems")?.unwrap_or(0),
            bound(obj, "maxItems")?,
        );
        if max.is_some_and(|m| m < min) {
            return Err(Error::Schema("`maxItems` is below `minItems`".into()));
        }
        // Items after the first: at least `n`, at most `maxItems - 1` (or any number).
        let more = |n: u64| match max {
            Some(m) => format!(r#"("," space {item}){{{},{}}}"#, n, m.saturating_sub(1)),
            None if n == 0 => format!(r#"("," space {item})*"#),
            None => format!(r#"("," space {item}){{{n},}}"#),
        };
        Ok(match (min, max) {
            (_, Some(0)) => r#""[" space "]" space"#.to_string(),
            (0, _) => format!(r#""[" space ({item} {})? "]" space"#, more(0)),
            (m, _) => format!(r#""[" space {item} {} "]" space"#, more(m - 1)),
        })
    }

    fn string(&mut self, obj: &serde_json::Map<String, Value>) -> Result<String> {
        match (bound(obj, "minLength")?, bound(obj, "maxLength")?) {
            (None, None) => Ok("string".into()),
            (min, None) => Ok(format!(r#""\"" char{{{},}} "\"" space"#, min.unwrap_or(0))),
            (min, Some(max)) => {
                let min = min.unwrap_or(0);
                if max < min {
                    return Err(Error::Schema("`maxLength` is below `minLength`".into()));
                }
                Ok(format!(r#""\"" char{{{min},{max}}} "\"" space"#))
            }
        }
    }

    fn reference(&mut self, r: &Value) -> Result<String> {
        let r = r
            .as_str()
            .ok_or_else(|| Error::Schema("`$ref` must be a string".into()))?;
        if let Some(rule) = self.refs.get(r) {
            return Ok(rule.clone());
        }
        let path = r.strip_prefix("#/").ok_or_else(|| {
            Error::Schema(format!(
                "only local references (#/$defs/…) are supported, not `{r}`"
            ))
        })?;
        let mut target = self.root;
        for part in path.split('/') {
            let part = part.replace("~1", "/").replace("~0", "~");
            target = target
                .get(&part)
                .ok_or_else(|| Error::Schema(format!("`$ref` {r} points nowhere")))?;
        }
        let rule = self.fresh(path);
        // Named before visiting, so that recursive schemas refer to the rule itself.
        self.refs.insert(r.to_string(), rule.clone());
        let body = self.visit(target, &rule)?;
        self.rules.insert(rule.clone(), body);
        Ok(rule)
    }
}

/// A size keyword (`minItems`, `maxLength`, …): an integer up to 1000, if present.
fn bound(obj: &serde_json::Map<String, Value>, k: &str) -> Result<Option<u64>> {
    match obj.get(k) {
        None => Ok(None),
        Some(v) => v
            .as_u64()
            .filter(|&n| n <= 1000)
            .map(Some)
            .ok_or_else(|| Error::Schema(format!("`{k}` must be an integer up to 1000"))),
    }
}

/// `v` as compact JSON text.
fn compact(v: &Value) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

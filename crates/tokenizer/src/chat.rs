//! Chat templates: the GGUF's own `tokenizer.chat_template` (Jinja, rendered with minijinja),
//! or a built-in one when the file has none.

use minijinja::{Environment, Error, ErrorKind, context};
use realm_gguf::Metadata;
use serde::Serialize;

use crate::{Result, TokenizerError};

/// Longest template accepted.
pub const MAX_TEMPLATE_LEN: usize = 1 << 20;
/// Interpreter steps one render may take: stops templates that loop without bound.
pub const TEMPLATE_FUEL: u64 = 2_000_000;
/// Longest rendered prompt accepted.
pub const MAX_RENDERED_LEN: usize = 16 << 20;

/// ChatML, the format of SmolLM2, Qwen and many others.
const CHATML: &str = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}\
{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

/// Gemma's turn format: a system message is folded into the first user turn, and the
/// assistant's role is called `model`. BOS comes from the tokenizer, not the template.
const GEMMA: &str = "{% set sys = '' %}{% set turns = messages %}\
{% if messages and messages[0].role == 'system' %}{% set sys = messages[0].content ~ '\n\n' %}{% set turns = messages[1:] %}{% endif %}\
{% for m in turns %}<start_of_turn>{{ 'model' if m.role == 'assistant' else m.role }}\n\
{{ sys if loop.first else '' }}{{ m.content | trim }}<end_of_turn>\n{% endfor %}\
{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}";

/// `strftime`'s common fields of a UTC time (`%Y %m %d %H %M %S %y %b %B %a %A %j %%`;
/// anything else is kept as written): what templates' `strftime_now` formats ask for.
pub fn strftime_utc(unix: i64, format: &str) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = [
        "Sunday",
        "Monday",
        "Tuesday",
        "Wednesday",
        "Thursday",
        "Friday",
        "Saturday",
    ];
    let days = unix.div_euclid(86_400);
    let secs = unix.rem_euclid(86_400);
    // The proleptic Gregorian date of a day count from 1970-01-01 (era arithmetic).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
    let before = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334][(month - 1) as usize];
    let yday = before + day + i64::from(leap && month > 2);
    let weekday = (days + 4).rem_euclid(7) as usize;
    let name = MONTHS[(month - 1) as usize];
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&format!("{:02}", year.rem_euclid(100))),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('H') => out.push_str(&format!("{:02}", secs / 3600)),
            Some('M') => out.push_str(&format!("{:02}", secs / 60 % 60)),
            Some('S') => out.push_str(&format!("{:02}", secs % 60)),
            Some('j') => out.push_str(&format!("{yday:03}")),
            Some('b') => out.push_str(&name[..3]),
            Some('B') => out.push_str(name),
            Some('a') => out.push_str(&DAYS[weekday][..3]),
            Some('A') => out.push_str(DAYS[weekday]),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// transformers' `{% generation %}…{% endgeneration %}` (it marks the assistant's tokens
/// and renders its body) as an `if` that is always true, whitespace control kept.
fn without_generation_tags(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(at) = rest.find("{%") {
        out.push_str(&rest[..at]);
        let tag = &rest[at..];
        let Some(end) = tag.find("%}") else {
            out.push_str(tag);
            return out;
        };
        let inner = &tag[2..end];
        let (dash_l, body) = match inner.strip_prefix('-') {
            Some(b) => ("-", b),
            None => ("", inner),
        };
        let (dash_r, body) = match body.strip_suffix('-') {
            Some(b) => ("-", b),
            None => ("", body),
        };
        let replaced = match body.trim() {
            "generation" => Some("if true"),
            "endgeneration" => Some("endif"),
            _ => None,
        };
        match replaced {
            Some(r) => out.push_str(&format!("{{%{dash_l} {r} {dash_r}%}}")),
            None => out.push_str(&tag[..end + 2]),
        }
        rest = &tag[end + 2..];
    }
    out.push_str(rest);
    out
}

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A rendered chat prompt and where the messages' contents are in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    pub text: String,
    /// Byte ranges of `text` that are message content (typed by users, not the template).
    pub content: Vec<std::ops::Range<usize>>,
    /// Messages whose content could not be placed in `text` (a template that transforms
    /// contents beyond trimming): the caller must not let them carry control tokens.
    pub unplaced: Vec<usize>,
}

/// What stands in for message `i`'s content while the template renders: a character from
/// Unicode's last private-use plane around the index (digits survive case changes).
const MARK: char = '\u{10FFFD}';

/// The text of `marked` with every marker replaced by its message's content (through
/// `f`), and the byte ranges those contents took; `None` where a marker is malformed.
fn substitute(
    marked: &str,
    messages: &[Message],
    f: impl Fn(&str) -> &str,
) -> Option<(String, Vec<std::ops::Range<usize>>, Vec<bool>)> {
    let mut text = String::with_capacity(marked.len());
    let mut ranges = Vec::new();
    let mut seen = vec![false; messages.len()];
    let mut rest = marked;
    while let Some(at) = rest.find(MARK) {
        text.push_str(&rest[..at]);
        let after = &rest[at + MARK.len_utf8()..];
        let end = after.find(MARK)?;
        let i: usize = after[..end].parse().ok()?;
        let content = f(&messages.get(i)?.content);
        seen[i] = true;
        ranges.push(text.len()..text.len() + content.len());
        text.push_str(content);
        rest = &after[end + MARK.len_utf8()..];
    }
    text.push_str(rest);
    Some((text, ranges, seen))
}

/// `real` with each message's (trimmed) content looked for in order; those not found are
/// `unplaced`.
fn locate(real: String, messages: &[Message]) -> Rendered {
    let mut content = Vec::new();
    let mut unplaced = Vec::new();
    let mut from = 0;
    for (i, m) in messages.iter().enumerate() {
        let c = m.content.trim();
        if c.is_empty() {
            continue;
        }
        match real[from..].find(c) {
            Some(at) => {
                content.push(from + at..from + at + c.len());
                from += at + c.len();
            }
            None => unplaced.push(i),
        }
    }
    Rendered {
        text: real,
        content,
        unplaced,
    }
}

/// The system text that tells a model whose template does not render tools what it may
/// call and how (the `<tool_call>` format of Hermes and Qwen templates).
pub fn tool_system_prompt(tools: &serde_json::Value) -> String {
    let list: Vec<String> = tools
        .as_array()
        .into_iter()
        .flatten()
        .map(|t| t.get("function").unwrap_or(t).to_string())
        .collect();
    format!(
        "You can call these tools:\n{}\nTo call a tool, answer with only \
         <tool_call>{{\"name\": \"TOOL NAME\", \"arguments\": {{...}}}}</tool_call>.",
        list.join("\n")
    )
}

/// The templates Realm has for files that carry none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Builtin {
    /// `<|im_start|>role\ncontent<|im_end|>` turns.
    ChatMl,
    /// Gemma's `<start_of_turn>user` / `model` turns, the system message folded into the
    /// first user turn.
    Gemma,
}

impl Builtin {
    pub fn source(self) -> &'static str {
        match self {
            Builtin::ChatMl => CHATML,
            Builtin::Gemma => GEMMA,
        }
    }

    /// The name `ChatTemplate::origin` reports.
    pub fn name(self) -> &'static str {
        match self {
            Builtin::ChatMl => "chatml",
            Builtin::Gemma => "gemma",
        }
    }
}

/// A compiled chat template.
#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    /// Where the template came from: `"gguf"`, or the built-in one's name.
    pub origin: &'static str,
    /// Whether the template renders tool definitions itself (it reads `tools`).
    pub renders_tools: bool,
    bos: String,
    eos: String,
    /// The time `strftime_now` formats (Unix seconds, UTC); 0 means the clock's.
    now: std::sync::Arc<std::sync::atomic::AtomicI64>,
}

fn template_error(e: Error) -> TokenizerError {
    TokenizerError::Template(e.to_string())
}

impl ChatTemplate {
    /// The file's template, else `fallback` (the model's architecture knows which).
    pub fn from_metadata(md: &Metadata, vocab: &crate::Vocab, fallback: Builtin) -> Result<Self> {
        let (source, origin) = match md.opt_str("tokenizer.chat_template")? {
            Some(t) => (t.to_string(), "gguf"),
            None => (fallback.source().to_string(), fallback.name()),
        };
        let text = |id: Option<u32>| {
            id.and_then(|i| vocab.text(i).ok())
                .unwrap_or("")
                .to_string()
        };
        Self::new(source, origin, text(vocab.bos), text(vocab.eos))
    }

    /// Compile `source`; errors name the template's syntax problem.
    pub fn new(source: String, origin: &'static str, bos: String, eos: String) -> Result<Self> {
        if source.len() > MAX_TEMPLATE_LEN {
            return Err(TokenizerError::Template(format!(
                "{} bytes, more than the limit of {MAX_TEMPLATE_LEN}",
                source.len()
            )));
        }
        let mut env = Environment::new();
        env.set_fuel(Some(TEMPLATE_FUEL));
        // As Hugging Face's `apply_chat_template` sets up jinja2 (the templates are written
        // for it): a newline after a block tag is dropped, and whitespace before one on its
        // line.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        let now = std::sync::Arc::new(std::sync::atomic::AtomicI64::new(0));
        let clock = now.clone();
        env.add_function("strftime_now", move |format: String| -> String {
            let fixed = clock.load(std::sync::atomic::Ordering::Relaxed);
            let t = if fixed != 0 {
                fixed
            } else {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs() as i64)
            };
            strftime_utc(t, &format)
        });
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        // jinja2's `iterable`: none and undefined are not (minijinja lets a loop run over
        // them, and templates test `tools is iterable and tools | length > 0`).
        env.add_test("iterable", |v: minijinja::Value| {
            !v.is_none() && !v.is_undefined() && v.try_iter().is_ok()
        });
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, Error> {
                Err(Error::new(ErrorKind::InvalidOperation, msg))
            },
        );
        let renders_tools = source.contains("tools");
        let source = if source.contains("generation") {
            without_generation_tags(&source)
        } else {
            source
        };
        env.add_template_owned("chat", source)
            .map_err(template_error)?;
        Ok(Self {
            env,
            origin,
            renders_tools,
            bos,
            eos,
            now,
        })
    }

    /// `strftime_now` formats this time (Unix seconds, UTC) instead of the clock's: for
    /// reproducible renders.
    pub fn at_time(self, unix: i64) -> Self {
        self.now.store(unix, std::sync::atomic::Ordering::Relaxed);
        self
    }

    /// Render `messages`; with `add_generation_prompt` the text ends where the assistant's
    /// reply begins.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let values: Vec<serde_json::Value> = messages
            .iter()
            .map(|m| serde_json::json!({"role": m.role, "content": m.content}))
            .collect();
        self.render_values(&values, None, add_generation_prompt)
    }

    /// The template over messages (and tools) as JSON values.
    fn render_values(
        &self,
        messages: &[serde_json::Value],
        tools: Option<&serde_json::Value>,
        add_generation_prompt: bool,
    ) -> Result<String> {
        let tmpl = self.env.get_template("chat").map_err(template_error)?;
        let out = tmpl
            .render(context! {
                messages => minijinja::Value::from_serialize(messages),
                tools => tools.map(minijinja::Value::from_serialize),
                add_generation_prompt => add_generation_prompt,
                bos_token => &self.bos,
                eos_token => &self.eos,
            })
            .map_err(template_error)?;
        if out.len() > MAX_RENDERED_LEN {
            return Err(TokenizerError::Template(format!(
                "rendered prompt is {} bytes, over {MAX_RENDERED_LEN}",
                out.len()
            )));
        }
        Ok(out)
    }

    /// Render an OpenAI-style chat: `messages` as JSON objects (every field reaches the
    /// template: `tool_calls`, `tool_call_id`, `name`, …) and the `tools` definitions, if
    /// any. Templates that do not render tools get them as a system message describing
    /// them and the `<tool_call>` answer format. Contents are guarded as in
    /// [`ChatTemplate::render_guarded`].
    pub fn render_chat(
        &self,
        messages: &[serde_json::Value],
        tools: Option<&serde_json::Value>,
        add_generation_prompt: bool,
    ) -> Result<Rendered> {
        let tools = tools.filter(|t| t.as_array().is_some_and(|a| !a.is_empty()));
        let mut messages = messages.to_vec();
        if let (Some(t), false) = (tools, self.renders_tools) {
            let text = tool_system_prompt(t);
            match messages.first_mut() {
                Some(first) if first.get("role").and_then(|r| r.as_str()) == Some("system") => {
                    let own = first.get("content").and_then(|c| c.as_str()).unwrap_or("");
                    first["content"] = format!("{own}\n\n{text}").into();
                }
                _ => messages.insert(0, serde_json::json!({"role": "system", "content": text})),
            }
        }
        if !self.renders_tools {
            // A template that knows nothing of tools sees earlier calls as the text the
            // model was told to write, and never a null content.
            for m in &mut messages {
                let calls = m
                    .as_object_mut()
                    .and_then(|o| o.remove("tool_calls"))
                    .and_then(|c| c.as_array().cloned())
                    .unwrap_or_default();
                let mut text = m
                    .get("content")
                    .and_then(|c| c.as_str())
                    .unwrap_or("")
                    .to_string();
                for c in calls {
                    let f = c.get("function").unwrap_or(&c);
                    let call = serde_json::json!({
                        "name": f.get("name").cloned().unwrap_or_default(),
                        "arguments": f.get("arguments").cloned().unwrap_or_default(),
                    });
                    text.push_str(&format!("<tool_call>{call}</tool_call>"));
                }
                m["content"] = text.into();
            }
        }
        let tools = tools.filter(|_| self.renders_tools);
        let contents: Vec<Message> = messages
            .iter()
            .map(|m| {
                Message::new(
                    m.get("role").and_then(|r| r.as_str()).unwrap_or(""),
                    m.get("content").and_then(|c| c.as_str()).unwrap_or(""),
                )
            })
            .collect();
        let render =
            |msgs: &[serde_json::Value]| self.render_values(msgs, tools, add_generation_prompt);
        let real = render(&messages)?;
        if !contents.iter().any(|m| m.content.contains(MARK)) {
            let marked: Vec<serde_json::Value> = messages
                .iter()
                .enumerate()
                .map(|(i, m)| {
                    let mut m = m.clone();
                    if m.get("content").is_some_and(|c| c.is_string()) {
                        m["content"] = format!("{MARK}{i}{MARK}").into();
                    }
                    m
                })
                .collect();
            if let Ok(marked) = render(&marked) {
                for f in [(|c: &str| c) as fn(&str) -> &str, str::trim] {
                    if let Some((text, content, seen)) = substitute(&marked, &contents, f)
                        && text == real
                        && seen
                            .iter()
                            .zip(&contents)
                            .all(|(&s, m)| s || m.content.is_empty())
                    {
                        return Ok(Rendered {
                            text,
                            content,
                            unplaced: Vec::new(),
                        });
                    }
                }
            }
        }
        Ok(locate(real, &contents))
    }

    /// Render `messages` as [`ChatTemplate::render`] does, and find where each message's
    /// content went: the template renders once more with markers for the contents, which
    /// are then put back (as given, or trimmed for templates that `trim` them). Where that
    /// does not give the real rendering, the real text is kept and each content is looked
    /// for in it, in order; those not found are listed in `unplaced`.
    pub fn render_guarded(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<Rendered> {
        let values: Vec<serde_json::Value> = messages
            .iter()
            .map(|m| serde_json::json!({"role": m.role, "content": m.content}))
            .collect();
        self.render_chat(&values, None, add_generation_prompt)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(src: &str) -> Result<ChatTemplate> {
        ChatTemplate::new(src.into(), "gguf", "<s>".into(), "</s>".into())
    }

    #[test]
    fn chatml_fallback_renders() {
        let c = t(CHATML).expect("compiles");
        let out = c
            .render(&[Message::new("user", "Hi")], true)
            .expect("renders");
        assert_eq!(
            out,
            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn gemma_fallback_folds_the_system_message() {
        let c = t(GEMMA).expect("compiles");
        let out = c
            .render(
                &[
                    Message::new("system", "Be brief."),
                    Message::new("user", " Hi "),
                    Message::new("assistant", "Hello"),
                ],
                true,
            )
            .expect("renders");
        assert_eq!(
            out,
            "<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello<end_of_turn>\n<start_of_turn>model\n"
        );
    }

    #[test]
    fn hostile_templates_fail_cleanly() {
        assert!(t("{% for").is_err());
        assert!(t(&"x".repeat(MAX_TEMPLATE_LEN + 1)).is_err());
        let looping =
            t("{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}")
                .expect("compiles");
        let e = looping.render(&[], false).expect_err("out of fuel");
        assert!(e.to_string().contains("fuel"), "{e}");
        let raising = t("{{ raise_exception('no system role') }}").expect("compiles");
        assert!(
            raising
                .render(&[], false)
                .expect_err("raises")
                .to_string()
                .contains("no system role")
        );
        let recursive =
            t("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}").expect("compiles");
        assert!(recursive.render(&[], false).is_err());
    }

    #[test]
    fn python_string_methods_work() {
        let c = t("{{ messages[0].content.strip() }}|{{ messages[0].role.upper() }}")
            .expect("compiles");
        assert_eq!(
            c.render(&[Message::new("user", "  x ")], false)
                .expect("renders"),
            "x|USER"
        );
    }

    /// A template that changes contents beyond trimming: the text is the real rendering,
    /// and the content it could not find is reported, not guessed.
    #[test]
    fn contents_a_template_transforms_are_reported_unplaced() {
        let c = t("{% for m in messages %}[{{ m.role }}]{{ m.content | upper }}{% endfor %}")
            .expect("compiles");
        let msgs = [
            Message::new("system", "ABC"),
            Message::new("user", "hi <x>"),
        ];
        let r = c.render_guarded(&msgs, false).expect("renders");
        assert_eq!(r.text, "[system]ABC[user]HI <X>");
        assert_eq!(r.content.as_slice(), std::slice::from_ref(&(8..11)));
        assert_eq!(r.unplaced, vec![1]);
        // Trimming templates are followed exactly.
        let c = t("{% for m in messages %}<{{ m.content | trim }}>{% endfor %}").expect("compiles");
        let r = c
            .render_guarded(&[Message::new("user", "  a b ")], false)
            .expect("renders");
        assert_eq!(r.text, "<a b>");
        assert_eq!(r.content.as_slice(), std::slice::from_ref(&(1..4)));
    }

    /// OpenAI-style chats: a template that renders tools gets the definitions and the
    /// earlier calls as objects (Hermes/Qwen style); one that does not gets them described
    /// in the system message and the calls as `<tool_call>` text. Contents stay guarded.
    #[test]
    fn chats_with_tools_reach_the_template() {
        let tools = serde_json::json!([{"type": "function", "function": {"name": "f",
            "parameters": {"type": "object"}}}]);
        let chat = [
            serde_json::json!({"role": "user", "content": "call f <ctl>"}),
            serde_json::json!({"role": "assistant", "content": null, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": {"x": 1}}}]}),
            serde_json::json!({"role": "tool", "tool_call_id": "c1", "content": "42"}),
        ];
        let hermes = t("{% if tools %}<tools>{% for t in tools %}{{ t.function.name }}{% endfor %}</tools>{% endif %}\
            {% for m in messages %}[{{ m.role }}]{% if m.tool_calls %}{% for c in m.tool_calls %}\
            <tool_call>{{ c.function.name }}{{ c.function.arguments | tojson }}</tool_call>{% endfor %}\
            {% else %}{{ m.content }}{% endif %}{% endfor %}")
        .expect("compiles");
        assert!(hermes.renders_tools);
        let r = hermes
            .render_chat(&chat, Some(&tools), false)
            .expect("renders");
        assert_eq!(
            r.text,
            "<tools>f</tools>[user]call f <ctl>[assistant]<tool_call>f{\"x\":1}</tool_call>[tool]42"
        );
        assert_eq!(&r.text[r.content[0].clone()], "call f <ctl>");
        let plain = t(CHATML).expect("compiles");
        assert!(!plain.renders_tools);
        let r = plain
            .render_chat(&chat, Some(&tools), true)
            .expect("renders");
        assert!(
            r.text
                .starts_with("<|im_start|>system\nYou can call these tools:\n{"),
            "{}",
            r.text
        );
        assert!(
            r.text.contains("<|im_start|>assistant\n<tool_call>{\"arguments\":{\"x\":1},\"name\":\"f\"}</tool_call><|im_end|>"),
            "{}",
            r.text
        );
        assert!(
            r.text.contains("<|im_start|>tool\n42<|im_end|>"),
            "{}",
            r.text
        );
        assert!(r.unplaced.is_empty());
    }
}

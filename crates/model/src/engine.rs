//! Models, sessions and generations: the state behind the exported `realm:inference`
//! resources. Prompt → tokens → prefill → sample/decode loop with streaming-safe text.

use std::cell::RefCell;
use std::rc::Rc;
use std::time::Instant;

use realm_gguf::GgufFile;
use realm_tokenizer::{ChatTemplate, Message as ChatMessage, Tokenizer, Utf8Stream};

use realm_compute::Compute;

use crate::arch::{self, Architecture, Output, Scratch};
use crate::sample::{Sampler, SamplerParams};
use crate::{
    Chunk, Embedding, Error, FinishReason, Message, ModelInfo, Params, Prompt, StepLogprobs,
    TokenLogprob, Usage,
};

/// Context positions of a session when the caller asks for the default (0).
pub const DEFAULT_CTX: u32 = 4096;

struct ModelState<C: Compute> {
    name: String,
    compute: C,
    arch: Box<dyn Architecture<C>>,
    tokenizer: Tokenizer,
    template: ChatTemplate,
    weight_bytes: u64,
    architecture: String,
    /// The vocabulary as text for constrained generation, built on first use.
    grammar_vocab: std::cell::OnceCell<realm_grammar::Vocabulary>,
    // Kept open: the weights may be views of it.
    _file: C::File,
}

impl<C: Compute> ModelState<C> {
    /// Each token's text for the grammar matcher; control, unused and end-of-generation
    /// tokens (handled apart) have none.
    fn grammar_vocab(&self) -> &realm_grammar::Vocabulary {
        self.grammar_vocab.get_or_init(|| {
            let v = self.tokenizer.vocab();
            realm_grammar::Vocabulary::new((0..v.len() as u32).map(|id| {
                let plain = matches!(
                    v.token_type(id),
                    realm_tokenizer::TokenType::Normal
                        | realm_tokenizer::TokenType::UserDefined
                        | realm_tokenizer::TokenType::Byte
                );
                if !plain || v.is_eog(id) {
                    return None;
                }
                let mut bytes = Vec::new();
                self.tokenizer.token_bytes(id, false, &mut bytes).ok()?;
                Some(bytes)
            }))
        })
    }
}

/// A loaded model (cheap to clone: its sessions share it).
pub struct LoadedModel<C: Compute>(Rc<ModelState<C>>);

impl<C: Compute> Clone for LoadedModel<C> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

fn invalid(e: impl std::fmt::Display) -> Error {
    Error::InvalidModel(e.to_string())
}

impl<C: Compute> LoadedModel<C> {
    /// Reads the model in `file` (named `name`) and creates its weights on `compute`.
    pub fn load(name: &str, compute: C, file: C::File) -> Result<Self, Error> {
        let gguf = GgufFile::read(&file).map_err(invalid)?;
        let tokenizer = Tokenizer::from_metadata(&gguf.metadata).map_err(|e| match e {
            realm_tokenizer::TokenizerError::UnknownModel(_)
            | realm_tokenizer::TokenizerError::UnknownPretokenizer { .. } => {
                Error::Unsupported(e.to_string())
            }
            other => invalid(other),
        })?;
        let architecture = gguf.architecture().map_err(invalid)?.to_string();
        let template = ChatTemplate::from_metadata(
            &gguf.metadata,
            tokenizer.vocab(),
            arch::default_template(&architecture),
        )
        .map_err(invalid)?;
        let arch = arch::load(&compute, &file, &gguf)?;
        let weight_bytes = gguf.tensors.iter().map(|t| t.n_bytes).sum();
        Ok(Self(Rc::new(ModelState {
            name: name.into(),
            compute,
            arch,
            tokenizer,
            template,
            weight_bytes,
            architecture,
            grammar_vocab: std::cell::OnceCell::new(),
            _file: file,
        })))
    }

    pub fn info(&self) -> ModelInfo {
        let m = &self.0;
        let hp = m.arch.hparams();
        ModelInfo {
            name: m.name.clone(),
            architecture: m.architecture.clone(),
            n_vocab: m.tokenizer.vocab().len() as u32,
            n_ctx_train: hp.n_ctx_train,
            n_layer: hp.n_layer,
            n_embd: hp.n_embd,
            n_head: hp.n_head,
            n_head_kv: hp.n_head_kv,
            tokenizer: m.tokenizer.kind_name().into(),
            chat_template: m.template.origin.into(),
            weight_bytes: m.weight_bytes,
        }
    }

    pub fn tokenize(&self, text: &str, add_special: bool) -> Result<Vec<u32>, Error> {
        self.0
            .tokenizer
            .encode(text, add_special, true)
            .map_err(|e| Error::InvalidInput(e.to_string()))
    }

    pub fn detokenize(&self, ids: &[u32]) -> Result<String, Error> {
        self.0
            .tokenizer
            .decode(ids, false)
            .map_err(|e| Error::InvalidInput(e.to_string()))
    }

    pub fn apply_template(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String, Error> {
        let msgs: Vec<ChatMessage> = messages
            .iter()
            .map(|m| ChatMessage::new(&m.role, &m.content))
            .collect();
        self.0
            .template
            .render(&msgs, add_generation_prompt)
            .map_err(|e| Error::InvalidInput(e.to_string()))
    }

    /// The chat prompt for `messages` (with the generation prompt) and where their
    /// contents are in it, so that control tokens are matched only in the template's own
    /// text. A content the template transformed beyond recognition may not carry any.
    pub fn render_guarded(&self, messages: &[Message]) -> Result<realm_tokenizer::Rendered, Error> {
        let msgs: Vec<ChatMessage> = messages
            .iter()
            .map(|m| ChatMessage::new(&m.role, &m.content))
            .collect();
        let r = self
            .0
            .template
            .render_guarded(&msgs, true)
            .map_err(|e| Error::InvalidInput(e.to_string()))?;
        self.refuse_unplaced_control(&r, |i| &messages[i].content)?;
        Ok(r)
    }

    /// A content the template transformed beyond recognition (not placed in the text)
    /// may not carry control tokens: they could not be kept as plain text.
    fn refuse_unplaced_control<'a>(
        &self,
        r: &realm_tokenizer::Rendered,
        content: impl Fn(usize) -> &'a str,
    ) -> Result<(), Error> {
        for &i in &r.unplaced {
            if let Some(t) = self.0.tokenizer.control_token_in(content(i)) {
                return Err(Error::InvalidInput(format!(
                    "message {i} contains the control token {t:?}, which this model's chat \
                     template does not let Realm keep as plain text"
                )));
            }
        }
        Ok(())
    }

    /// An OpenAI-style chat (JSON text: `messages`, optional `tools`) rendered with the
    /// generation prompt, contents guarded as in [`LoadedModel::render_guarded`].
    pub fn render_chat_json(&self, json: &str) -> Result<realm_tokenizer::Rendered, Error> {
        let bad = |m: &str| Error::InvalidInput(format!("chat-json: {m}"));
        let v: serde_json::Value =
            serde_json::from_str(json).map_err(|e| bad(&format!("not valid JSON: {e}")))?;
        let messages = v
            .get("messages")
            .and_then(|m| m.as_array())
            .filter(|m| !m.is_empty())
            .ok_or_else(|| bad("`messages` must be a non-empty list"))?;
        for m in messages {
            if !m.get("role").is_some_and(|r| r.is_string()) {
                return Err(bad("every message needs a string `role`"));
            }
            if m.get("content")
                .is_some_and(|c| !c.is_string() && !c.is_null())
            {
                return Err(bad("a message's `content` must be a string or null"));
            }
        }
        let r = self
            .0
            .template
            .render_chat(messages, v.get("tools"), true)
            .map_err(|e| Error::InvalidInput(e.to_string()))?;
        self.refuse_unplaced_control(&r, |i| {
            messages[i]
                .get("content")
                .and_then(|c| c.as_str())
                .unwrap_or("")
        })?;
        Ok(r)
    }

    /// `text` (with the model's BOS, as for generation) through the model in a scratch
    /// cache of its own: the mean of the final hidden states, unit length.
    pub fn embed(&self, text: &str) -> Result<Embedding, Error> {
        let ids = self.tokenize(text, true)?;
        if ids.is_empty() {
            return Err(Error::InvalidInput("the input is empty".into()));
        }
        let hp = self.0.arch.hparams();
        let limit = DEFAULT_CTX.min(hp.n_ctx_train);
        if ids.len() > limit as usize {
            return Err(Error::ContextOverflow(format!(
                "the input is {} tokens; at most {limit} can be embedded",
                ids.len()
            )));
        }
        let c = &self.0.compute;
        let cache = c.cache(hp.n_layer, ids.len() as u32, hp.n_head_kv, hp.head_dim);
        let scratch = self.0.arch.scratch(c, ids.len() as u32);
        let values = self
            .0
            .arch
            .forward(c, &scratch, &cache, &ids, 0, Output::MeanPooled)?;
        Ok(Embedding {
            values,
            tokens: ids.len() as u32,
        })
    }

    pub fn session(&self, n_ctx: u32) -> Result<SessionHandle<C>, Error> {
        let hp = self.0.arch.hparams();
        let n_ctx = if n_ctx == 0 {
            DEFAULT_CTX.min(hp.n_ctx_train)
        } else {
            n_ctx
        };
        if n_ctx > hp.n_ctx_train {
            return Err(Error::InvalidInput(format!(
                "context {n_ctx} is larger than the model's trained {}",
                hp.n_ctx_train
            )));
        }
        let c = &self.0.compute;
        let cache = c.cache(hp.n_layer, n_ctx, hp.n_head_kv, hp.head_dim);
        let scratch = self.0.arch.scratch(c, n_ctx);
        Ok(SessionHandle(Rc::new(RefCell::new(SessionState {
            model: self.0.clone(),
            cache,
            scratch,
            n_ctx,
            tokens: Vec::new(),
        }))))
    }
}

struct SessionState<C: Compute> {
    model: Rc<ModelState<C>>,
    cache: C::Cache,
    scratch: Scratch<C>,
    n_ctx: u32,
    /// Tokens whose keys and values are in the cache, in order.
    tokens: Vec<u32>,
}

/// Prompt tokens per forward pass: llama.cpp's default micro-batch (`n_ubatch`). Besides
/// bounding the activation buffers, it keeps the attention numerics llama.cpp's, which
/// depend on how many query rows a batch has (see `AttnShape::tiled` in the kernels).
const UBATCH: usize = 512;

impl<C: Compute> SessionState<C> {
    fn forward(&mut self, ids: &[u32]) -> Result<Vec<f32>, Error> {
        let mut logits = Vec::new();
        for chunk in ids.chunks(UBATCH) {
            let pos = self.tokens.len() as u32;
            let m = &self.model;
            logits = m.arch.forward(
                &m.compute,
                &self.scratch,
                &self.cache,
                chunk,
                pos,
                Output::Logits,
            )?;
            self.tokens.extend_from_slice(chunk);
        }
        Ok(logits)
    }
}

pub struct SessionHandle<C: Compute>(Rc<RefCell<SessionState<C>>>);

impl<C: Compute> SessionHandle<C> {
    pub fn n_past(&self) -> u32 {
        self.0.borrow().tokens.len() as u32
    }

    pub fn generate(&self, prompt: Prompt, params: Params) -> Result<GenerationHandle<C>, Error> {
        self.generate_from(Input::Prompt(prompt), params)
    }

    /// `generate` from an OpenAI-style chat (JSON text: `messages`, optional `tools`).
    pub fn generate_chat(
        &self,
        chat: String,
        params: Params,
    ) -> Result<GenerationHandle<C>, Error> {
        self.generate_from(Input::ChatJson(chat), params)
    }

    fn generate_from(&self, prompt: Input, params: Params) -> Result<GenerationHandle<C>, Error> {
        let mut s = self.0.borrow_mut();
        let model = s.model.clone();
        let sampler = SamplerParams {
            temperature: params.temperature,
            top_k: params.top_k,
            top_p: params.top_p,
            min_p: params.min_p,
            repeat_penalty: params.repeat_penalty,
            repeat_last_n: params.repeat_last_n,
            seed: params.seed,
        };
        sampler.validate().map_err(Error::InvalidInput)?;
        let ids = match &prompt {
            Input::Prompt(Prompt::Text(t)) => {
                fault_hook(t);
                model.tokenizer.encode(t, true, true)
            }
            Input::Prompt(Prompt::Messages(m)) => {
                let r = LoadedModel(model.clone()).render_guarded(m)?;
                fault_hook(&r.text);
                model.tokenizer.encode_guarded(&r.text, true, &r.content)
            }
            Input::ChatJson(j) => {
                let r = LoadedModel(model.clone()).render_chat_json(j)?;
                fault_hook(&r.text);
                model.tokenizer.encode_guarded(&r.text, true, &r.content)
            }
        }
        .map_err(|e| Error::InvalidInput(e.to_string()))?;
        if ids.is_empty() {
            return Err(Error::InvalidInput("the prompt is empty".into()));
        }
        if ids.len() as u64 >= u64::from(s.n_ctx) {
            return Err(Error::ContextOverflow(format!(
                "the prompt is {} tokens but the context holds {} (one more is needed to generate)",
                ids.len(),
                s.n_ctx
            )));
        }

        // Reuse the cached prefix; at least the last prompt token is always recomputed.
        let common = s
            .tokens
            .iter()
            .zip(&ids)
            .take_while(|(a, b)| a == b)
            .count()
            .min(ids.len() - 1);
        s.tokens.truncate(common);
        let started = Instant::now();
        let logits = s.forward(&ids[common..])?;
        let prefill_ns = started.elapsed().as_nanos() as u64;
        drop(s);

        Ok(GenerationHandle(RefCell::new(GenerationState {
            session: self.0.clone(),
            model,
            sampler: Sampler::new(sampler),
            logits: Some(logits),
            pending: None,
            history: ids.clone(),
            generated: Vec::new(),
            margins: Vec::new(),
            grammar: None,
            want_logprobs: None,
            logprobs: Vec::new(),
            max_tokens: params.max_tokens,
            ignore_eog: params.ignore_eog,
            stop: params.stop.into_iter().filter(|s| !s.is_empty()).collect(),
            utf8: Utf8Stream::new(),
            text: String::new(),
            emitted: 0,
            finish: None,
            usage: Usage {
                prompt_tokens: ids.len() as u32,
                cached_tokens: common as u32,
                generated_tokens: 0,
                prefill_ns,
                decode_ns: 0,
                constraint_ns: 0,
            },
        })))
    }
}

/// What a generation starts from.
enum Input {
    Prompt(Prompt),
    /// An OpenAI-style chat as JSON text.
    ChatJson(String),
}

struct GenerationState<C: Compute> {
    session: Rc<RefCell<SessionState<C>>>,
    model: Rc<ModelState<C>>,
    sampler: Sampler,
    /// Logits to sample the next token from.
    logits: Option<Vec<f32>>,
    /// A sampled token not yet run through the model.
    pending: Option<u32>,
    history: Vec<u32>,
    generated: Vec<u32>,
    margins: Vec<f32>,
    /// What the output must match, and how far it has got (see `constrain`).
    grammar: Option<realm_grammar::Matcher>,
    /// Alternatives per step to record (`None`: log-probabilities off).
    want_logprobs: Option<u32>,
    logprobs: Vec<StepLogprobs>,
    max_tokens: u32,
    ignore_eog: bool,
    stop: Vec<String>,
    utf8: Utf8Stream,
    /// All text generated so far, and how much of it has been handed out.
    text: String,
    emitted: usize,
    finish: Option<FinishReason>,
    usage: Usage,
}

pub struct GenerationHandle<C: Compute>(RefCell<GenerationState<C>>);

impl<C: Compute> GenerationHandle<C> {
    pub fn next(&self) -> Result<Option<Chunk>, Error> {
        let mut g = self.0.borrow_mut();
        if g.finish.is_some() {
            return Ok(None);
        }
        if let Some(tok) = g.pending.take() {
            let started = Instant::now();
            let logits = g.session.borrow_mut().forward(&[tok])?;
            g.usage.decode_ns += started.elapsed().as_nanos() as u64;
            g.logits = Some(logits);
        }
        let Some(mut logits) = g.logits.take() else {
            return Ok(None);
        };
        let g = &mut *g;
        g.margins.push(crate::sample::top2_gap(&logits));
        // The model's distribution, before the sampler changes the logits.
        let dist = g.want_logprobs.map(|k| (LogSoftmax::new(&logits), k));
        let top = dist
            .as_ref()
            .map(|(d, k)| d.top(&logits, *k as usize))
            .unwrap_or_default();
        let chosen_logit = dist.as_ref().map(|_| logits.clone());
        let tok = match g.grammar.is_some() {
            false => g.sampler.sample(&mut logits, &g.history),
            true => {
                let started = Instant::now();
                let tok = g.constrained_sample(&mut logits)?;
                g.usage.constraint_ns += started.elapsed().as_nanos() as u64;
                tok
            }
        };
        if let (Some((d, _)), Some(raw)) = (&dist, &chosen_logit) {
            let entry = |t: u32, lp: f32| -> Result<TokenLogprob, Error> {
                let mut bytes = Vec::new();
                g.model
                    .tokenizer
                    .token_bytes(t, false, &mut bytes)
                    .map_err(|e| Error::Compute(e.to_string()))?;
                Ok(TokenLogprob {
                    token: t,
                    bytes,
                    logprob: lp,
                })
            };
            let chosen = entry(tok, d.of(raw[tok as usize]))?;
            let top = top
                .into_iter()
                .map(|(t, lp)| entry(t, lp))
                .collect::<Result<Vec<_>, _>>()?;
            g.logprobs.push(StepLogprobs { chosen, top });
        }
        g.generated.push(tok);
        g.history.push(tok);
        g.usage.generated_tokens += 1;
        if !g.ignore_eog && g.model.tokenizer.vocab().is_eog(tok) {
            g.finish = Some(FinishReason::Eog);
            return Ok(None);
        }

        let mut bytes = Vec::new();
        g.model
            .tokenizer
            .token_bytes(tok, false, &mut bytes)
            .map_err(|e| Error::Compute(e.to_string()))?;
        if let Some(m) = &mut g.grammar {
            let text = std::str::from_utf8(&bytes)
                .map_err(|_| Error::Compute("a constrained token is not UTF-8 text".into()))?;
            m.accept(text)
                .map_err(|e| Error::Compute(format!("constrained sampling: {e}")))?;
        }
        let piece = g.utf8.push(&bytes);
        g.text.push_str(&piece);

        // Stop strings: cut there; otherwise hold back a tail that could start one.
        let mut end = g.text.len();
        if let Some(at) = g
            .stop
            .iter()
            .filter_map(|s| g.text[g.emitted..].find(s.as_str()).map(|i| g.emitted + i))
            .min()
        {
            end = at;
            g.finish = Some(FinishReason::Stop);
        } else {
            let hold = g
                .stop
                .iter()
                .flat_map(|s| {
                    (1..s.len()).filter(|&n| s.is_char_boundary(n) && g.text.ends_with(&s[..n]))
                })
                .max()
                .unwrap_or(0);
            end -= hold;
        }
        // A complete match that nothing may extend: the answer is done.
        if g.finish.is_none() && g.grammar.as_ref().is_some_and(|m| m.is_finished()) {
            g.finish = Some(FinishReason::Stop);
            end = g.text.len();
        }
        let n_past = g.session.borrow().tokens.len() as u32;
        let n_ctx = g.session.borrow().n_ctx;
        if g.finish.is_none() && (g.generated.len() as u32 >= g.max_tokens || n_past + 1 >= n_ctx) {
            g.finish = Some(FinishReason::Length);
            end = g.text.len();
        }
        if g.finish.is_none() {
            g.pending = Some(tok);
        }
        let text = g.text[g.emitted..end].to_string();
        g.emitted = end;
        Ok(Some(Chunk { text, token: tok }))
    }

    pub fn finish_reason(&self) -> Option<FinishReason> {
        self.0.borrow().finish
    }

    pub fn usage(&self) -> Usage {
        self.0.borrow().usage
    }

    pub fn tokens(&self) -> Vec<u32> {
        self.0.borrow().generated.clone()
    }

    pub fn margins(&self) -> Vec<f32> {
        self.0.borrow().margins.clone()
    }

    pub fn constrain(&self, c: realm_grammar::Constraint) -> Result<(), Error> {
        let grammar = c
            .compile()
            .map_err(|e| Error::InvalidInput(e.to_string()))?;
        let m = realm_grammar::Matcher::new(std::sync::Arc::new(grammar))
            .map_err(|e| Error::InvalidInput(e.to_string()))?;
        let mut g = self.0.borrow_mut();
        // Build the vocabulary's text now, so that the first token does not pay for it.
        let _ = g.model.grammar_vocab();
        g.grammar = Some(m);
        Ok(())
    }

    pub fn want_logprobs(&self, top: u32) {
        self.0.borrow_mut().want_logprobs = Some(top.min(MAX_TOP_LOGPROBS));
    }

    pub fn take_logprobs(&self) -> Vec<StepLogprobs> {
        std::mem::take(&mut self.0.borrow_mut().logprobs)
    }
}

impl<C: Compute> GenerationState<C> {
    /// Whether the grammar allows `tok` next (end-of-generation: when the match is
    /// complete).
    fn grammar_allows(&self, tok: u32) -> bool {
        let Some(m) = &self.grammar else { return true };
        let tz = &self.model.tokenizer;
        if tz.vocab().is_eog(tok) {
            return m.is_accepting();
        }
        if m.is_finished() {
            return false;
        }
        let mut bytes = Vec::new();
        if tz.token_bytes(tok, false, &mut bytes).is_err() {
            return false;
        }
        match std::str::from_utf8(&bytes) {
            Ok(t) => !t.is_empty() && m.allows(t),
            Err(_) => false,
        }
    }

    /// The sampler's choice if the grammar allows it (the common case, one check); else
    /// the choice among the allowed tokens only (the whole vocabulary walked once). Both
    /// draw from the same distribution: the model's, renormalised over what is allowed.
    fn constrained_sample(&mut self, logits: &mut [f32]) -> Result<u32, Error> {
        let mut first = logits.to_vec();
        let tok = self.sampler.sample(&mut first, &self.history);
        if self.grammar_allows(tok) {
            return Ok(tok);
        }
        let Some(m) = &self.grammar else {
            return Ok(tok);
        };
        let vocab = self.model.grammar_vocab();
        let mut allowed = vec![false; logits.len()];
        if !m.is_finished() {
            m.allowed(vocab, &mut allowed[..vocab.len().min(logits.len())])
                .map_err(|e| Error::InvalidInput(e.to_string()))?;
        }
        if m.is_accepting() {
            for id in self.model.tokenizer.vocab().eog_ids() {
                if let Some(a) = allowed.get_mut(id as usize) {
                    *a = true;
                }
            }
        }
        if !allowed.iter().any(|&a| a) {
            return Err(Error::InvalidInput(
                "the constraint allows no token of this model's vocabulary here".into(),
            ));
        }
        for (l, &a) in logits.iter_mut().zip(&allowed) {
            if !a {
                *l = f32::NEG_INFINITY;
            }
        }
        Ok(self.sampler.sample(logits, &self.history))
    }
}

/// Most alternatives a step reports (OpenAI's limit).
const MAX_TOP_LOGPROBS: u32 = 20;

/// `log_softmax` of one step's logits: `logit - max - ln Σ exp(logit - max)`, the sum in
/// f64.
struct LogSoftmax {
    max: f32,
    log_sum: f64,
}

impl LogSoftmax {
    fn new(logits: &[f32]) -> Self {
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let sum: f64 = logits.iter().map(|&l| f64::from(l - max).exp()).sum();
        Self {
            max,
            log_sum: sum.ln(),
        }
    }

    fn of(&self, logit: f32) -> f32 {
        (f64::from(logit - self.max) - self.log_sum) as f32
    }

    /// The `k` most likely ids and their log-probabilities, best first (ties: lower id).
    fn top(&self, logits: &[f32], k: usize) -> Vec<(u32, f32)> {
        let mut best: Vec<(u32, f32)> = Vec::with_capacity(k + 1);
        if k == 0 {
            return best;
        }
        for (i, &l) in logits.iter().enumerate() {
            if best.len() == k && best.last().is_some_and(|&(_, b)| l <= b) {
                continue;
            }
            let at = best.partition_point(|&(_, b)| b >= l);
            best.insert(at, (i as u32, l));
            best.truncate(k);
        }
        best.into_iter().map(|(i, l)| (i, self.of(l))).collect()
    }
}

/// Test hook for the host's tenant limits, inert unless the host sets `REALM_TEST_FAULTS=1`
/// in this guest's environment (`realm serve --test-faults`, tests only): a prompt
/// containing `REALM_FAULT:loop` spins forever (the deadline must stop it), one containing
/// `REALM_FAULT:alloc` allocates without bound (the memory cap must stop it).
fn fault_hook(prompt: &str) {
    if std::env::var("REALM_TEST_FAULTS").as_deref() != Ok("1") {
        return;
    }
    if prompt.contains("REALM_FAULT:loop") {
        let mut n = 0u64;
        loop {
            n = std::hint::black_box(n.wrapping_add(1));
        }
    }
    if prompt.contains("REALM_FAULT:alloc") {
        let mut hoard: Vec<Vec<u8>> = Vec::new();
        loop {
            hoard.push(vec![1u8; 1 << 20]);
            std::hint::black_box(&hoard);
        }
    }
}

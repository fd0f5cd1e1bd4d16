//! The Realm guest component: WIT glue only. The model logic is `realm-model`, run over
//! the imported `realm:compute` provider (`compute.rs`); this file converts the exported
//! `realm:inference` types to and from its Rust ones.

wit_bindgen::generate!({
    path: ["../../wit/compute", "../../wit/inference"],
    world: "realm:inference/guest",
    generate_all,
});

mod compute;

use exports::realm::inference::runtime::{
    Generation, Guest, GuestGeneration, GuestModel, GuestSession, Model, Session,
};
use exports::realm::inference::types::{
    Chunk, Constraint, Embedding, Error, FinishReason, Message, ModelInfo, Params, Prompt,
    StepLogprobs, TokenLogprob, Usage,
};
use realm_model as m;

use compute::{HostFile, Imported};

struct Component;

/// The exported resources: `realm-model`'s handles over the imported compute.
pub struct LoadedModel(m::LoadedModel<Imported>);
pub struct SessionHandle(m::SessionHandle<Imported>);
pub struct GenerationHandle(m::GenerationHandle<Imported>);

impl Guest for Component {
    type Model = LoadedModel;
    type Session = SessionHandle;
    type Generation = GenerationHandle;
}

fn error(e: m::Error) -> Error {
    match e {
        m::Error::NotFound(s) => Error::NotFound(s),
        m::Error::InvalidModel(s) => Error::InvalidModel(s),
        m::Error::Unsupported(s) => Error::Unsupported(s),
        m::Error::InvalidInput(s) => Error::InvalidInput(s),
        m::Error::ContextOverflow(s) => Error::ContextOverflow(s),
        m::Error::Compute(s) => Error::Compute(s),
    }
}

fn message(msg: Message) -> m::Message {
    m::Message {
        role: msg.role,
        content: msg.content,
    }
}

fn params(p: Params) -> m::Params {
    m::Params {
        max_tokens: p.max_tokens,
        temperature: p.temperature,
        top_k: p.top_k,
        top_p: p.top_p,
        min_p: p.min_p,
        repeat_penalty: p.repeat_penalty,
        repeat_last_n: p.repeat_last_n,
        seed: p.seed,
        stop: p.stop,
        ignore_eog: p.ignore_eog,
    }
}

fn token_logprob(t: m::TokenLogprob) -> TokenLogprob {
    TokenLogprob {
        token: t.token,
        bytes: t.bytes,
        logprob: t.logprob,
    }
}

impl GuestModel for LoadedModel {
    fn load(name: String) -> Result<Model, Error> {
        let file = realm::compute::store::open_model(&name)
            .map_err(|e| error(compute::error(e).into()))?;
        m::LoadedModel::load(&name, Imported, HostFile(file))
            .map(|l| Model::new(LoadedModel(l)))
            .map_err(error)
    }

    fn info(&self) -> ModelInfo {
        let i = self.0.info();
        ModelInfo {
            name: i.name,
            architecture: i.architecture,
            n_vocab: i.n_vocab,
            n_ctx_train: i.n_ctx_train,
            n_layer: i.n_layer,
            n_embd: i.n_embd,
            n_head: i.n_head,
            n_head_kv: i.n_head_kv,
            tokenizer: i.tokenizer,
            chat_template: i.chat_template,
            weight_bytes: i.weight_bytes,
        }
    }

    fn tokenize(&self, text: String, add_special: bool) -> Result<Vec<u32>, Error> {
        self.0.tokenize(&text, add_special).map_err(error)
    }

    fn detokenize(&self, ids: Vec<u32>) -> Result<String, Error> {
        self.0.detokenize(&ids).map_err(error)
    }

    fn apply_template(
        &self,
        messages: Vec<Message>,
        add_generation_prompt: bool,
    ) -> Result<String, Error> {
        let messages: Vec<m::Message> = messages.into_iter().map(message).collect();
        self.0
            .apply_template(&messages, add_generation_prompt)
            .map_err(error)
    }

    fn embed(&self, text: String) -> Result<Embedding, Error> {
        let e = self.0.embed(&text).map_err(error)?;
        Ok(Embedding {
            values: e.values,
            tokens: e.tokens,
        })
    }

    fn session(&self, n_ctx: u32) -> Result<Session, Error> {
        self.0
            .session(n_ctx)
            .map(|s| Session::new(SessionHandle(s)))
            .map_err(error)
    }
}

impl GuestSession for SessionHandle {
    fn generate(&self, prompt: Prompt, p: Params) -> Result<Generation, Error> {
        let prompt = match prompt {
            Prompt::Text(t) => m::Prompt::Text(t),
            Prompt::Messages(ms) => m::Prompt::Messages(ms.into_iter().map(message).collect()),
        };
        self.0
            .generate(prompt, params(p))
            .map(|g| Generation::new(GenerationHandle(g)))
            .map_err(error)
    }

    fn generate_chat(&self, chat: String, p: Params) -> Result<Generation, Error> {
        self.0
            .generate_chat(chat, params(p))
            .map(|g| Generation::new(GenerationHandle(g)))
            .map_err(error)
    }

    fn n_past(&self) -> u32 {
        self.0.n_past()
    }
}

impl GuestGeneration for GenerationHandle {
    fn next(&self) -> Result<Option<Chunk>, Error> {
        let c = self.0.next().map_err(error)?;
        Ok(c.map(|c| Chunk {
            text: c.text,
            token: c.token,
        }))
    }

    fn finish_reason(&self) -> Option<FinishReason> {
        self.0.finish_reason().map(|f| match f {
            m::FinishReason::Eog => FinishReason::Eog,
            m::FinishReason::Stop => FinishReason::Stop,
            m::FinishReason::Length => FinishReason::Length,
        })
    }

    fn usage(&self) -> Usage {
        let u = self.0.usage();
        Usage {
            prompt_tokens: u.prompt_tokens,
            cached_tokens: u.cached_tokens,
            generated_tokens: u.generated_tokens,
            prefill_ns: u.prefill_ns,
            decode_ns: u.decode_ns,
            constraint_ns: u.constraint_ns,
        }
    }

    fn tokens(&self) -> Vec<u32> {
        self.0.tokens()
    }

    fn margins(&self) -> Vec<f32> {
        self.0.margins()
    }

    fn want_logprobs(&self, top: u32) {
        self.0.want_logprobs(top)
    }

    fn take_logprobs(&self) -> Vec<StepLogprobs> {
        self.0
            .take_logprobs()
            .into_iter()
            .map(|s| StepLogprobs {
                chosen: token_logprob(s.chosen),
                top: s.top.into_iter().map(token_logprob).collect(),
            })
            .collect()
    }

    fn constrain(&self, c: Constraint) -> Result<(), Error> {
        let c = match c {
            Constraint::Gbnf(g) => realm_grammar::Constraint::Gbnf(g),
            Constraint::JsonSchema(s) => realm_grammar::Constraint::JsonSchema(s),
            Constraint::JsonObject => realm_grammar::Constraint::JsonObject,
        };
        self.0.constrain(c).map_err(error)
    }
}

export!(Component);

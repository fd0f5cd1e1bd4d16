//! The Realm guest component: WIT glue only. Model logic lives in `engine`, `model/` and
//! `sample`; compute is imported from the host through `realm:compute`.

wit_bindgen::generate!({
    path: ["../../wit/compute", "../../wit/inference"],
    world: "realm:inference/guest",
    generate_all,
});

mod compute;
mod engine;
mod model;
pub mod sample;

use exports::realm::inference::runtime::{
    Generation, Guest, GuestGeneration, GuestModel, GuestSession, Model, Session,
};
use exports::realm::inference::types::{
    Chunk, Constraint, Embedding, Error, FinishReason, Message, ModelInfo, Params, Prompt,
    StepLogprobs, Usage,
};

struct Component;

impl Guest for Component {
    type Model = engine::LoadedModel;
    type Session = engine::SessionHandle;
    type Generation = engine::GenerationHandle;
}

impl GuestModel for engine::LoadedModel {
    fn load(name: String) -> Result<Model, Error> {
        engine::LoadedModel::load(&name).map(Model::new)
    }

    fn info(&self) -> ModelInfo {
        self.info()
    }

    fn tokenize(&self, text: String, add_special: bool) -> Result<Vec<u32>, Error> {
        self.tokenize(&text, add_special)
    }

    fn detokenize(&self, ids: Vec<u32>) -> Result<String, Error> {
        self.detokenize(&ids)
    }

    fn apply_template(
        &self,
        messages: Vec<Message>,
        add_generation_prompt: bool,
    ) -> Result<String, Error> {
        self.apply_template(&messages, add_generation_prompt)
    }

    fn embed(&self, text: String) -> Result<Embedding, Error> {
        self.embed(&text)
    }

    fn session(&self, n_ctx: u32) -> Result<Session, Error> {
        self.session(n_ctx).map(Session::new)
    }
}

impl GuestSession for engine::SessionHandle {
    fn generate(&self, prompt: Prompt, params: Params) -> Result<Generation, Error> {
        self.generate(prompt, params).map(Generation::new)
    }

    fn generate_chat(&self, chat: String, params: Params) -> Result<Generation, Error> {
        self.generate_chat(chat, params).map(Generation::new)
    }

    fn n_past(&self) -> u32 {
        self.n_past()
    }
}

impl GuestGeneration for engine::GenerationHandle {
    fn next(&self) -> Result<Option<Chunk>, Error> {
        self.next()
    }

    fn finish_reason(&self) -> Option<FinishReason> {
        self.finish_reason()
    }

    fn usage(&self) -> Usage {
        self.usage()
    }

    fn tokens(&self) -> Vec<u32> {
        self.tokens()
    }

    fn margins(&self) -> Vec<f32> {
        self.margins()
    }

    fn want_logprobs(&self, top: u32) {
        self.want_logprobs(top)
    }

    fn take_logprobs(&self) -> Vec<StepLogprobs> {
        self.take_logprobs()
    }

    fn constrain(&self, c: Constraint) -> Result<(), Error> {
        self.constrain(c)
    }
}

export!(Component);

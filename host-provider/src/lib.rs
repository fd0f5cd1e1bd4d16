//! Realm's host provider. Today: locating models and describing GGUF files; the wasmtime
//! embedding and compute provider build on this.

pub mod inspect;

use std::path::{Path, PathBuf};

/// File name of the default model (SmolLM2-135M-Instruct, Q4_1), fetched by `make models`.
pub const DEFAULT_MODEL: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// Where the default model lives: `$REALM_MODEL`, else `models/` under the current
/// directory, else `models/` of the checkout the binary was built in.
pub fn default_model_path() -> PathBuf {
    if let Some(p) = std::env::var_os("REALM_MODEL") {
        return PathBuf::from(p);
    }
    let local = Path::new("models").join(DEFAULT_MODEL);
    if local.exists() {
        return local;
    }
    // target/{debug,release}/realm → the repository root is two levels up.
    let built = std::env::current_exe().ok().and_then(|exe| {
        exe.parent()?
            .parent()?
            .parent()
            .map(|root| root.join("models").join(DEFAULT_MODEL))
    });
    match built {
        Some(p) if p.exists() => p,
        _ => local,
    }
}

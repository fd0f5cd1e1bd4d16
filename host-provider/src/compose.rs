//! Component composition (`realm plug`), with `wac-graph`: the exports of plug components
//! fill the matching imports of a socket component, as `wac plug` does. This is how the
//! adapters are put in front of the Realm component without any other tool.

use std::path::{Path, PathBuf};

use anyhow::Context;
use wac_graph::types::Package;
use wac_graph::{CompositionGraph, EncodeOptions};

/// The composed component's bytes: `socket` with its imports filled from `plugs`' exports
/// (validated). Imports left unfilled stay imports of the result.
pub fn plug(socket: &Path, plugs: &[PathBuf]) -> anyhow::Result<Vec<u8>> {
    let mut graph = CompositionGraph::new();
    let mut register = |name: &str, path: &Path| -> anyhow::Result<_> {
        let pkg = Package::from_file(name, None, path, graph.types_mut())
            .with_context(|| format!("{} is not a readable component", path.display()))?;
        graph
            .register_package(pkg)
            .with_context(|| format!("cannot use {}", path.display()))
    };
    let socket_id = register("realm:socket", socket)?;
    let plug_ids = plugs
        .iter()
        .enumerate()
        .map(|(i, p)| register(&format!("realm:plug{i}"), p))
        .collect::<anyhow::Result<Vec<_>>>()?;
    wac_graph::plug(&mut graph, plug_ids, socket_id)
        .with_context(|| format!("cannot plug into {}", socket.display()))?;
    graph
        .encode(EncodeOptions::default())
        .context("the composition does not encode to a valid component")
}

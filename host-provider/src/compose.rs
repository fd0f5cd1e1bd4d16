//! Component composition with the Bytecode Alliance's `wac` libraries, so no other tool is
//! needed: `realm plug` (`wac-graph`) fills a socket component's imports with the exports
//! of plug components, as `wac plug` does; `realm compose` (`wac-parser`) builds a `.wac`
//! composition document, as `wac compose` does.

use std::path::{Path, PathBuf};

use anyhow::{Context, anyhow};
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

/// The component a `.wac` document describes, its packages given as (name, file) pairs
/// (`realm:guest` → `target/…/realm_guest.wasm`). Imports the document leaves open with
/// `...` stay imports of the result.
pub fn compose(document: &Path, deps: &[(String, PathBuf)]) -> anyhow::Result<Vec<u8>> {
    let source = std::fs::read_to_string(document)
        .with_context(|| format!("cannot read {}", document.display()))?;
    let doc =
        wac_parser::Document::parse(&source).map_err(|e| anyhow!("{}: {e}", document.display()))?;
    let mut packages = indexmap::IndexMap::new();
    for (name, path) in deps {
        let bytes =
            std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        packages.insert(
            wac_graph::types::BorrowedPackageKey {
                name: name.as_str(),
                version: None,
            },
            bytes,
        );
    }
    let resolution = doc
        .resolve(packages)
        .map_err(|e| anyhow!("{}: {e}", document.display()))?;
    resolution.encode(EncodeOptions::default()).map_err(|e| {
        anyhow!(
            "{}: the composition does not encode: {e}",
            document.display()
        )
    })
}

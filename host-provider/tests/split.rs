//! Partial offload's routing (`compute::split`, `--gpu-layers`), checked without a GPU: a
//! split of two CPU backends places the first blocks' weights on one side and the rest on
//! the other, copies activations across at the boundary, and gives the same greedy ids and
//! top-2 gaps, bit for bit, as one CPU backend.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use realm_compute::ModelBytes;
use realm_host::compute::split::Split;
use realm_kernels::cpu::CpuBackend;
use realm_kernels::pool::SpinPool;
use realm_model::{LoadedModel, Message, Params, Prompt};

fn cpu() -> CpuBackend {
    CpuBackend::new(Arc::new(SpinPool::new(2).expect("pool")), 1 << 32)
}

fn greedy<C: realm_compute::Compute>(m: &LoadedModel<C>, text: &str) -> (Vec<u32>, Vec<f32>) {
    let session = m.session(0).expect("session");
    let prompt = Prompt::Messages(vec![Message {
        role: "user".into(),
        content: text.into(),
    }]);
    let g = session
        .generate(prompt, Params::greedy(12))
        .expect("generation");
    while g.next().expect("next").is_some() {}
    (g.tokens(), g.margins())
}

#[test]
fn a_split_model_computes_what_one_backend_does() {
    let path = realm_host::default_model_path();
    let bytes =
        std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e} (`make models`)", path.display()));
    let file = ModelBytes::new(Arc::new(bytes));
    let whole = LoadedModel::load("m", cpu(), file.clone()).expect("loads");
    for layers in [0, 10, 30] {
        let split = Split::new(cpu(), cpu(), layers);
        let placed = split.placed();
        let parted = LoadedModel::load("m", split, file.clone()).expect("loads split");
        for text in ["What is the capital of France?", "Name three colors."] {
            assert_eq!(
                greedy(&parted, text),
                greedy(&whole, text),
                "{layers} blocks first: {text}"
            );
        }
        let (first, second, moves) = (
            placed.gpu_weights.load(Ordering::Relaxed),
            placed.cpu_weights.load(Ordering::Relaxed),
            placed.moves.load(Ordering::Relaxed),
        );
        println!(
            "{layers} blocks first: {first} weights there, {second} on the other side, {moves} copies"
        );
        // SmolLM2: 30 blocks of 9 weights; the embedding and final norm stay second.
        assert_eq!(first, 9 * layers as u64, "{layers}");
        assert!(second >= 2);
        if layers > 0 {
            assert!(moves > 0, "nothing crossed the boundary");
        }
    }
}

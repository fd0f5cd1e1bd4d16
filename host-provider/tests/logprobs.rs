//! Log-probabilities: each step's are the log-softmax of the logits the guest saw, so their
//! gaps are the logit gaps the guest reports as margins, the greedy choice is the most
//! likely token, and the alternatives are a distribution's best (sum of probabilities ≤ 1).

use realm_host::{Engine, EngineConfig, Message, Prompt, default_model_path, default_params};

#[test]
fn logprobs_are_the_log_softmax_of_the_guest_logits() {
    let engine = Engine::new(EngineConfig {
        threads: 1,
        ..EngineConfig::default()
    })
    .expect("engine");
    let mut model = engine.load_model(&default_model_path()).expect("model");
    let mut session = model.session(0).expect("session");
    let mut params = default_params();
    params.temperature = 0.0;
    params.max_tokens = 12;
    let prompt = Prompt::Messages(vec![Message {
        role: "user".into(),
        content: "Name three colors.".into(),
    }]);
    let mut g = session.generate(prompt, params).expect("generate");
    g.want_logprobs(5).expect("want");
    let mut steps = Vec::new();
    let mut ids = Vec::new();
    while let Some(chunk) = g.next() {
        let chunk = chunk.expect("chunk");
        ids.push(chunk.token);
        let taken = g.take_logprobs().expect("take");
        assert_eq!(taken.len(), 1, "one step per chunk");
        steps.extend(taken);
    }
    let margins = g.margins().expect("margins");
    assert!(steps.len() >= 2, "{} steps", steps.len());
    for (i, s) in steps.iter().enumerate() {
        assert_eq!(s.top.len(), 5);
        // Greedy: the chosen token is the most likely, with its log-probability.
        assert_eq!(s.chosen.token, ids[i]);
        assert_eq!(s.chosen.token, s.top[0].token);
        assert_eq!(s.chosen.logprob, s.top[0].logprob);
        // Best first, each a log-probability.
        assert!(
            s.top.windows(2).all(|w| w[0].logprob >= w[1].logprob),
            "{s:?}"
        );
        assert!(s.top.iter().all(|t| t.logprob <= 0.0));
        let mass: f64 = s.top.iter().map(|t| f64::from(t.logprob).exp()).sum();
        assert!(mass <= 1.0 + 1e-5, "step {i}: top-5 mass {mass}");
        // A log-softmax only shifts the logits: the top-2 gap is the guest's margin.
        let gap = s.top[0].logprob - s.top[1].logprob;
        assert!(
            (gap - margins[i]).abs() < 1e-3,
            "step {i}: gap {gap}, margin {}",
            margins[i]
        );
        // The bytes are the token's text.
        assert!(!s.chosen.bytes.is_empty());
    }
}

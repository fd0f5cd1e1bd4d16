//! `GET /metrics` of `realm serve`, in Prometheus' text format: requests by endpoint and
//! status, tokens, time to first token, inter-token latency and request durations, and the
//! sessions and connections in use at the time of the scrape.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// The route (unknown paths are `other`, so a scanner cannot grow the label set).
    pub endpoint: String,
    pub code: u32,
}

pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub prompt_tokens: Counter,
    pub prompt_tokens_cached: Counter,
    pub generated_tokens: Counter,
    pub queue_time: Histogram,
    pub queue_waiting: Gauge,
    pub time_to_first_token: Histogram,
    pub inter_token: Histogram,
    pub duration: Histogram,
    pub tenant_start: Histogram,
    pub tenants_reused: Counter,
    pub batched_rounds: Gauge,
    pub batched_products: Gauge,
    pub batched_rows: Gauge,
    pub batched_round_seconds: Gauge<f64, AtomicU64>,
    pub batched_product_seconds: Gauge<f64, AtomicU64>,
    pub sessions_in_use: Gauge,
    pub sessions_max: Gauge,
    pub connections_open: Gauge,
}

/// The routes `realm serve` answers; anything else is counted as `other`.
const ENDPOINTS: [&str; 9] = [
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/models",
    "/infer",
    "/embed",
    "/health",
    "/metrics",
    "/",
];

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "realm_requests",
            "Requests answered, by endpoint and HTTP status",
            requests.clone(),
        );
        let prompt_tokens = Counter::default();
        registry.register(
            "realm_prompt_tokens",
            "Prompt tokens processed",
            prompt_tokens.clone(),
        );
        let prompt_tokens_cached = Counter::default();
        registry.register(
            "realm_prompt_tokens_cached",
            "Prompt tokens whose KV cache a tenant held already from its previous request (not computed again)",
            prompt_tokens_cached.clone(),
        );
        // 100 µs to about 100 s.
        let queue_time = Histogram::new(exponential_buckets(0.000_1, 2.0, 20));
        registry.register(
            "realm_queue_seconds",
            "From a request's admission check to its session slot (0 when one was free)",
            queue_time.clone(),
        );
        let queue_waiting = Gauge::default();
        registry.register(
            "realm_queue_waiting",
            "Requests waiting for a session slot now",
            queue_waiting.clone(),
        );
        let generated_tokens = Counter::default();
        registry.register(
            "realm_generated_tokens",
            "Tokens generated",
            generated_tokens.clone(),
        );
        // 5 ms to about 80 s.
        let time_to_first_token = Histogram::new(exponential_buckets(0.005, 2.0, 15));
        registry.register(
            "realm_time_to_first_token_seconds",
            "From a generation request's arrival to its first token",
            time_to_first_token.clone(),
        );
        // 1 ms to about 4 s.
        let inter_token = Histogram::new(exponential_buckets(0.001, 2.0, 13));
        registry.register(
            "realm_inter_token_seconds",
            "Between consecutive streamed pieces of one generation",
            inter_token.clone(),
        );
        let duration = Histogram::new(exponential_buckets(0.005, 2.0, 17));
        registry.register(
            "realm_request_duration_seconds",
            "From a request's arrival to its answer's headers (streams: to the first byte)",
            duration.clone(),
        );
        // 50 µs to about 1.6 s.
        let tenant_start = Histogram::new(exponential_buckets(0.000_05, 2.0, 16));
        registry.register(
            "realm_tenant_start_seconds",
            "From a request's admission to its tenant being ready (an idle loaded one, or a new one)",
            tenant_start.clone(),
        );
        let tenants_reused = Counter::default();
        registry.register(
            "realm_tenants_reused",
            "Requests served by an idle loaded tenant instead of a new one",
            tenants_reused.clone(),
        );
        let batched_rounds = Gauge::default();
        registry.register(
            "realm_batched_rounds",
            "Rounds that ran the tenants' steps together (--no-batch: 0), since start",
            batched_rounds.clone(),
        );
        let batched_products = Gauge::default();
        registry.register(
            "realm_batched_products",
            "Matmuls shared by more than one tenant (one pass over the weight for all), since start",
            batched_products.clone(),
        );
        let batched_rows = Gauge::default();
        registry.register(
            "realm_batched_rows",
            "Rows (prompt and generated tokens) those shared matmuls multiplied, since start",
            batched_rows.clone(),
        );
        let batched_round_seconds = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "realm_batched_round_seconds",
            "Time the rounds took, since start (the rest of a request's time: its tenant's own work, waiting for a round)",
            batched_round_seconds.clone(),
        );
        let batched_product_seconds = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "realm_batched_product_seconds",
            "The part of realm_batched_round_seconds spent in shared products (the rest: the steps' other ops)",
            batched_product_seconds.clone(),
        );
        let sessions_in_use = Gauge::default();
        registry.register(
            "realm_sessions_in_use",
            "Requests generating or embedding now",
            sessions_in_use.clone(),
        );
        let sessions_max = Gauge::default();
        registry.register(
            "realm_sessions_max",
            "--max-sessions: requests beyond it wait in the queue (--max-queue)",
            sessions_max.clone(),
        );
        let connections_open = Gauge::default();
        registry.register(
            "realm_connections_open",
            "Open HTTP connections",
            connections_open.clone(),
        );
        Self {
            registry,
            requests,
            prompt_tokens,
            prompt_tokens_cached,
            generated_tokens,
            queue_time,
            queue_waiting,
            time_to_first_token,
            inter_token,
            duration,
            tenant_start,
            tenants_reused,
            batched_rounds,
            batched_products,
            batched_rows,
            batched_round_seconds,
            batched_product_seconds,
            sessions_in_use,
            sessions_max,
            connections_open,
        }
    }

    /// Counts one answered request.
    pub fn answered(&self, path: &str, code: u16) {
        let endpoint = ENDPOINTS
            .iter()
            .find(|e| **e == path)
            .map_or("other", |e| e)
            .to_string();
        self.requests
            .get_or_create(&RequestLabels {
                endpoint,
                code: u32::from(code),
            })
            .inc();
    }

    /// The text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

// Realm's self-contained component (realm-standalone.wasm) in Node.js: transpiled to
// JavaScript + core wasm by `jco transpile` (into ./out, see the Makefile), with WASI from
// @bytecodealliance/preview2-shim, then the `realm:inference` exports called directly
// (load, session, generate, streaming `next()`).
//
// Usage: node node_host.mjs MODEL_DIR MODEL_PATH PROMPT MAX_TOKENS
// Prints one JSON object: the generated ids and text, and the guest's usage and timings.
import { _setPreopens } from "@bytecodealliance/preview2-shim/filesystem";
import path from "node:path";

const [modelDir, model, prompt, maxTokens] = process.argv.slice(2);
// The component reads the model through WASI: grant that one directory.
_setPreopens({ [modelDir]: path.resolve(modelDir) });
const { runtime } = await import("./out/realm-standalone.js");

const params = {
  maxTokens: Number(maxTokens),
  temperature: 0,
  topK: 40,
  topP: 0.95,
  minP: 0.05,
  repeatPenalty: 1,
  repeatLastN: 64,
  seed: 0n,
  stop: [],
  ignoreEog: false,
};
const m = runtime.Model.load(model);
const session = m.session(0);
const started = performance.now();
const generation = session.generate(
  { tag: "messages", val: [{ role: "user", content: prompt }] },
  params,
);
let text = "";
let pieces = 0;
for (let chunk = generation.next(); chunk !== undefined; chunk = generation.next()) {
  text += chunk.text;
  pieces += 1;
}
const seconds = (performance.now() - started) / 1000;
const ids = Array.from(generation.tokens());
const usage = generation.usage();
console.log(JSON.stringify({
  ids, text, pieces, seconds,
  // The guest's own clock (WASI), the same numbers every host reports.
  prompt_tokens: usage.promptTokens,
  generated_tokens: usage.generatedTokens,
  prefill_ns: Number(usage.prefillNs),
  decode_ns: Number(usage.decodeNs),
}));

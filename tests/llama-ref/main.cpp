// realm-llama-ref MODEL.gguf [N_PREDICT] < prompts.jsonl > greedy.jsonl
//
// For each input line {"prompt": "..."} (raw text; special tokens parsed, BOS/EOS added as
// the vocabulary decides), runs llama.cpp greedily on one CPU thread with flash attention
// and an f16 KV cache, and prints one line: the prompt, its ids, the greedy output ids, the
// gap between the best and second-best logit at each step, and the top 8 (id, logit) of
// each step, so Realm's tests can check ids up to the first near-tie and report how far
// its logits are from llama.cpp's.
#include "llama.h"
#include "nlohmann/json.hpp"

#include <algorithm>
#include <cstdio>
#include <iostream>
#include <string>
#include <vector>

using json = nlohmann::ordered_json;

static void quiet(ggml_log_level, const char *, void *) {}

int main(int argc, char ** argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s MODEL.gguf [N_PREDICT] < prompts.jsonl\n", argv[0]);
        return 2;
    }
    const int n_predict = argc > 2 ? std::stoi(argv[2]) : 32;
    llama_log_set(quiet, nullptr);
    llama_backend_init();

    llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = 0;
    // ggml-cpu's plain kernels: no weight repacking and no AMX buffers (whose results depend
    // on the CPU; its AMX path also crashes on these small matrices).
    mp.use_extra_bufts = false;
    llama_model * model = llama_model_load_from_file(argv[1], mp);
    if (!model) {
        fprintf(stderr, "cannot load %s\n", argv[1]);
        return 1;
    }
    const llama_vocab * vocab = llama_model_get_vocab(model);
    const int n_vocab = llama_vocab_n_tokens(vocab);

    std::string line;
    while (std::getline(std::cin, line)) {
        if (line.empty()) continue;
        const json in = json::parse(line);
        const std::string prompt = in.at("prompt").get<std::string>();

        llama_context_params cp = llama_context_default_params();
        // A whole prompt per llama_decode, split into llama.cpp's default 512-token
        // micro-batches (as Realm's prefill is).
        cp.n_ctx = 1024;
        cp.n_batch = 1024;
        cp.n_ubatch = 512;
        cp.n_threads = 1;
        cp.n_threads_batch = 1;
        cp.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_ENABLED;
        llama_context * ctx = llama_init_from_model(model, cp);
        if (!ctx) {
            fprintf(stderr, "cannot create a context\n");
            return 1;
        }

        std::vector<llama_token> ids(prompt.size() + 8);
        const int n = llama_tokenize(vocab, prompt.c_str(), (int) prompt.size(), ids.data(),
                                     (int) ids.size(), true, true);
        if (n < 0) {
            fprintf(stderr, "tokenize failed\n");
            return 1;
        }
        ids.resize(n);

        json out = in;
        out["prompt_ids"] = ids;
        std::vector<llama_token> gen;
        std::vector<float> gaps;
        json tops = json::array();
        bool eos = false;
        std::vector<llama_token> batch = ids;
        for (int step = 0; step < n_predict; step++) {
            if (llama_decode(ctx, llama_batch_get_one(batch.data(), (int) batch.size()))) {
                fprintf(stderr, "decode failed\n");
                return 1;
            }
            const float * logits = llama_get_logits_ith(ctx, -1);
            std::vector<int> order(n_vocab);
            for (int i = 0; i < n_vocab; i++) order[i] = i;
            std::partial_sort(order.begin(), order.begin() + 8, order.end(), [&](int a, int b) {
                return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
            });
            json top = json::array();
            for (int i = 0; i < 8; i++) top.push_back({order[i], logits[order[i]]});
            tops.push_back(top);
            gaps.push_back(logits[order[0]] - logits[order[1]]);
            const llama_token next = order[0];
            gen.push_back(next);
            if (llama_vocab_is_eog(vocab, next)) {
                eos = true;
                break;
            }
            batch.assign(1, next);
        }
        out["output_ids"] = gen;
        out["stopped_at_eos"] = eos;
        out["top2_gaps"] = gaps;
        out["top_logits"] = tops;
        std::cout << out.dump() << "\n" << std::flush;
        llama_free(ctx);
    }
    llama_model_free(model);
    return 0;
}

// Realm's CUDA kernels, compiled at run time by NVRTC (no CUDA toolkit is needed to build
// Realm; the device's driver and NVRTC library are found when a backend starts). Plain
// f32 arithmetic over weights dequantized on the fly; KV caches in f16 (as the CPU backend's).

typedef unsigned char u8;
typedef unsigned short u16;

// ggml type ids (GgmlType).
#define T_F32 0
#define T_F16 1
#define T_Q4_0 2
#define T_Q4_1 3
#define T_Q5_0 6
#define T_Q5_1 7
#define T_Q8_0 8
#define T_Q4_K 12
#define T_Q5_K 13
#define T_Q6_K 14

// Programmatic dependent launch (compute capability 9.0+, launches queued with the host's
// PDL attribute): a kernel may start while the one before it in its stream is still
// running. `step_start` lets the next kernel launch (its blocks then wait in their own
// step_start) and waits until the previous kernel has finished and its writes are
// visible; nothing before it may read what an earlier kernel wrote or write what one
// reads: only weights (read-only) are loaded before it. Every kernel calls it before its
// first other memory access and before any return, so that kernels complete in stream
// order. Without the attribute, or compiled for an older GPU, it does nothing.
__device__ __forceinline__ void step_start() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// f16 ↔ f32 by PTX (no headers: NVRTC compiles this file alone).
__device__ __forceinline__ float h2f(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

// f32 → f16, rounded to nearest even: one instruction where the GPU converts pairs
// (compute capability 8.0+; the pair's other half a zero, the result read from a 32-bit
// register: through a 16-bit one, the PTX conversion's result lost its low byte here),
// else in integer code. Attention's value chain converts once a position, so this is on
// its critical path.
__device__ __forceinline__ u16 f2h(float f) {
#if __CUDA_ARCH__ >= 800
    unsigned h;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(h) : "f"(0.0f), "f"(f));
    return (u16)(h & 0xffffu);
#else
    unsigned x = __float_as_uint(f);
    unsigned sign = (x >> 16) & 0x8000u;
    unsigned mant = x & 0x7fffffu;
    int e = (int)((x >> 23) & 0xff);
    if (e == 0xff) return (u16)(sign | 0x7c00u | (mant ? 0x200u : 0u));
    int exp = e - 127 + 15;
    if (exp >= 31) return (u16)(sign | 0x7c00u);
    if (exp <= 0) {
        if (exp < -10) return (u16)sign;
        mant |= 0x800000u;
        int shift = 14 - exp;
        unsigned h = mant >> shift;
        unsigned rem = mant & ((1u << shift) - 1u), halfway = 1u << (shift - 1);
        if (rem > halfway || (rem == halfway && (h & 1u))) h++;
        return (u16)(sign | h);
    }
    unsigned h = ((unsigned)exp << 10) | (mant >> 13);
    unsigned rem = mant & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) h++;
    return (u16)(sign | h);
#endif
}

#define NEG_INF __int_as_float(0xff800000)

__device__ __forceinline__ u16 rd16(const u8* p) {
    return (u16)p[0] | ((u16)p[1] << 8);
}

// Bytes of one 32-value block (F32/F16: 32 values).
__device__ __forceinline__ int block_bytes(int ty) {
    switch (ty) {
        case T_F32: return 128;
        case T_F16: return 64;
        case T_Q4_0: return 18;
        case T_Q4_1: return 20;
        case T_Q5_0: return 22;
        case T_Q5_1: return 24;
        default: return 34; // Q8_0
    }
}

// Value j (0..32) of block b.
__device__ __forceinline__ float dq(const u8* b, int ty, int j) {
    switch (ty) {
        case T_F32: return ((const float*)b)[j];
        case T_F16: return h2f(rd16(b + 2 * j));
        case T_Q4_0: {
            float d = h2f(rd16(b));
            int q = j < 16 ? (b[2 + j] & 15) : (b[2 + j - 16] >> 4);
            return (q - 8) * d;
        }
        case T_Q4_1: {
            float d = h2f(rd16(b)), m = h2f(rd16(b + 2));
            int q = j < 16 ? (b[4 + j] & 15) : (b[4 + j - 16] >> 4);
            return q * d + m;
        }
        case T_Q5_0: {
            float d = h2f(rd16(b));
            unsigned qh = b[2] | (b[3] << 8) | (b[4] << 16) | ((unsigned)b[5] << 24);
            int lo = j < 16 ? (b[6 + j] & 15) : (b[6 + j - 16] >> 4);
            int hi = (qh >> j) & 1;
            return ((lo | (hi << 4)) - 16) * d;
        }
        case T_Q5_1: {
            float d = h2f(rd16(b)), m = h2f(rd16(b + 2));
            unsigned qh = b[4] | (b[5] << 8) | (b[6] << 16) | ((unsigned)b[7] << 24);
            int lo = j < 16 ? (b[8 + j] & 15) : (b[8 + j - 16] >> 4);
            int hi = (qh >> j) & 1;
            return (lo | (hi << 4)) * d + m;
        }
        default: {
            float d = h2f(rd16(b));
            return (signed char)b[2 + j] * d;
        }
    }
}

// ggml's get_scale_min_k4: sub-block j's 6-bit scale and min of a Q4_K/Q5_K block.
__device__ __forceinline__ void scale_min_k4(int j, const u8* q, int* d, int* m) {
    if (j < 4) {
        *d = q[j] & 63;
        *m = q[j + 4] & 63;
    } else {
        *d = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
        *m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
}

// Value j (0..256) of K-quant super-block b, as ggml's dequantize_row_q*_K.
__device__ __forceinline__ float dqk(const u8* b, int ty, int j) {
    if (ty == T_Q6_K) {
        const u8 *ql = b + 64 * (j / 128), *qh = b + 128 + 32 * (j / 128);
        const signed char* sc = (const signed char*)(b + 192 + 8 * (j / 128));
        int r = j % 128, quarter = r / 32, l = r % 32;
        int lo = quarter & 1 ? ql[l + 32] : ql[l];
        lo = quarter < 2 ? lo & 0xF : lo >> 4;
        int q = (lo | (((qh[l] >> (2 * quarter)) & 3) << 4)) - 32;
        return h2f(rd16(b + 208)) * (float)sc[l / 16 + 2 * quarter] * (float)q;
    }
    // Q4_K / Q5_K: 64 values per pair of sub-blocks, low nibbles then high.
    int g = j / 64, l = j % 64, sub = 2 * g + (l >= 32), li = l % 32;
    int sc, m;
    scale_min_k4(sub, b + 4, &sc, &m);
    float d = h2f(rd16(b)) * (float)sc, mn = h2f(rd16(b + 2)) * (float)m;
    int q;
    if (ty == T_Q4_K) {
        int byte = b[16 + 32 * g + li];
        q = l < 32 ? byte & 0xF : byte >> 4;
    } else {
        int byte = b[48 + 32 * g + li];
        q = (l < 32 ? byte & 0xF : byte >> 4) + (((b[16 + li] >> sub) & 1) << 4);
    }
    return d * (float)q - mn;
}

__device__ __forceinline__ int is_k(int ty) {
    return ty == T_Q4_K || ty == T_Q5_K || ty == T_Q6_K;
}

// Bytes of one 256-value K-quant super-block.
__device__ __forceinline__ int k_bytes(int ty) {
    return ty == T_Q4_K ? 144 : ty == T_Q5_K ? 176 : 210;
}

// Bytes of a row of k values.
__device__ __forceinline__ size_t row_bytes(int ty, int k) {
    return is_k(ty) ? (size_t)(k / 256) * k_bytes(ty) : (size_t)(k / 32) * block_bytes(ty);
}

// Value c of a row.
__device__ __forceinline__ float dq_at(const u8* row, int ty, int c) {
    if (is_k(ty)) return dqk(row + (size_t)(c / 256) * k_bytes(ty), ty, c % 256);
    return dq(row + (size_t)(c / 32) * block_bytes(ty), ty, c % 32);
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffff, v, o);
    return __shfl_sync(0xffffffff, v, 0);
}

// y[r][j] = x[r] · w[j]: one warp per output column j, for `rows` rows at once (each
// warp reads its weight row once for all of them, up to 8 rows per pass).
extern "C" __global__ void matmul(const u8* w, int ty, int k, int n, const float* x, int rows,
                                  float* y) {
    step_start();
    int warp = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    int lane = threadIdx.x & 31;
    if (warp >= n) return;
    int nb = k / 32;
    const u8* wr = w + (size_t)warp * row_bytes(ty, k);
    for (int r0 = 0; r0 < rows; r0 += 8) {
        float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        int rn = min(8, rows - r0);
        for (int b = 0; b < nb; b++) {
            int col = b * 32 + lane;
            float v = dq_at(wr, ty, col);
            for (int r = 0; r < rn; r++) acc[r] += v * x[(size_t)(r0 + r) * k + col];
        }
        for (int r = 0; r < rn; r++) {
            float s = warp_sum(acc[r]);
            if (lane == 0) y[(size_t)(r0 + r) * n + warp] = s;
        }
    }
}

// out[i] = scale * row ids[i] of the table.
extern "C" __global__ void embed(const u8* w, int ty, int k, const unsigned* ids, int n,
                                 float scale, float* out) {
    step_start();
    int i = blockIdx.x;
    if (i >= n) return;
    const u8* row = w + (size_t)ids[i] * row_bytes(ty, k);
    for (int c = threadIdx.x; c < k; c += blockDim.x) {
        out[(size_t)i * k + c] = dq_at(row, ty, c) * scale;
    }
}

// RMS norm of each group of `g` values (g = len(w)), one block per (row, group).
// 1 / sqrt(mean of the squares of xg's g values + eps), for every thread of the block, in
// one order whatever the block's size (that of 256 threads; the others wait): squares in
// f32, summed in f64 as ggml. rms_norm and the products that take a norm over use it.
__device__ __forceinline__ float rms_scale(const float* xg, int g, float eps) {
    __shared__ double part[8];
    __shared__ float scale;
    if (threadIdx.x < 256) {
        double s = 0;
        for (int i = threadIdx.x; i < g; i += 256) s += (double)(xg[i] * xg[i]);
        for (int o = 16; o > 0; o >>= 1) s += __shfl_down_sync(0xffffffff, s, o);
        if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = s;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        double t = 0;
        for (int i = 0; i < 8; i++) t += part[i];
        float mean = (float)(t / g);
        scale = 1.0f / sqrtf(mean + eps);
    }
    __syncthreads();
    return scale;
}

// One block of 256 threads per group.
extern "C" __global__ void rms_norm(const float* x, const float* w, int g, float eps, float* y,
                                    int groups) {
    step_start();
    const float* xg = x + (size_t)blockIdx.x * g;
    float* yg = y + (size_t)blockIdx.x * g;
    float scale = rms_scale(xg, g, eps);
    for (int i = threadIdx.x; i < g; i += blockDim.x) yg[i] = (xg[i] * scale) * w[i];
}

// RoPE in place, one thread per (row, head, pair), with each position's cos and sin
// (times the magnitude scale) from `tab`, which the host fills with the CPU backend's own
// values (`RopeParams::angles`: the C library's cosf and sinf, as ggml-cpu), pairs
// of floats per (position, pair). The rotation as ggml's C, as GCC contracts it. One or two
// tensors (x1: a layer's keys after its queries), and with two, optionally kv_store's work
// for the keys (as rotated) and `v` (kc non-null): the launches the host merged.
__device__ __forceinline__ void rope_pair(float* x, int cols, int head_dim, int half, int neox,
                                          int pos, const float* tab, int t, u16* kc) {
    int heads = cols / head_dim;
    int i = t % half, h = (t / half) % heads, r = t / (half * heads);
    const float* cs = tab + ((size_t)(pos + r) * half + i) * 2;
    float c = cs[0], s = cs[1];
    float* head = x + (size_t)r * cols + h * head_dim;
    int a = neox ? i : 2 * i, b = neox ? i + half : 2 * i + 1;
    float x0 = head[a], x1 = head[b];
    float y0 = fmaf(x0, c, -__fmul_rn(x1, s)), y1 = fmaf(x0, s, __fmul_rn(x1, c));
    head[a] = y0;
    head[b] = y1;
    if (kc) {
        u16* kr = kc + (size_t)(pos + r) * cols + h * head_dim;
        kr[a] = f2h(y0);
        kr[b] = f2h(y1);
    }
}

extern "C" __global__ void rope(float* x0, int cols0, float* x1, int cols1, int rows,
                                int head_dim, int n_rot, int neox, const int* pos_p,
                                const float* tab, const float* v, u16* kc, u16* vc) {
    step_start();
    int pos = *pos_p;
    int half = n_rot / 2;
    int t = blockIdx.x * blockDim.x + threadIdx.x;
    int a = rows * (cols0 / head_dim) * half;
    if (t < a) {
        rope_pair(x0, cols0, head_dim, half, neox, pos, tab, t, nullptr);
        return;
    }
    t -= a;
    int b = rows * (cols1 / head_dim) * half;
    if (t < b) {
        rope_pair(x1, cols1, head_dim, half, neox, pos, tab, t, kc);
        return;
    }
    if (!kc) return;
    t -= b;
    // The keys' values past n_rot, as they are.
    int rest = head_dim - n_rot, c = rows * (cols1 / head_dim) * rest;
    if (t < c) {
        int j = n_rot + t % rest, h = (t / rest) % (cols1 / head_dim), r = t / (rest * (cols1 / head_dim));
        size_t at = (size_t)r * cols1 + h * head_dim + j;
        kc[(size_t)pos * cols1 + at] = f2h(x1[at]);
        return;
    }
    t -= c;
    if (t < rows * cols1) vc[(size_t)pos * cols1 + t] = f2h(v[t]);
}

// Keys and values of `rows` positions from `pos` into a layer's f16 cache.
extern "C" __global__ void kv_store(const float* k, const float* v, int rows, int width,
                                    const int* pos_p, u16* kc, u16* vc) {
    step_start();
    int pos = *pos_p;
    int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= rows * width) return;
    kc[(size_t)pos * width + t] = f2h(k[t]);
    vc[(size_t)pos * width + t] = f2h(v[t]);
}

// Causal attention, one block per (row, head), in the CPU backend's numerics (ggml-cpu's
// flash_attn_ext_f16): q rounded to f16, scores as f32 sums of f16 products, and an online
// softmax whose weighted sum of values is accumulated in f16, rescaled in f16 whenever
// the running maximum rises. Positions in chunks of 8 · blockDim (the chunks do not change
// the numbers: each position's factors come from the maximum of all before it): their
// scores first (a warp per position, into dynamic shared memory, 3 floats a position),
// then each thread walks them in order for its own output values (at most two per thread:
// head_dim <= 2 * blockDim). Prompts launch small blocks (more of them resident: the walk
// keeps only head_dim threads busy), decoding large ones (its few blocks score faster). The position comes
// from device memory, so that a decode step's launches are the same from token to token.
// e^x rounded to the nearest float through double, as the CPU backend's
// (`realm_compute::rounded::exp`; CUDA's expf may be 2 ulp off), so both backends weigh
// positions alike.
__device__ __forceinline__ float exp_rn(float x) {
    return (float)exp((double)x);
}

// A score s times the scale, soft-capped as ggml-cpu caps it when softcap is non-zero (the
// scale already divided by softcap on the host): softcap · tanh(s · scale), tanh rounded once
// from double as the CPU backend's (`realm_compute::rounded::tanh`).
__device__ __forceinline__ float capped(float s, float scale, float softcap) {
    float x = __fmul_rn(s, scale);
    return softcap != 0.0f ? __fmul_rn(softcap, (float)tanh((double)x)) : x;
}

// q·k over a head of a multiple of 64 values in the CPU backend's order (ggml-cpu's
// AVX2/AVX-512 f16 dot as Realm computes it): 64 accumulators, slot d % 64 summing
// products (rounded, then added: no fused multiply-add) over 64-value steps; then
// (slot a + slot a+32) + (slot a+16 + slot a+48) per lane of 16, the 16 halved to 8, 4,
// and (0 + 2) + (1 + 3). Lane L of the warp holds slots L and L + 32. All lanes get it.
__device__ __forceinline__ float score64(const float* qs, const u16* kr, int hd, int lane) {
    float a = 0.0f, b = 0.0f;
    for (int i = 0; i < hd; i += 64) {
        a = __fadd_rn(a, __fmul_rn(h2f(kr[i + lane]), qs[i + lane]));
        b = __fadd_rn(b, __fmul_rn(h2f(kr[i + lane + 32]), qs[i + lane + 32]));
    }
    float x = __fadd_rn(a, b);  // lanes 0-15: slots 0+32, lanes 16-31: slots 16+48
    float v = __fadd_rn(x, __shfl_down_sync(0xffffffff, x, 16));  // lanes 0-15
    float t3 = __fadd_rn(v, __shfl_down_sync(0xffffffff, v, 8));   // lanes 0-7
    float t6 = __fadd_rn(t3, __shfl_down_sync(0xffffffff, t3, 4)); // lanes 0-3
    float u = __fadd_rn(t6, __shfl_down_sync(0xffffffff, t6, 2));  // lanes 0-1
    float s = __fadd_rn(u, __shfl_down_sync(0xffffffff, u, 1));
    return __shfl_sync(0xffffffff, s, 0);
}

// score64 of four positions at once (kr0..kr3): every lane's loads of the four keys issued
// before any sum, the four reductions interleaved; each score as score64's, bit for bit.
__device__ __forceinline__ void score64x4(const float* qs, const u16* const (&kr)[4], int hd,
                                          int lane, float (&out)[4]) {
    float a[4] = {0.0f, 0.0f, 0.0f, 0.0f}, b[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int i = 0; i < hd; i += 64) {
        u16 ka[4], kb[4];
#pragma unroll
        for (int u = 0; u < 4; u++) {
            ka[u] = kr[u][i + lane];
            kb[u] = kr[u][i + lane + 32];
        }
        float qa = qs[i + lane], qb = qs[i + lane + 32];
#pragma unroll
        for (int u = 0; u < 4; u++) {
            a[u] = __fadd_rn(a[u], __fmul_rn(h2f(ka[u]), qa));
            b[u] = __fadd_rn(b[u], __fmul_rn(h2f(kb[u]), qb));
        }
    }
    float x[4];
#pragma unroll
    for (int u = 0; u < 4; u++) x[u] = __fadd_rn(a[u], b[u]);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
#pragma unroll
        for (int u = 0; u < 4; u++) x[u] = __fadd_rn(x[u], __shfl_down_sync(0xffffffff, x[u], o));
    }
#pragma unroll
    for (int u = 0; u < 4; u++) out[u] = __shfl_sync(0xffffffff, x[u], 0);
}

// Values of positions row0.. (tl of them, a head's hd values each at `off` in rows of
// `width`) copied into shared memory by the whole block, in words: asynchronously where the
// GPU copies so (compute capability 8.0+; v_tile_wait waits), else by loads and stores.
__device__ __forceinline__ void v_tile_load(u16* vt, const u16* vc, size_t row0, int tl,
                                            int width, int off, int hd) {
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5, hw = hd / 2;
    for (int i = warp; i < tl; i += warps) {
        const unsigned* src = (const unsigned*)(vc + (row0 + i) * width + off);
        unsigned* dst = (unsigned*)(vt + i * hd);
        for (int w = lane; w < hw; w += 32) {
#if __CUDA_ARCH__ >= 800
            unsigned sa = (unsigned)__cvta_generic_to_shared(dst + w);
            asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"(sa), "l"(src + w));
#else
            dst[w] = src[w];
#endif
        }
    }
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.commit_group;" ::: "memory");
#endif
}
__device__ __forceinline__ void v_tile_wait() {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_all;" ::: "memory");
#endif
    __syncthreads();
}

// The running maximum before thread t's values (v, its values' maximum): m_prev, then the
// warps before t's, then the lanes before t's; `total` that of all (m_prev included). A
// barrier inside (wmax: a float a warp, shared).
__device__ __forceinline__ float running_max(float v, float m_prev, float* wmax, float& total) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    float incl = v;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        float y = __shfl_up_sync(0xffffffff, incl, o);
        if (lane >= o) incl = fmaxf(incl, y);
    }
    if (lane == 31) wmax[warp] = incl;
    __syncthreads();
    float run = m_prev;
    total = m_prev;
    for (int w = 0; w < warps; w++) {
        if (w < warp) run = fmaxf(run, wmax[w]);
        total = fmaxf(total, wmax[w]);
    }
    float excl = __shfl_up_sync(0xffffffff, incl, 1);
    if (lane > 0) run = fmaxf(run, excl);
    return run;
}

// One position of attention's walk: what was summed rescaled by msa (when not 1), the
// position's value weighed by vsa, the f16 rounding chain as the CPU's.
__device__ __forceinline__ void walk_step(float2 f, u16 v, float& sum, u16& acc) {
    float ms = f.x, vs = f.y;
    if (ms != 1.0f) acc = f2h(h2f(acc) * ms);
    sum = fmaf(sum, ms, vs);
    acc = f2h(fmaf(h2f(v), vs, h2f(acc)));
}

extern "C" __global__ void attention(const float* q, const u16* kc, const u16* vc, int rows,
                                     int n_head, int n_kv, int hd, const int* pos_p,
                                     float scale, int window, float softcap, float* out) {
    step_start();
    // Scores, then per position the online softmax's factors: `msa` rescales what was
    // summed before (1 when the maximum did not rise), `vsa` weighs the position's value.
    // They depend on the scores only, so the block computes them once (a prefix maximum
    // over the chunk, eight positions per thread: blockDim is 256) and each thread's walk
    // over its output values is left with the f16 rounding chain, in the same order.
    extern __shared__ float att_smem[];
    int chunk = 8 * blockDim.x;
    float *sc = att_smem, *msa = sc + chunk, *vsa = msa + chunk;
    // Shared memory past the three arrays (decoding, heads of an even size: the host gives
    // some) holds a tile of values, tp positions, copied while the block scores (else values are read from the
    // cache as they are summed).
    unsigned dyn;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(dyn));
    u16* vt = (u16*)(vsa + chunk);
    int tp = (int)(dyn - 12u * chunk) / (2 * hd);
    __shared__ float wmax[8], qs[512];
    int pos = *pos_p;
    int r = blockIdx.x / n_head, h = blockIdx.x % n_head;
    int kvh = h / (n_head / n_kv), width = n_kv * hd;
    int p = pos + r;
    int start = window > 0 ? max(0, p + 1 - window) : 0;
    int len = p + 1 - start;
    const float* qh = q + (size_t)r * n_head * hd + h * hd;
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    float sum[2] = {0.0f, 0.0f}, m_prev = NEG_INF;
    u16 acc[2] = {0, 0};
    // q rounded to f16 once.
    for (int d = threadIdx.x; d < hd; d += blockDim.x) qs[d] = h2f(f2h(qh[d]));
    for (int c0 = 0; c0 < len; c0 += chunk) {
        int cl = min(chunk, len - c0);
        __syncthreads();
        if (tp > 0) v_tile_load(vt, vc, start + c0, min(tp, cl), width, kvh * hd, hd);
        int j = warp;
        if (hd % 64 == 0) {
            // Four positions a warp at a time (their key loads in flight together).
            for (; j + 3 * warps < cl; j += 4 * warps) {
                const u16* kr[4];
#pragma unroll
                for (int u = 0; u < 4; u++)
                    kr[u] = kc + (size_t)(start + c0 + j + u * warps) * width + kvh * hd;
                float s4[4];
                score64x4(qs, kr, hd, lane, s4);
                if (lane == 0) {
#pragma unroll
                    for (int u = 0; u < 4; u++) sc[j + u * warps] = capped(s4[u], scale, softcap);
                }
            }
        }
        for (; j < cl; j += warps) {
            const u16* kr = kc + (size_t)(start + c0 + j) * width + kvh * hd;
            float s;
            if (hd % 64 == 0) {
                s = score64(qs, kr, hd, lane);
            } else {
                // Other sizes as ggml's portable f16 dot (`realm_kernels::kernels::dot_f16`):
                // the whole 64-value steps as above, then the rest's products added in f64,
                // in order (by every lane alike).
                int h64 = hd / 64 * 64;
                double t = h64 > 0 ? (double)score64(qs, kr, h64, lane) : 0.0;
                for (int d = h64; d < hd; d++) t += (double)__fmul_rn(h2f(kr[d]), qs[d]);
                s = (float)t;
            }
            if (lane == 0) sc[j] = capped(s, scale, softcap);
        }
        __syncthreads();
        int base = threadIdx.x * 8;
        float lm = NEG_INF;
        for (int i = 0; i < 8; i++) {
            if (base + i < cl) lm = fmaxf(lm, sc[base + i]);
        }
        float total;
        float run = running_max(lm, m_prev, wmax, total);
        for (int i = 0; i < 8; i++) {
            int j = base + i;
            if (j >= cl) break;
            float s = sc[j];
            if (s > run) {
                msa[j] = exp_rn(run - s);
                vsa[j] = 1.0f;
                run = s;
            } else {
                msa[j] = 1.0f;
                vsa[j] = exp_rn(s - run);
            }
        }
        m_prev = total;
        __syncthreads();
        // The walk, over tiles of tp positions (one of cl without a tile).
        int step = tp > 0 ? tp : cl;
        for (int t0 = 0; t0 < cl; t0 += step) {
            int tl = min(step, cl - t0);
            if (tp > 0) {
                if (t0 > 0) {
                    __syncthreads();  // the tile before is summed
                    v_tile_load(vt, vc, start + c0 + t0, tl, width, kvh * hd, hd);
                }
                v_tile_wait();
            }
            for (int t = 0; t < 2; t++) {
                int d = threadIdx.x + t * blockDim.x;
                if (d >= hd) break;
                const u16* vcol = tp > 0 ? vt + d : vc + (size_t)(start + c0) * width + kvh * hd + d;
                size_t vstride = tp > 0 ? hd : width;
                // Eight values loaded ahead of the dependent chain, not one load per step, and
                // the next eight's loads in flight while these are summed.
                u16 vv[8], nv[8];
#pragma unroll
                for (int u = 0; u < 8; u++) nv[u] = u < tl ? vcol[(size_t)u * vstride] : 0;
                for (int j0 = 0; j0 < tl; j0 += 8) {
#pragma unroll
                    for (int u = 0; u < 8; u++) {
                        vv[u] = nv[u];
                        int jn = j0 + 8 + u;
                        nv[u] = jn < tl ? vcol[(size_t)jn * vstride] : 0;
                    }
#pragma unroll
                    for (int u = 0; u < 8; u++) {
                        int j = t0 + j0 + u;
                        if (j0 + u >= tl) break;
                        walk_step(make_float2(msa[j], vsa[j]), vv[u], sum[t], acc[t]);
                    }
                }
            }
        }
    }
    float* o = out + (size_t)r * n_head * hd + h * hd;
    for (int t = 0; t < 2; t++) {
        int d = threadIdx.x + t * blockDim.x;
        if (d < hd) o[d] = h2f(acc[t]) * (1.0f / sum[t]);
    }
}

// A level of score64's tree: slot l plus slot l + O, for l < O.
template <int O>
__device__ __forceinline__ void tree_sum(float (&a)[64]) {
#pragma unroll
    for (int l = 0; l < O; l++) a[l] = __fadd_rn(a[l], a[l + O]);
}

// 64 of a key's f16 values (16-byte aligned), 8 a load.
__device__ __forceinline__ void key_words(const u16* kr, uint4 (&kw)[8]) {
#pragma unroll
    for (int w = 0; w < 8; w++) kw[w] = ((const uint4*)kr)[w];
}

// score64 of one position by one thread (hd a multiple of 64): the same 64 slots, then the
// same tree of sums, bit for bit; the key's first 64 values (kw) loaded by the caller.
__device__ __forceinline__ float score_row(const float* qs, const u16* kr, int hd,
                                           uint4 (&kw)[8]) {
    float a[64];
#pragma unroll
    for (int i = 0; i < 64; i++) a[i] = 0.0f;
    for (int i = 0; i < hd; i += 64) {
        if (i > 0) key_words(kr + i, kw);
#pragma unroll
        for (int w = 0; w < 8; w++) {
            unsigned ws[4] = {kw[w].x, kw[w].y, kw[w].z, kw[w].w};
#pragma unroll
            for (int e = 0; e < 4; e++) {
                int d = 8 * w + 2 * e;
                a[d] = __fadd_rn(a[d], __fmul_rn(h2f((u16)(ws[e] & 0xffffu)), qs[i + d]));
                a[d + 1] = __fadd_rn(a[d + 1], __fmul_rn(h2f((u16)(ws[e] >> 16)), qs[i + d + 1]));
            }
        }
    }
    tree_sum<32>(a);
    tree_sum<16>(a);
    tree_sum<8>(a);
    tree_sum<4>(a);
    tree_sum<2>(a);
    tree_sum<1>(a);
    return a[0];
}

// A chunk of attention_rows: as many positions as 32 KiB of values (its tile, in dynamic
// shared memory) hold.
#define AR_TILE_BYTES 32768

// attention's numerics for a few rows (decoding) and heads of 64, 128 or 256 values, in
// fewer steps: a chunk of 16384 / hd positions at a time, thread t scoring position t alone
// (score_row; its key's loads issued before anything waits), the running maxima one scan
// over the block, each thread the factors (msa, vsa) of its own position; the chunk's
// values copied to shared memory (16 bytes at a time) while it scores; then the walk, thread
// d over output value d, as attention's (eight positions' loads ahead of their chain).
// Blocks of 256 threads (a chunk's positions and a head's values a thread each).
extern "C" __global__ void __launch_bounds__(256) attention_rows(
    const float* q, const u16* kc, const u16* vc, int rows, int n_head, int n_kv, int hd,
    const int* pos_p, float scale, int window, float softcap, float* out) {
    step_start();
    extern __shared__ __align__(16) u16 ar_vt[];
    __shared__ __align__(16) float qs[256];
    __shared__ float2 mv[256];
    __shared__ float wmax[8];
    int t = threadIdx.x, lane = t & 31, warp = t >> 5, warps = blockDim.x >> 5;
    // Unsigned divisions (shorter), and shifts by hd's log2.
    int r = rows == 1 ? 0 : (unsigned)blockIdx.x / (unsigned)n_head;
    int h = blockIdx.x - r * n_head;
    int kvh = (unsigned)h / ((unsigned)n_head / (unsigned)n_kv), width = n_kv * hd;
    int off = kvh * hd, lg = __ffs(hd) - 1;
    int p = *pos_p + r;
    int start = window > 0 ? max(0, p + 1 - window) : 0;
    int len = p + 1 - start;
    const float* qh = q + ((size_t)r * n_head + h) * hd;
    // q rounded to f16 once.
    for (int d = t; d < hd; d += blockDim.x) qs[d] = h2f(f2h(qh[d]));
    int chunk = AR_TILE_BYTES / 2 >> lg;
    // The tile's copy: lane = piece `w` (8 values) of position `sub` of each group of `per`.
    int per = 256 >> lg, sub = lane >> (lg - 3), w = lane & ((hd >> 3) - 1);
    float sum = 0.0f, m_prev = NEG_INF;
    u16 acc = 0;
    for (int c0 = 0; c0 < len; c0 += chunk) {
        int cl = min(chunk, len - c0);
        const u16* kr = kc + (size_t)(start + c0 + min(t, cl - 1)) * width + off;
        uint4 kw[8];
        key_words(kr, kw);
        __syncthreads();  // q is in qs; the chunk before is walked
        for (int j = sub < per ? warp * per + sub : cl; j < cl; j += warps * per) {
            const u16* src = vc + (size_t)(start + c0 + j) * width + off + 8 * w;
            u16* dst = ar_vt + j * hd + 8 * w;
#if __CUDA_ARCH__ >= 800
            unsigned sa = (unsigned)__cvta_generic_to_shared(dst);
            asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(sa), "l"(src));
#else
            *(uint4*)dst = *(const uint4*)src;
#endif
        }
#if __CUDA_ARCH__ >= 800
        asm volatile("cp.async.commit_group;" ::: "memory");
#endif
        float s = NEG_INF;
        if (t < cl) s = capped(score_row(qs, kr, hd, kw), scale, softcap);
        float total;
        float run = running_max(s, m_prev, wmax, total);
        if (t < cl) {
            float e = exp_rn(s > run ? run - s : s - run);
            mv[t] = s > run ? make_float2(e, 1.0f) : make_float2(1.0f, e);
        }
        m_prev = total;
        v_tile_wait();
        if (t < hd) {
            const u16* vcol = ar_vt + t;
            int j0 = 0;
            for (; j0 + 8 <= cl; j0 += 8) {
                u16 vv[8];
                float2 fs[8];
#pragma unroll
                for (int u = 0; u < 8; u++) {
                    vv[u] = vcol[(j0 + u) << lg];
                    fs[u] = mv[j0 + u];
                }
#pragma unroll
                for (int u = 0; u < 8; u++) walk_step(fs[u], vv[u], sum, acc);
            }
            for (; j0 < cl; j0++) walk_step(mv[j0], vcol[j0 << lg], sum, acc);
        }
    }
    if (t < hd) out[((size_t)r * n_head + h) * hd + t] = h2f(acc) * (1.0f / sum);
}

__device__ float v_expf(float x);

// Causal attention of batches of 64 query rows or more, in the numerics the CPU backend takes
// for them (ggml-cpu's tiled flash attention, `realm_kernels::kernels::attend_row_tiled`): q
// in f32; positions in tiles of 64 aligned to position 0; thread t scores position tile + t
// as one FMA chain over the head, times the scale (then soft-capped), -inf outside [start,
// p]; a tile whose scores are all -inf is skipped; when the tile's maximum raises the
// running one, what was summed is scaled by e^(old - new) (exp_rn, as the CPU's); weights
// ggml_v_expf(s - max), summed per 16 positions (_mm512_reduce_add_ps's order) into an f64
// tile sum; values accumulate in f32 by FMA in position order; then times 1 / sum.
//
// A block of 64 · hpb threads takes one row and hpb heads of one KV group (64 threads a
// head, thread t holding values t, t + 64, …: NT of them), so that the group's heads read
// each key and value once from L2 (the others hit L1). NT is the head size's 64s, rounded
// up: 1 (heads of up to 64 values), 2 (128) or 8 (512), one kernel each, so that heads of
// 64 values do not hold registers for 512.
// One position's step of two values' chains: w times the f16 pair v (low half first).
__device__ __forceinline__ void pair_fma(float w, unsigned v, float& a0, float& a1) {
    a0 = fmaf(w, h2f((u16)(v & 0xffffu)), a0);
    a1 = fmaf(w, h2f((u16)(v >> 16)), a1);
}

#define AT_HEADS 4
#ifndef AT_PAIRS
#define AT_PAIRS 1
#endif
template <int NT>
__device__ __forceinline__ void attention_tiled_body(const float* q, const u16* kc,
                                                     const u16* vc, int n_head, int n_kv,
                                                     int hd, const int* pos_p, float scale,
                                                     int window, float softcap, int hpb,
                                                     float* out) {
    step_start();
    __shared__ float qs[AT_HEADS][512], ws[AT_HEADS][64], part[AT_HEADS][4], tmax[AT_HEADS][2];
    int pos = *pos_p;
    int groups = n_head / hpb;
    int tid = threadIdx.x, hg = tid >> 6, lt = tid & 63, lane = tid & 31, warp = lt >> 5;
    int r = blockIdx.x / groups, h = (blockIdx.x % groups) * hpb + hg;
    int kvh = h / (n_head / n_kv), width = n_kv * hd;
    int p = pos + r;
    int start = window > 0 ? max(0, p + 1 - window) : 0;
    const float* qh = q + (size_t)r * n_head * hd + h * hd;
    float* qv = qs[hg];
    float* wv = ws[hg];
    for (int d = lt; d < hd; d += 64) qv[d] = qh[d];
    const u16* kh = kc + kvh * hd;
    const u16* vh = vc + kvh * hd;
    // Heads of up to 128 values (an even number: the host sends odd ones to the NT = 8
    // kernel) take their values in pairs: thread t values 2t and 2t + 1 (one 4-byte load a
    // position for both, and for heads of 64 the second warp idle), each value still its
    // own chain over the positions. AT_PAIRS=0: a value a thread, NT apart (comparisons).
    constexpr bool PAIRS = AT_PAIRS && NT <= 2;
    constexpr int NO = PAIRS ? 2 : NT;
    float o[NO];
#pragma unroll
    for (int i = 0; i < NO; i++) o[i] = 0.0f;
    float m = NEG_INF, sum = 0.0f;
    __syncthreads();
    for (int tile = start / 64 * 64; tile <= p; tile += 64) {
        int t = tile + lt;
        float s = NEG_INF;
        if (t >= start && t <= p) {
            const u16* kr = kh + (size_t)t * width;
            float a = 0.0f;
            if (hd % 8 == 0) {
                // Eight keys a load (rows and heads of a multiple of 8 values: 16-byte aligned).
                for (int d = 0; d < hd; d += 8) {
                    uint4 w = *(const uint4*)(kr + d);
                    unsigned ws4[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
                    for (int i = 0; i < 4; i++) {
                        a = fmaf(qv[d + 2 * i], h2f((u16)(ws4[i] & 0xffff)), a);
                        a = fmaf(qv[d + 2 * i + 1], h2f((u16)(ws4[i] >> 16)), a);
                    }
                }
            } else {
                for (int d = 0; d < hd; d++) a = fmaf(qv[d], h2f(kr[d]), a);
            }
            s = __fadd_rn(capped(a, scale, softcap), 0.0f);
        }
        float mx = s;
        for (int o2 = 16; o2 > 0; o2 >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, o2));
        if (lane == 0) tmax[hg][warp] = mx;
        __syncthreads();
        float tile_max = fmaxf(tmax[hg][0], tmax[hg][1]);
        // (A head's scores: its tile may be all -inf while another head's is not, so the
        // barriers below are the whole block's, outside the test.)
        bool live = tile_max != NEG_INF;
        if (live) {
            float m_new = fmaxf(m, tile_max);
            if (m_new > m) {
                float ms = exp_rn(m - m_new);
#pragma unroll
                for (int i = 0; i < NO; i++) o[i] *= ms;
                sum *= ms;
            }
            m = m_new;
            float w = v_expf(s - m_new);
            wv[lt] = w;
            // _mm512_reduce_add_ps over each 16 positions: halves, quarters, then pairs.
            float x = __fadd_rn(w, __shfl_down_sync(0xffffffff, w, 8));
            x = __fadd_rn(x, __shfl_down_sync(0xffffffff, x, 4));
            x = __fadd_rn(x, __shfl_down_sync(0xffffffff, x, 2));
            x = __fadd_rn(x, __shfl_down_sync(0xffffffff, x, 1));
            if ((lt & 15) == 0) part[hg][lt >> 4] = x;
        }
        __syncthreads();
        if (live) {
            double ts = 0.0;
            for (int i = 0; i < 4; i++) ts += (double)part[hg][i];
            sum = (float)((double)sum + ts);
            // The tile's valid positions, in order, for each of the thread's values.
            int lo = max(tile, start), hi = min(tile + 64, p + 1);
            if (PAIRS && 2 * lt < hd) {
                const unsigned* vp = (const unsigned*)(vh + 2 * lt);
                size_t words = width / 2;
                float a0 = o[0], a1 = o[1];
                int j = lo;
                for (; j + 8 <= hi; j += 8) {
                    unsigned vv[8];
#pragma unroll
                    for (int u = 0; u < 8; u++) vv[u] = vp[(size_t)(j + u) * words];
#pragma unroll
                    for (int u = 0; u < 8; u++) pair_fma(wv[j + u - tile], vv[u], a0, a1);
                }
                for (; j < hi; j++) pair_fma(wv[j - tile], vp[(size_t)j * words], a0, a1);
                o[0] = a0;
                o[1] = a1;
            }
#pragma unroll
            for (int i = 0; i < NT; i++) {
                if (PAIRS) break;
                int d = lt + 64 * i;
                if (d >= hd) break;
                const u16* vcol = vh + d;
                float acc = o[i];
                int j = lo;
                for (; j + 8 <= hi; j += 8) {
                    u16 vv[8];
#pragma unroll
                    for (int u = 0; u < 8; u++) vv[u] = vcol[(size_t)(j + u) * width];
#pragma unroll
                    for (int u = 0; u < 8; u++) acc = fmaf(wv[j + u - tile], h2f(vv[u]), acc);
                }
                for (; j < hi; j++) acc = fmaf(wv[j - tile], h2f(vcol[(size_t)j * width]), acc);
                o[i] = acc;
            }
        }
        __syncthreads();  // ws, part and tmax are rewritten by the next tile
    }
    float inv = sum == 0.0f ? 0.0f : 1.0f / sum;
    float* orow = out + (size_t)r * n_head * hd + h * hd;
    if (PAIRS) {
        if (2 * lt < hd) {
            orow[2 * lt] = o[0] * inv;
            orow[2 * lt + 1] = o[1] * inv;
        }
        return;
    }
#pragma unroll
    for (int i = 0; i < NT; i++) {
        int d = lt + 64 * i;
        if (d < hd) orow[d] = o[i] * inv;
    }
}

#define AT_ARGS                                                                              \
    const float *q, const u16 *kc, const u16 *vc, int rows, int n_head, int n_kv, int hd,    \
        const int *pos_p, float scale, int window, float softcap, float *out, int hpb
#define AT_PASS q, kc, vc, n_head, n_kv, hd, pos_p, scale, window, softcap, hpb, out
extern "C" __global__ void __launch_bounds__(64 * AT_HEADS) attention_tiled(AT_ARGS) {
    attention_tiled_body<8>(AT_PASS);
}
extern "C" __global__ void __launch_bounds__(64 * AT_HEADS) attention_tiled1(AT_ARGS) {
    attention_tiled_body<1>(AT_PASS);
}
extern "C" __global__ void __launch_bounds__(64 * AT_HEADS) attention_tiled2(AT_ARGS) {
    attention_tiled_body<2>(AT_PASS);
}

// ggml's vectorized expf (`ggml_v_expf`), as the CPU backend computes it: a degree-5
// polynomial on the reduced argument, scaled by 2^n exactly in f64.
__device__ float v_expf(float x) {
    const float shift = __uint_as_float(0x4b400000u);
    float z = fmaf(x, __uint_as_float(0x3fb8aa3bu), shift);
    float n = z - shift;
    float b = fmaf(-n, __uint_as_float(0x35bfbe8eu), fmaf(-n, __uint_as_float(0x3f317200u), x));
    float u = b * b;
    float j = fmaf(fmaf(fmaf(__uint_as_float(0x3c072010u), b, __uint_as_float(0x3d2b9f17u)), u,
                        fmaf(__uint_as_float(0x3e2aaf33u), b, __uint_as_float(0x3efffedbu))),
                   u, fmaf(__uint_as_float(0x3f7ffff6u), b, 1.0f));
    if (fabsf(n) > 192.0f) return n <= 0.0f ? 0.0f : __int_as_float(0x7f800000);
    double two_n = __longlong_as_double((long long)((long long)n + 1023) << 52);
    return (float)((double)j * two_n);
}

// ggml's GELU (tanh form) of a value rounded to f16, rounded to f16 (its lookup table).
__device__ float gelu_f16(float x) {
    if (x <= -10.0f) return 0.0f;
    if (x >= 10.0f) return x;
    float h = h2f(f2h(x));
    float inner = fmaf(0.044715f * h, h, 1.0f);
    float g = 0.5f * h * (1.0f + (float)tanh((double)(0.7978846f * h * inner)));
    return h2f(f2h(g));
}

// The gate's activation (0: SiLU, 1: GELU, tanh form), as the CPU backend's.
__device__ __forceinline__ float glu_act(float g, int act) {
    return act == 0 ? g / (1.0f + v_expf(0.0f - g)) : gelu_f16(g);
}

// up = act(gate) * up, as the CPU backend.
extern "C" __global__ void glu(const float* gate, float* up, int n, int act) {
    step_start();
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    up[i] *= glu_act(gate[i], act);
}

extern "C" __global__ void add(float* acc, const float* x, int n) {
    step_start();
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) acc[i] += x[i];
}

extern "C" __global__ void scale(float* x, int n, float s) {
    step_start();
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] *= s;
}

// Softmax of each row, one block per row.
extern "C" __global__ void softmax(float* x, int cols) {
    step_start();
    __shared__ float red[32];
    float* row = x + (size_t)blockIdx.x * cols;
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    float m = NEG_INF;
    for (int i = threadIdx.x; i < cols; i += blockDim.x) m = fmaxf(m, row[i]);
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_down_sync(0xffffffff, m, o));
    if (lane == 0) red[warp] = m;
    __syncthreads();
    if (threadIdx.x == 0) {
        float t = red[0];
        for (int i = 1; i < warps; i++) t = fmaxf(t, red[i]);
        red[0] = t;
    }
    __syncthreads();
    m = red[0];
    __syncthreads();
    float s = 0;
    for (int i = threadIdx.x; i < cols; i += blockDim.x) {
        float e = expf(row[i] - m);
        row[i] = e;
        s += e;
    }
    s = warp_sum(s);
    if (lane == 0) red[warp] = s;
    __syncthreads();
    if (threadIdx.x == 0) {
        float t = 0;
        for (int i = 0; i < warps; i++) t += red[i];
        red[0] = t;
    }
    __syncthreads();
    float inv = 1.0f / red[0];
    for (int i = threadIdx.x; i < cols; i += blockDim.x) row[i] *= inv;
}

// The last row to the front (keep_last_row).
extern "C" __global__ void last_row(float* x, int rows, int cols) {
    step_start();
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < cols) x[i] = x[(size_t)(rows - 1) * cols + i];
}

// Activations quantized as ggml's quantize_row_q8_0 / q8_1 (the CPU backend's numerics:
// scale amax/127 stored in f16, values rounded half to even; q8_1 also stores d·Σq), one
// warp per 32-value block: rows × k/32 blocks of 34 (q8_0) or 36 (q8_1) bytes.
// A 32-value block's quantization, lane's value v (every lane gets d and d·Σq in f16, its
// quant in q).
struct Q8v {
    u16 d, s;
    int q;
};
__device__ __forceinline__ Q8v q8_of(float v, int q81) {
    float amax = fabsf(v);
    for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffff, amax, o));
    float d = amax / 127.0f;
    float id = amax != 0.0f ? 127.0f / amax : 0.0f;
    int q = (int)rintf(v * id);
    int sum = q;
    for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffff, sum, o);
    return {f2h(d), q81 ? f2h(d * (float)sum) : (u16)0, q};
}

// One 32-value block, lane's value v: d (f16) at b, d·Σq (f16) at b + 2 for q81, the
// quants at b + at.
__device__ __forceinline__ void q8_quantize(float v, int lane, int q81, u8* b, int at) {
    Q8v r = q8_of(v, q81);
    if (lane == 0) {
        b[0] = r.d & 255;
        b[1] = r.d >> 8;
        if (q81) {
            b[2] = r.s & 255;
            b[3] = r.s >> 8;
        }
    }
    b[at + lane] = (u8)(signed char)r.q;
}

__device__ __forceinline__ void q8_block(const float* x, int blk, int lane, int q81, u8* out) {
    q8_quantize(x[(size_t)blk * 32 + lane], lane, q81, out + (size_t)blk * (q81 ? 36 : 34),
                q81 ? 4 : 2);
}

extern "C" __global__ void quantize_q8(const float* x, int rows, int k, int q81, u8* out) {
    step_start();
    int blk = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    if (blk >= rows * (k / 32)) return;
    q8_block(x, blk, threadIdx.x & 31, q81, out);
}

// The 32-value quants' products in the CPU backend's order (ggml's AVX2
// vec_dot_q*_q8_*, as `realm_kernels::quant` computes it), bit for bit: for each output,
// eight slots, slot l summing the integer products of values 4l..4l+3 of each block (one
// dp4a) and accumulating acc_l = fma(d_w·d_x, sum, acc_l) over the blocks in order;
// Q4_1/Q5_1's m·s terms in a side chain fma(m_w, s_x, summs) in block order; then ggml's
// hsum_float_8 of the eight slots, plus the side sum. Every kernel below keeps that order
// and only spreads the rest (columns, rows, the integer work) over threads.

// Four bytes at a 2-byte aligned p (q8_0's 34-byte blocks), as two halves.
__device__ __forceinline__ int ld4h(const u8* p) {
    const u16* h = (const u16*)p;
    return (int)((unsigned)h[0] | ((unsigned)h[1] << 16));
}

__device__ __forceinline__ int ld4(const u8* p) {
    return (int)((unsigned)p[0] | ((unsigned)p[1] << 8) | ((unsigned)p[2] << 16) |
                 ((unsigned)p[3] << 24));
}

// Blocks a lane of the fused matvec holds per chunk (Q5 types half as many); a macro so
// that variants can be compared (REALM_CUDA_DEFINES).
#ifndef MV_CH
#define MV_CH 16
#endif
// Whether the fused matvec prefetches its warp's later weight chunks into L2.
#ifndef MV_PREFETCH
#define MV_PREFETCH 1
#endif
// A 32-value quant's block layout, per type.
template <int TY>
struct Q32 {
    static constexpr int BB = TY == T_Q4_0 ? 18 : TY == T_Q4_1 ? 20 : TY == T_Q5_0 ? 22
                            : TY == T_Q5_1 ? 24 : 34;
    static constexpr int Q81 = TY == T_Q4_1 || TY == T_Q5_1;
    static constexpr int Q5 = TY == T_Q5_0 || TY == T_Q5_1;
    // Where the quants start; the high bits (Q5) at 2 or 4.
    static constexpr int QS = TY == T_Q4_0 || TY == T_Q8_0 ? 2 : TY == T_Q4_1 ? 4
                            : TY == T_Q5_0 ? 6 : 8;
    // Blocks a lane's registers hold per chunk (two chunks: the next one's loads in flight):
    // Q5's blocks take three words a lane, the others two.
    static constexpr int CH = Q5 ? MV_CH / 2 : MV_CH;
};

// Four bytes at p: one word where the block size keeps words aligned, else two halves.
template <int TY>
__device__ __forceinline__ unsigned ld_word(const u8* p) {
    if (Q32<TY>::BB % 4 == 0) return *(const unsigned*)p;
    const u16* h = (const u16*)p;
    return (unsigned)h[0] | ((unsigned)h[1] << 16);
}

// What slot l of a block needs: its header (d, and m at bits 16.. for Q4_1/Q5_1), the high
// bits (Q5) and the quant word of values 4l..4l+3.
struct WSlot {
    unsigned h, qh, qs;
};
template <int TY>
__device__ __forceinline__ WSlot w_slot(const u8* wb, int l) {
    typedef Q32<TY> Q;
    WSlot r;
    r.h = Q::Q81 ? *(const unsigned*)wb : (unsigned)*(const u16*)wb;
    r.qh = Q::Q5 ? ld_word<TY>(wb + Q::QS - 4) : 0u;
    r.qs = ld_word<TY>(wb + Q::QS + (TY == T_Q8_0 ? 4 * l : 4 * (l & 3)));
    return r;
}

// Values 4l..4l+3 of the block as four signed bytes (for dp4a against x's bytes 4l..):
// low nibbles of bytes 4l.. for l < 4, high nibbles of bytes 4(l-4).. after.
template <int TY>
__device__ __forceinline__ int w_vals(const WSlot& w, int l) {
    if (TY == T_Q8_0) return (int)w.qs;
    unsigned nib = l < 4 ? w.qs & 0x0f0f0f0fu : (w.qs >> 4) & 0x0f0f0f0fu;
    if (TY == T_Q4_0) return (int)__vsub4(nib, 0x08080808u);
    if (TY == T_Q4_1) return (int)nib;
    unsigned h = (w.qh >> (4 * l)) & 15u;
    nib |= ((h & 1u) << 4) | ((h & 2u) << 11) | ((h & 4u) << 18) | ((h & 8u) << 25);
    return TY == T_Q5_1 ? (int)nib : (int)__vsub4(nib, 0x10101010u);
}

// w_vals of a block of runtime type ty.
__device__ __forceinline__ int w4(const u8* wb, int ty, int l) {
    switch (ty) {
        case T_Q4_0: return w_vals<T_Q4_0>(w_slot<T_Q4_0>(wb, l), l);
        case T_Q4_1: return w_vals<T_Q4_1>(w_slot<T_Q4_1>(wb, l), l);
        case T_Q5_0: return w_vals<T_Q5_0>(w_slot<T_Q5_0>(wb, l), l);
        case T_Q5_1: return w_vals<T_Q5_1>(w_slot<T_Q5_1>(wb, l), l);
        default: return w_vals<T_Q8_0>(w_slot<T_Q8_0>(wb, l), l);
    }
}

// All eight dp4a words of a block (w_vals of slots 0..7), its header loaded once.
template <int TY>
__device__ __forceinline__ void w_block(const u8* wb, int (&v)[8], float& d, float& m) {
    typedef Q32<TY> Q;
    WSlot s;
    s.h = Q::Q81 ? *(const unsigned*)wb : (unsigned)*(const u16*)wb;
    s.qh = Q::Q5 ? ld_word<TY>(wb + Q::QS - 4) : 0u;
    d = h2f((u16)(s.h & 0xffffu));
    m = Q::Q81 ? h2f((u16)(s.h >> 16)) : 0.0f;
#pragma unroll
    for (int i = 0; i < (TY == T_Q8_0 ? 8 : 4); i++) {
        s.qs = ld_word<TY>(wb + Q::QS + 4 * i);
        v[i] = w_vals<TY>(s, i);
        if (TY != T_Q8_0) v[i + 4] = w_vals<TY>(s, i + 4);
    }
}

// w_block of a block of runtime type ty.
__device__ __forceinline__ void w8(const u8* wb, int ty, int (&v)[8], float& d, float& m) {
    switch (ty) {
        case T_Q4_0: w_block<T_Q4_0>(wb, v, d, m); break;
        case T_Q4_1: w_block<T_Q4_1>(wb, v, d, m); break;
        case T_Q5_0: w_block<T_Q5_0>(wb, v, d, m); break;
        case T_Q5_1: w_block<T_Q5_1>(wb, v, d, m); break;
        default: w_block<T_Q8_0>(wb, v, d, m); break;
    }
}

// Eight words to 16-byte aligned shared memory, in two stores.
__device__ __forceinline__ void st8(int* p, const int (&v)[8]) {
    *(int4*)p = make_int4(v[0], v[1], v[2], v[3]);
    *(int4*)(p + 4) = make_int4(v[4], v[5], v[6], v[7]);
}

// hsum_float_8 over the slots of eight consecutive lanes (slot = lane % 8): r_i = a_{i+4}
// + a_i, then (r0 + r2) + (r1 + r3), in the group's first lane.
__device__ __forceinline__ float hsum8(float a) {
    float r = __fadd_rn(a, __shfl_down_sync(0xffffffff, a, 4, 8));
    float t = __fadd_rn(r, __shfl_down_sync(0xffffffff, r, 2, 8));
    return __fadd_rn(t, __shfl_down_sync(0xffffffff, t, 1, 8));
}

// A few rows (decoding): one warp per column, lane = 8j + l taking slot l of blocks
// j + 4u (u < 4) of each 16: the loads (all four ahead) and integer products in parallel,
// the f32 chains in block order by lanes 0-7. Each group's weight bytes are first copied
// into shared memory by the whole warp, two bytes a lane at a time (coalesced; a lane's
// own byte-wise loads from global memory made the matvec latency-bound). x in
// quantize_q8's blocks (in shared or global memory). Blocks of 256 threads.
#define MATVEC_ROWS 8
__device__ __forceinline__ void matvec_q8_col(const u8* w, int ty, int k, int n, const u8* xq,
                                              int rows, float* y, int col, int lane) {
    int nb = k / 32, bb = block_bytes(ty);
    int q81 = ty == T_Q4_1 || ty == T_Q5_1;
    int xbytes = q81 ? 36 : 34, xat = q81 ? 4 : 2;
    int j = lane >> 3, l = lane & 7;
    const u8* wr = w + (size_t)col * nb * bb;
    __shared__ __align__(4) u8 wgroups[8][16 * 34];
    u8* wg = wgroups[(threadIdx.x >> 5) & 7];
    float acc[MATVEC_ROWS], summs[MATVEC_ROWS];
#pragma unroll
    for (int r = 0; r < MATVEC_ROWS; r++) acc[r] = summs[r] = 0.0f;
    for (int g = 0; g < nb; g += 16) {
        int live = min(16, nb - g);
        const unsigned short* src = (const unsigned short*)(wr + (size_t)g * bb);
        __syncwarp();
        for (int i = lane; i < live * bb / 2; i += 32) ((unsigned short*)wg)[i] = src[i];
        __syncwarp();
        int bi[4], wq[4];
        float dw[4], mw[4];
#pragma unroll
        for (int u = 0; u < 4; u++) {
            int local = min(j + 4 * u, live - 1);
            bi[u] = g + local;
            const u8* wb = wg + local * bb;
            wq[u] = w4(wb, ty, l);
            dw[u] = h2f(rd16(wb));
            mw[u] = q81 ? h2f(rd16(wb + 2)) : 0.0f;
        }
#pragma unroll
        for (int r = 0; r < MATVEC_ROWS; r++) {
            if (r >= rows) break;
            int sum[4];
            float d[4], sx[4];
#pragma unroll
            for (int u = 0; u < 4; u++) {
                const u8* xb = xq + ((size_t)r * nb + bi[u]) * xbytes;
                sum[u] = __dp4a(wq[u], ld4(xb + xat + 4 * l), 0);
                d[u] = __fmul_rn(dw[u], h2f(rd16(xb)));
                sx[u] = q81 ? h2f(rd16(xb + 2)) : 0.0f;
            }
#pragma unroll
            for (int u = 0; u < 4; u++)
#pragma unroll
                for (int jj = 0; jj < 4; jj++) {
                    // Block g + 4u + jj: lane l + 8jj's u-th.
                    float dj = __shfl_sync(0xffffffff, d[u], l + 8 * jj);
                    int sj = __shfl_sync(0xffffffff, sum[u], l + 8 * jj);
                    float mj = __shfl_sync(0xffffffff, mw[u], l + 8 * jj);
                    float xj = __shfl_sync(0xffffffff, sx[u], l + 8 * jj);
                    if (4 * u + jj < live) {
                        acc[r] = fmaf(dj, (float)sj, acc[r]);
                        summs[r] = fmaf(mj, xj, summs[r]);
                    }
                }
        }
    }
#pragma unroll
    for (int r = 0; r < MATVEC_ROWS; r++) {
        if (r >= rows) break;
        float s = hsum8(acc[r]);
        if (lane == 0) y[(size_t)r * n + col] = q81 ? __fadd_rn(s, summs[r]) : s;
    }
}

// At most MATVEC_ROWS rows, x already quantized in global memory.
extern "C" __global__ void matmul_q8(const u8* w, int ty, int k, int n, const u8* xq, int rows,
                                     float* y) {
    step_start();
    int warp = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    if (warp >= n) return;
    matvec_q8_col(w, ty, k, n, xq, rows, y, warp, threadIdx.x & 31);
}

// What a fused matvec does around its product (the launches it replaces, merged by the
// host): an RMS norm of x's rows first (`nw`: the norm's weight; every block computes the
// row's scale exactly as rms_norm does, in blocks of 256 threads, and the first block
// writes the normed rows to `xo`, the norm's output), and `acc += y` after (the add that
// followed the product). With w2 (a layer's up weight, w its gate's), each warp computes
// both products' columns and applies the GLU that followed them: y = gate,
// y2 = act(gate) · up. With `rtab` (matmul_q8_fused's q, k and v products: normal-mode
// RoPE), the RoPE launch that followed: product 0's (q) and 1's (k) columns rotated as
// rope_pair rotates them, k and v (product 2) also stored in the cache rows of their
// positions (kc, vc) as f16. `prod`: which of the launch's products the block computes.
struct Fuse {
    const float* nw;
    float eps;
    float* xo;
    float* acc;
    const u8* w2;
    float* y2;
    int act;
    const float* rtab;
    const int* rpos;
    int rhd, rrot;
    u16 *kc, *vc;
    int prod;
};

// A q/k/v column's output s for row q after RoPE (see Fuse; s as every lane of the warp
// holds it: the pair's other column is in lane ^ 8, the columns of lanes 8c being col0 + c
// with col0 a multiple of 4), and the cache store of k and v by the lane that writes y.
__device__ __forceinline__ float fused_rope(const Fuse& f, float s, int q, int col, int n,
                                            bool store) {
    float other = __shfl_xor_sync(0xffffffff, s, 8);
    int pos = *f.rpos + q, j = col % f.rhd;
    float y = s;
    if (f.prod < 2 && j < f.rrot) {
        const float* cs = f.rtab + ((size_t)pos * (f.rrot / 2) + j / 2) * 2;
        float c = cs[0], sn = cs[1];
        y = (j & 1) == 0 ? fmaf(s, c, -__fmul_rn(other, sn)) : fmaf(other, sn, __fmul_rn(s, c));
    }
    if (store && f.prod > 0) (f.prod == 1 ? f.kc : f.vc)[(size_t)pos * n + col] = f2h(y);
    return y;
}

// rms_norm's scale of each of x's rows (k values) into rs (rms_scale's, as rms_norm's).
__device__ __forceinline__ void norm_scales(const float* x, int rows, int k, float eps,
                                            float* rs) {
    for (int q = 0; q < rows; q++) {
        float scale = rms_scale(x + (size_t)q * k, k, eps);
        if (threadIdx.x == 0) rs[q] = scale;
    }
    __syncthreads();
}

// Value i of row q of the product's input: x's, or its normed value (written to xo by the
// first block).
__device__ __forceinline__ float fused_in(const float* x, const Fuse& f, const float* rs, int q,
                                          int k, int i) {
    float v = x[(size_t)q * k + i];
    if (!f.nw) return v;
    v = (v * rs[q]) * f.nw[i];
    if (blockIdx.x == 0) f.xo[(size_t)q * k + i] = v;
    return v;
}

// A column's output s for row q at `at` (lane 0's): y, and acc += y; or with a GLU, the gate
// (pass 0, kept in `gate` for the same column's pass 1) and then act(gate) · up into y2.
__device__ __forceinline__ void fused_out(const Fuse& f, float* y, size_t at, float s, int pass,
                                          float& gate) {
    if (pass == 1) {
        f.y2[at] = s * glu_act(gate, f.act);
        return;
    }
    y[at] = s;
    gate = s;
    if (f.acc) f.acc[at] = __fadd_rn(f.acc[at], s);
}

// 32 floats at p, by 16-byte loads when `v4` (p 16-byte aligned).
__device__ __forceinline__ void load32(const float* p, bool v4, float (&v)[32]) {
    if (v4) {
#pragma unroll
        for (int w = 0; w < 8; w++) {
            float4 a = ((const float4*)p)[w];
            v[4 * w] = a.x, v[4 * w + 1] = a.y, v[4 * w + 2] = a.z, v[4 * w + 3] = a.w;
        }
    } else {
#pragma unroll
        for (int j = 0; j < 32; j++) v[j] = p[j];
    }
}

// x's rows as 40-byte q8 blocks in shared memory: d and d·Σq (q8_1; else 0) as f32, then
// the 32 quants at 8. A thread a block (the values quantize_q8 makes, with no shuffles: a
// block's maximum and sum do not depend on their order), its 32 values (normed as fused_in
// norms them) loaded 16 bytes at a time where x and the norm weight are so aligned.
__device__ __forceinline__ void q8_rows_smem(const float* x, int rows, int k, int q81,
                                             const Fuse& f, const float* rs, u8* xs) {
    int nb = k / 32;
    bool v4 = (((size_t)x | (size_t)f.nw) & 15) == 0;
    for (int i = threadIdx.x; i < rows * nb; i += blockDim.x) {
        int q = rows == 1 ? 0 : i / nb, blk = i - q * nb;
        size_t at = (size_t)q * k + blk * 32;
        float v[32];
        load32(x + at, v4, v);
        if (f.nw) {
            float n[32];
            load32(f.nw + blk * 32, v4, n);
#pragma unroll
            for (int j = 0; j < 32; j++) {
                v[j] = (v[j] * rs[q]) * n[j];
                if (blockIdx.x == 0) f.xo[at + j] = v[j];
            }
        }
        float m[16];
#pragma unroll
        for (int j = 0; j < 16; j++) m[j] = fmaxf(fabsf(v[j]), fabsf(v[j + 16]));
#pragma unroll
        for (int o = 8; o > 0; o /= 2) {
#pragma unroll
            for (int j = 0; j < o; j++) m[j] = fmaxf(m[j], m[j + o]);
        }
        float amax = m[0];
        float d = amax / 127.0f;
        float id = amax != 0.0f ? 127.0f / amax : 0.0f;
        int sum = 0;
        unsigned words[8];
#pragma unroll
        for (int w = 0; w < 8; w++) {
            unsigned word = 0;
#pragma unroll
            for (int e = 0; e < 4; e++) {
                int qv = (int)rintf(v[4 * w + e] * id);
                sum += qv;
                word |= ((unsigned)qv & 255u) << (8 * e);
            }
            words[w] = word;
        }
        u8* b = xs + (size_t)i * 40;
        ((float*)b)[0] = h2f(f2h(d));
        ((float*)b)[1] = q81 ? h2f(f2h(d * (float)sum)) : 0.0f;
#pragma unroll
        for (int w = 0; w < 8; w++) ((unsigned*)(b + 8))[w] = words[w];
    }
}

// A chunk of a warp's work: its columns (c: which column, matmul_q8k_fused; which four,
// matmul_q8_fused), with a GLU both passes of a column, each column in chunks (ch); `next`
// steps through them in that order (no divisions: they would cost more than a chunk's sums).
struct Item {
    int c, pass, ch;
    __device__ __forceinline__ void next(int passes, int cpc) {
        if (++ch < cpc) return;
        ch = 0;
        if (++pass < passes) return;
        pass = 0;
        c++;
    }
};

template <int TY>
__device__ __forceinline__ void w_chunk(const u8* w, const Fuse& f, int col, int pass, int b0,
                                        int n, int nb, int l, WSlot (&r)[Q32<TY>::CH]) {
    const u8* wr = (pass ? f.w2 : w) + ((size_t)min(col, n - 1) * nb + b0) * Q32<TY>::BB;
#pragma unroll
    for (int b = 0; b < Q32<TY>::CH; b++) {
        if (b0 + b < nb) r[b] = w_slot<TY>(wr + b * Q32<TY>::BB, l);
    }
}

// quantize_q8 and the matvec in one launch, for a few rows (decoding). Lane 8c + l of a
// warp is slot l of column c of the warp's four (then the next four...): it walks the
// column's blocks in order, its own f32 chain with no data from other lanes, and
// hsum8 ends the column. Its weight words come straight from global memory, a chunk of
// Q32::CH blocks in registers while the chunk before is summed (the first chunk's loads issued
// before anything else). x is quantized by every block into shared memory first (the
// values quantize_q8 makes), 40 bytes a block: d and d·Σq as f32 (the f16 values
// converted), then the 32 quants. One kernel per type.
template <int TY, int R>
__device__ __forceinline__ void matvec_q8_fused(const u8* w, int k, int n, const float* x,
                                                int rows, float* y, const Fuse& f, int blk,
                                                int cpw) {
    typedef Q32<TY> Q;
    constexpr int CH = Q::CH;
    extern __shared__ __align__(16) u8 smem[];
    int lane = threadIdx.x & 31, wib = threadIdx.x >> 5, warps = blockDim.x >> 5;
    int cg = lane >> 3, l = lane & 7;
    int nb = k / 32, cpc = (nb + CH - 1) / CH;
    // The warp's columns col0.. (cpw of them, a multiple of 4): the same number of chunks
    // for every lane (lanes past the last column compute one and drop it).
    int col0 = (blk * warps + wib) * cpw;
    int passes = f.w2 ? 2 : 1;
    int cols = max(0, min(cpw, n - col0));
    int items = (cols + 3) / 4 * passes * cpc;
    WSlot cur[CH], nxt[CH];
    int col = col0 + cg;  // this lane's column of the chunk in `cur`
    if (items) {
        w_chunk<TY>(w, f, col, 0, 0, n, nb, l, cur);
#if MV_PREFETCH
        // The rest of the warp's weights (its columns' rows are one range) on their way to
        // L2, so that the later chunks' loads wait less.
        size_t bytes = (size_t)cols * nb * Q::BB;
        for (int pass = 0; pass < passes; pass++) {
            const u8* wr = (pass ? f.w2 : w) + (size_t)col0 * nb * Q::BB;
            for (size_t at = (size_t)lane * 128; at < bytes; at += 32 * 128)
                asm volatile("prefetch.global.L2 [%0];" ::"l"(wr + at));
        }
#endif
    }
    step_start();  // the first weights are on their way while the kernel before finishes
    __shared__ float rs[MATVEC_ROWS];
    if (f.nw) norm_scales(x, rows, k, f.eps, rs);
    q8_rows_smem(x, rows, k, Q::Q81, f, rs, smem);
    __syncthreads();
    float acc[R], summs[R], gate[R];
#pragma unroll
    for (int q = 0; q < R; q++) acc[q] = summs[q] = gate[q] = 0.0f;
    Item it = {0, 0, 0};
    for (int u = 0; u < items; u++) {
        Item nx = it;
        nx.next(passes, cpc);
        if (u + 1 < items)
            w_chunk<TY>(w, f, col0 + 4 * nx.c + cg, nx.pass, nx.ch * CH, n, nb, l, nxt);
        int b0 = it.ch * CH;
#pragma unroll
        for (int b = 0; b < CH; b++) {
            if (b0 + b >= nb) break;
            int wv = w_vals<TY>(cur[b], l);
            float dw = h2f((u16)(cur[b].h & 0xffffu));
            float mw = Q::Q81 ? h2f((u16)(cur[b].h >> 16)) : 0.0f;
#pragma unroll
            for (int q = 0; q < R; q++) {
                if (q >= rows) break;
                const u8* xb = smem + ((size_t)q * nb + b0 + b) * 40;
                float2 ds = *(const float2*)xb;
                int sum = __dp4a(wv, *(const int*)(xb + 8 + 4 * l), 0);
                acc[q] = fmaf(__fmul_rn(dw, ds.x), (float)sum, acc[q]);
                if (Q::Q81) summs[q] = fmaf(mw, ds.y, summs[q]);
            }
        }
        if (it.ch == cpc - 1) {
            // The column's last chunk: its outputs (lane 8c's).
            bool mine = col - col0 < cols;
#pragma unroll
            for (int q = 0; q < R; q++) {
                if (q >= rows) break;
                float s = hsum8(acc[q]);
                if (Q::Q81) s = __fadd_rn(s, summs[q]);
                if (f.rtab) s = fused_rope(f, s, q, col, n, l == 0 && mine);
                if (l == 0 && mine) fused_out(f, y, (size_t)q * n + col, s, it.pass, gate[q]);
                acc[q] = summs[q] = 0.0f;
            }
        }
        it = nx;
        col = col0 + 4 * it.c + cg;
#pragma unroll
        for (int b = 0; b < CH; b++) cur[b] = nxt[b];
    }
}

// The product a block of a merged launch serves (up to three of the same x, each in
// ceil(n / (warps · cpw)) blocks: cpw columns a warp; with a GLU only the first product's
// blocks, each warp doing both products' columns), its block index within it, and the Fuse.
struct Pick {
    const u8* w;
    int ty, n, blk;
    float* y;
    Fuse f;
};
__device__ __forceinline__ Pick pick(const u8* w0, int ty0, int n0, float* y0, const u8* w1,
                                     int ty1, int n1, float* y1, const u8* w2, int ty2, int n2,
                                     float* y2, const float* nw, float eps, float* xo,
                                     float* acc, int cpw, int glu, const float* rtab,
                                     const int* rpos, int rhd, int rrot, u16* rkc, u16* rvc) {
    int per = (blockDim.x >> 5) * cpw;
    int b0 = (n0 + per - 1) / per, b1 = glu >= 0 ? 0 : (n1 + per - 1) / per;
    int b = blockIdx.x;
    Fuse f = {nw, eps, xo, acc, glu >= 0 ? w1 : nullptr, y1, glu,
              rtab, rpos, rhd, rrot, rkc, rvc, 0};
    if (b < b0) return {w0, ty0, n0, b, y0, f};
    f.prod = 1;
    if (b < b0 + b1) return {w1, ty1, n1, b - b0, y1, f};
    f.prod = 2;
    return {w2, ty2, n2, b - b0 - b1, y2, f};
}

// quantize_q8 and matmul_q8 in one launch, for a few rows (decoding), in blocks of up to
// 512 threads, cpw columns a warp (matmul_q8k_fused: one per warp and chunk; matmul_q8_fused:
// a multiple of 4, four at a time): dynamic shared memory of rows × k/32 × 40 bytes (x;
// matmul_q8k_fused: its weights' chunks first). Up to three products of the same x in one
// launch (w1, w2 with n1, n2 > 0), a norm before, an add, a GLU or RoPE after (Fuse).
#define FUSED_ARGS                                                                         \
    const u8 *w0, int ty0, int n0, float *y0, const u8 *w1, int ty1, int n1, float *y1,    \
        const u8 *w2, int ty2, int n2, float *y2, int k, const float *x, int rows,         \
        const float *nw, float eps, float *xo, float *acc, int cpw, int glu,               \
        const float *rtab, const int *rpos, int rhd, int rrot, u16 *rkc, u16 *rvc
#define PICK                                                                               \
    pick(w0, ty0, n0, y0, w1, ty1, n1, y1, w2, ty2, n2, y2, nw, eps, xo, acc, cpw, glu, rtab, \
         rpos, rhd, rrot, rkc, rvc)
template <int R>
__device__ __forceinline__ void matvec_q8_typed(const Pick& p, int k, const float* x, int rows,
                                                int cpw) {
    switch (p.ty) {
        case T_Q4_0: matvec_q8_fused<T_Q4_0, R>(p.w, k, p.n, x, rows, p.y, p.f, p.blk, cpw); break;
        case T_Q4_1: matvec_q8_fused<T_Q4_1, R>(p.w, k, p.n, x, rows, p.y, p.f, p.blk, cpw); break;
        case T_Q5_0: matvec_q8_fused<T_Q5_0, R>(p.w, k, p.n, x, rows, p.y, p.f, p.blk, cpw); break;
        case T_Q5_1: matvec_q8_fused<T_Q5_1, R>(p.w, k, p.n, x, rows, p.y, p.f, p.blk, cpw); break;
        default: matvec_q8_fused<T_Q8_0, R>(p.w, k, p.n, x, rows, p.y, p.f, p.blk, cpw); break;
    }
}
extern "C" __global__ void __launch_bounds__(512, 1) matmul_q8_fused(FUSED_ARGS) {
    Pick p = PICK;
    // One row (decoding one sequence) in code of its own: its loops are short.
    if (rows == 1) matvec_q8_typed<1>(p, k, x, rows, cpw);
    else matvec_q8_typed<MATVEC_ROWS>(p, k, x, rows, cpw);
}

// Many rows (prompts): tiles of TILE_M rows × TILE_N columns per block of 256 threads,
// TILE_K weight blocks at a time staged in shared memory as dp4a words (weights unpacked
// once per tile, not once per row; shared arrays 16-byte aligned for the staging's stores). Thread = 8 g + l: slot l of the outputs of group g
// (rows g % 8 + 8 i, columns g / 8 + 4 c), 32 outputs, each its own f32 chain in block
// order; the slots summed by hsum8 at the end. Q81: the m·s side chains too.
#define TILE_M 32
#define TILE_N 32
#define TILE_K 8
#define XS_STRIDE (TILE_K * 8 + 8)  // words per row: +8 keeps 4 rows' slots in 4 bank groups
template <int Q81>
__device__ __forceinline__ void matmul_q8_tile(const u8* w, int ty, int k, int n, const u8* xq,
                                               int rows, float* y) {
    __shared__ __align__(16) int ws[TILE_N][TILE_K * 8];
    __shared__ __align__(16) int xs[TILE_M][XS_STRIDE];
    __shared__ float dws[TILE_N][TILE_K + 1], mws[TILE_N][TILE_K + 1];
    __shared__ float dxs[TILE_M][TILE_K + 1], sxs[TILE_M][TILE_K + 1];
    int nb = k / 32, bb = block_bytes(ty);
    int xbytes = Q81 ? 36 : 34, xat = Q81 ? 4 : 2;
    int t = threadIdx.x, l = t & 7, g = t >> 3;
    int tn = (n + TILE_N - 1) / TILE_N;  // a 1-D grid: column tiles within row tiles
    int col0 = (blockIdx.x % tn) * TILE_N, row0 = (blockIdx.x / tn) * TILE_M;
    int rg = g & 7, cg = g >> 3;
    // Q81: the m·s chain of the thread's rows and its column cg + 4 l (one chain an output,
    // kept by the output's slot-l thread, l = its column's c).
    float acc[4][8], summs[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
    for (int i = 0; i < 4; i++)
#pragma unroll
        for (int c = 0; c < 8; c++) acc[i][c] = 0.0f;
    for (int b0 = 0; b0 < nb; b0 += TILE_K) {
        int kb_n = min(TILE_K, nb - b0);
        // Staged a block a thread (TILE_N × TILE_K = TILE_M × TILE_K = 256 threads): thread
        // t takes block t % 8 of column t / 8 and of row t / 8, loads and unpacks each once
        // and stores its eight words 16 bytes at a time, with its scales. (A thread a word,
        // each finding and unpacking its block's bytes again, spent about as much time on
        // staging as on the products: SmolLM2's pp512 37,300 -> 50,500 tok/s on the H200.)
        {
            int c = t >> 3, kb = t & 7, bi = min(b0 + kb, nb - 1);
            int v[8];
            const u8* wb = w + ((size_t)min(col0 + c, n - 1) * nb + bi) * bb;
            w8(wb, ty, v, dws[c][kb], mws[c][kb]);
            st8(&ws[c][kb * 8], v);
            const u8* xb = xq + ((size_t)min(row0 + c, rows - 1) * nb + bi) * xbytes;
#pragma unroll
            for (int i = 0; i < 8; i++) {
                v[i] = Q81 ? *(const int*)(xb + 4 + 4 * i) : ld4h(xb + 2 + 4 * i);
            }
            st8(&xs[c][kb * 8], v);
            dxs[c][kb] = h2f(*(const u16*)xb);
            if (Q81) sxs[c][kb] = h2f(*(const u16*)(xb + 2));
        }
        __syncthreads();
        for (int kb = 0; kb < kb_n; kb++) {
            int xw[4], ww[8];
            float dx[4], dw[8];
#pragma unroll
            for (int i = 0; i < 4; i++) {
                xw[i] = xs[rg + 8 * i][kb * 8 + l];
                dx[i] = dxs[rg + 8 * i][kb];
            }
#pragma unroll
            for (int c = 0; c < 8; c++) {
                ww[c] = ws[cg + 4 * c][kb * 8 + l];
                dw[c] = dws[cg + 4 * c][kb];
            }
            if (Q81) {
                float mw = mws[cg + 4 * l][kb];
#pragma unroll
                for (int i = 0; i < 4; i++) summs[i] = fmaf(mw, sxs[rg + 8 * i][kb], summs[i]);
            }
#pragma unroll
            for (int i = 0; i < 4; i++)
#pragma unroll
                for (int c = 0; c < 8; c++) {
                    int sum = __dp4a(ww[c], xw[i], 0);
                    acc[i][c] = fmaf(__fmul_rn(dw[c], dx[i]), (float)sum, acc[i][c]);
                }
        }
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 4; i++)
#pragma unroll
        for (int c = 0; c < 8; c++) {
            float s = hsum8(acc[i][c]);
            // The output's m·s chain, from its slot-c thread (the same 8 lanes).
            float ms = Q81 ? __shfl_sync(0xffffffff, summs[i], (t & 24) | c) : 0.0f;
            int row = row0 + rg + 8 * i, col = col0 + cg + 4 * c;
            if (l == 0 && row < rows && col < n) {
                y[(size_t)row * n + col] = Q81 ? __fadd_rn(s, ms) : s;
            }
        }
}

extern "C" __global__ void __launch_bounds__(256) matmul_q8_tiled(const u8* w, int ty, int k,
                                                                  int n, const u8* xq, int rows,
                                                                  float* y) {
    step_start();
    matmul_q8_tile<0>(w, ty, k, n, xq, rows, y);
}

extern "C" __global__ void __launch_bounds__(256) matmul_q81_tiled(const u8* w, int ty, int k,
                                                                   int n, const u8* xq, int rows,
                                                                   float* y) {
    step_start();
    matmul_q8_tile<1>(w, ty, k, n, xq, rows, y);
}

// Rows of x in ggml's Q8_K (quantize_row_q8_K_ref), one warp per 256-value block, eight
// values per lane: the scale from the signed value of largest magnitude (the first such),
// -127 / max, rounded half to even and clamped at 127; then f32 1/scale, 256 × i8 and the
// 16 sums of 16 as i16 (292 bytes).
__device__ __forceinline__ void q8k_block_v(const float (&v)[8], int blk, int lane, u8* out) {
    float amax = 0.0f, max = 0.0f;
    int at = 256;
    for (int i = 0; i < 8; i++) {
        if (fabsf(v[i]) > amax) {
            amax = fabsf(v[i]);
            max = v[i];
            at = lane * 8 + i;
        }
    }
    for (int o = 16; o > 0; o >>= 1) {
        float a2 = __shfl_xor_sync(0xffffffff, amax, o), m2 = __shfl_xor_sync(0xffffffff, max, o);
        int at2 = __shfl_xor_sync(0xffffffff, at, o);
        if (a2 > amax || (a2 == amax && at2 < at)) {
            amax = a2;
            max = m2;
            at = at2;
        }
    }
    u8* b = out + (size_t)blk * 292;
    if (amax == 0.0f) {
        for (int i = lane; i < 292; i += 32) b[i] = 0;
        return;
    }
    float iscale = __fdiv_rn(-127.0f, max);
    int sum = 0;
    for (int i = 0; i < 8; i++) {
        int q = min(127, (int)rintf(__fmul_rn(iscale, v[i])));
        sum += q;
        b[4 + lane * 8 + i] = (u8)(signed char)q;
    }
    // Sums of 16: lanes 2s and 2s+1.
    sum += __shfl_xor_sync(0xffffffff, sum, 1);
    if ((lane & 1) == 0) {
        short s16 = (short)sum;
        b[260 + lane] = (u8)(s16 & 255);
        b[261 + lane] = (u8)((unsigned short)s16 >> 8);
    }
    if (lane == 0) {
        unsigned d = __float_as_uint(__fdiv_rn(1.0f, iscale));
        b[0] = d & 255;
        b[1] = (d >> 8) & 255;
        b[2] = (d >> 16) & 255;
        b[3] = d >> 24;
    }
}

__device__ __forceinline__ void q8k_block(const float* x, int blk, int lane, u8* out) {
    const float* xb = x + (size_t)blk * 256 + lane * 8;
    float v[8];
#pragma unroll
    for (int i = 0; i < 8; i++) v[i] = xb[i];
    q8k_block_v(v, blk, lane, out);
}

extern "C" __global__ void quantize_q8k(const float* x, int blocks, u8* out) {
    step_start();
    int blk = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    if (blk >= blocks) return;
    q8k_block(x, blk, threadIdx.x & 31, out);
}

// A Q8_K block's f32 scale and its 16-value sum i (i16).
__device__ __forceinline__ float q8k_d(const u8* xb) {
    return __uint_as_float((unsigned)xb[0] | ((unsigned)xb[1] << 8) | ((unsigned)xb[2] << 16) |
                           ((unsigned)xb[3] << 24));
}
__device__ __forceinline__ int q8k_bsum(const u8* xb, int i) {
    return (short)((unsigned short)xb[260 + 2 * i] | ((unsigned short)xb[261 + 2 * i] << 8));
}

// Q6_K value j (0..256) of super-block b, unsigned (0..63).
__device__ __forceinline__ int q6k_u(const u8* b, int j) {
    const u8 *ql = b + 64 * (j / 128), *qh = b + 128 + 32 * (j / 128);
    int r = j % 128, quarter = r / 32, l = r % 32;
    int lo = quarter & 1 ? ql[l + 32] : ql[l];
    lo = quarter < 2 ? lo & 0xF : lo >> 4;
    return lo | (((qh[l] >> (2 * quarter)) & 3) << 4);
}

// y[r][j] = w[j] · x[r] for Q4_K and Q6_K weights against Q8_K rows, one warp per output
// column, in the CPU backend's order (crates/kernels/src/quant.rs), which depends on the
// product's row count as llama.cpp's does:
// - fewer than 8 rows (decoding), ggml's AVX2 vec_dot: eight f32 lanes, lane L fed per
//   super-block with fma(d_x·d_w, Σ over the eight runs of 32 values of scale · (its four
//   values L·4.. · x)), Q6_K's values unsigned with the -32 taken per lane from the 16-value
//   sums; Q4_K's mins in four lanes of their own (fma(-d_x·dmin, m·sums)); hsum_float_8,
//   plus the mins' (m0 + m2) + (m1 + m3);
// - 8 rows or more (prompts), ggml-cpu's tiled kernel: per super-block the exact integer
//   sums s1 = Σ scale·q·x and s2 = Σ min·bsum, then acc + fma(-dmin, s2, s1·d)·d_x (Q6_K:
//   acc + s1·d·d_x), each product rounded.
// Lane t holds values 8t..8t+8: run t/4 of 32, the CPU's lanes 2(t%4) and 2(t%4)+1.
// (matmul_q8k_col: x quantized in global memory, for 8 rows or more than a fused launch's
// shared memory holds; matmul_q8k_fused, further on, computes the same bits for decoding.)
//
// q8k_super: one super-block of one row, wb its weights, xb its Q8_K block, into lane's acc
// (tiled: the running sum), acc1 and accm.
__device__ __forceinline__ void q8k_super(const u8* wb, const u8* xb, int ty, int lane,
                                          bool tiled, float& acc, float& acc1, float& accm) {
    int run = lane / 4, c = lane % 4, at = lane * 8;
    const signed char* q8 = (const signed char*)(xb + 4) + at;
    float dx = q8k_d(xb);
    int lo = 0, hi = 0, mins = 0, scale;
    if (ty == T_Q4_K) {
        int m;
        scale_min_k4(run, wb + 4, &scale, &m);
        const u8* qs = wb + 16 + 32 * (run / 2) + (at % 32);
        for (int i = 0; i < 8; i++) {
            int q = run & 1 ? qs[i] >> 4 : qs[i] & 0xF;
            if (i < 4) lo += q * q8[i];
            else hi += q * q8[i];
        }
        // Lanes 0-3: the CPU's min lane `lane`, sub-blocks 2·lane and 2·lane + 1.
        if (lane < 4) {
            int s0, m0, s1, m1;
            scale_min_k4(2 * lane, wb + 4, &s0, &m0);
            scale_min_k4(2 * lane + 1, wb + 4, &s1, &m1);
            mins = m0 * (q8k_bsum(xb, 4 * lane) + q8k_bsum(xb, 4 * lane + 1)) +
                   m1 * (q8k_bsum(xb, 4 * lane + 2) + q8k_bsum(xb, 4 * lane + 3));
        }
    } else {
        scale = ((const signed char*)(wb + 192))[8 * (run / 4) + 2 * (run % 4) + c / 2];
        for (int i = 0; i < 8; i++) {
            int q = q6k_u(wb, at + i);
            if (i < 4) lo += q * q8[i];
            else hi += q * q8[i];
        }
    }
    lo *= scale;
    hi *= scale;
    if (tiled) {
        int s1 = lo + hi;
        // Q6_K: the -32 offset as an exact integer over the block (any split).
        if (ty == T_Q6_K && lane < 16) {
            s1 -= 32 * ((const signed char*)(wb + 192))[lane] * q8k_bsum(xb, lane);
        }
        for (int o = 16; o > 0; o >>= 1) {
            s1 += __shfl_xor_sync(0xffffffff, s1, o);
            mins += __shfl_xor_sync(0xffffffff, mins, o);
        }
        if (ty == T_Q4_K) {
            float d = h2f(rd16(wb)), dmin = h2f(rd16(wb + 2));
            float rr = fmaf(-dmin, (float)mins, __fmul_rn((float)s1, d));
            acc = __fadd_rn(acc, __fmul_rn(rr, dx));
        } else {
            acc = __fadd_rn(acc, __fmul_rn(__fmul_rn((float)s1, h2f(rd16(wb + 208))), dx));
        }
        return;
    }
    // The eight runs of each CPU lane pair: lanes c, c + 4, … c + 28.
    for (int o = 4; o < 32; o <<= 1) {
        lo += __shfl_xor_sync(0xffffffff, lo, o);
        hi += __shfl_xor_sync(0xffffffff, hi, o);
    }
    if (ty == T_Q6_K) {
        // CPU lane L = 2c (lo) and 2c + 1 (hi): -32 · (bsum[2L]·sc[2L] + bsum[2L+1]·sc[2L+1]).
        const signed char* sc = (const signed char*)(wb + 192);
        int L = 2 * c;
        lo -= 32 * (q8k_bsum(xb, 2 * L) * sc[2 * L] + q8k_bsum(xb, 2 * L + 1) * sc[2 * L + 1]);
        L = 2 * c + 1;
        hi -= 32 * (q8k_bsum(xb, 2 * L) * sc[2 * L] + q8k_bsum(xb, 2 * L + 1) * sc[2 * L + 1]);
    }
    float d = __fmul_rn(dx, h2f(rd16(wb + (ty == T_Q4_K ? 0 : 208))));
    acc = fmaf(d, (float)lo, acc);
    acc1 = fmaf(d, (float)hi, acc1);
    if (ty == T_Q4_K) accm = fmaf(__fmul_rn(-dx, h2f(rd16(wb + 2))), (float)mins, accm);
}

// A row's output from its lanes' sums (lane 0's result).
__device__ __forceinline__ float q8k_finish(int ty, bool tiled, float acc, float acc1,
                                            float accm) {
    if (tiled) return acc;
    // hsum_float_8 of lanes a[2c] = acc, a[2c+1] = acc1 of lanes c = 0..3.
    float a[8], m[4];
    for (int i = 0; i < 4; i++) {
        a[2 * i] = __shfl_sync(0xffffffff, acc, i);
        a[2 * i + 1] = __shfl_sync(0xffffffff, acc1, i);
        m[i] = __shfl_sync(0xffffffff, accm, i);
    }
    float r0 = __fadd_rn(a[4], a[0]), r1 = __fadd_rn(a[5], a[1]);
    float r2 = __fadd_rn(a[6], a[2]), r3 = __fadd_rn(a[7], a[3]);
    float sum = __fadd_rn(__fadd_rn(r0, r2), __fadd_rn(r1, r3));
    if (ty == T_Q4_K) {
        sum = __fadd_rn(sum, __fadd_rn(__fadd_rn(m[0], m[2]), __fadd_rn(m[1], m[3])));
    }
    return sum;
}

__device__ __forceinline__ void matmul_q8k_col(const u8* w, int ty, int k, int n, const u8* xq,
                                               int rows, float* y, int warp, int lane) {
    int nb = k / 256, bb = k_bytes(ty);
    const u8* wr = w + (size_t)warp * nb * bb;
    bool tiled = rows >= 8;
    for (int r = 0; r < rows; r++) {
        const u8* xr = xq + (size_t)r * nb * 292;
        float acc = 0.0f, acc1 = 0.0f, accm = 0.0f;
        for (int bi = 0; bi < nb; bi++) {
            q8k_super(wr + (size_t)bi * bb, xr + (size_t)bi * 292, ty, lane, tiled, acc, acc1,
                      accm);
        }
        float s = q8k_finish(ty, tiled, acc, acc1, accm);
        if (lane == 0) y[(size_t)r * n + warp] = s;
    }
}

extern "C" __global__ void matmul_q8k(const u8* w, int ty, int k, int n, const u8* xq,
                                      int rows, float* y) {
    step_start();
    int warp = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    if (warp >= n) return;
    matmul_q8k_col(w, ty, k, n, xq, rows, y, warp, threadIdx.x & 31);
}

// A K-quant super-block unpacked for the prompt tiles: values 4i..4i+3 as four signed bytes
// (Q4_K's nibbles; Q6_K's six bits minus 32), its 16 scale entries (Q4_K: 8 scales, 8 mins;
// Q6_K: the 16 scales) and an activation block's matching sums (Q4_K: sub-block i's sum of
// 32 for i < 8; Q6_K: the sum of 16 i).
__device__ __forceinline__ int kq_word(const u8* wb, bool q6, int i) {
    if (!q6) {
        // Sub-block i / 8, bytes 4 (i % 8).. of its pair's 32: one aligned word (Q4_K
        // super-blocks are 144 bytes, weights start aligned).
        unsigned b = *(const unsigned*)(wb + 16 + 32 * (i / 16) + 4 * (i % 8));
        return (int)((i / 8) & 1 ? (b >> 4) & 0x0f0f0f0fu : b & 0x0f0f0f0fu);
    }
    // Values j = 4i..4i+3 of half n, quarter k, at l.. (Q6_K blocks are 210 bytes: bytes).
    int j = 4 * i, n = j / 128, k = (j % 128) / 32, l = j % 32;
    unsigned lo = (unsigned)ld4(wb + 64 * n + l + (k & 1 ? 32 : 0));
    lo = k < 2 ? lo & 0x0f0f0f0fu : (lo >> 4) & 0x0f0f0f0fu;
    unsigned hb = ((unsigned)ld4(wb + 128 + 32 * n + l) >> (2 * k)) & 0x03030303u;
    return (int)__vsub4(lo | (hb << 4), 0x20202020u);
}
__device__ __forceinline__ int kq_scale(const u8* wb, bool q6, int i) {
    if (q6) return ((const signed char*)(wb + 192))[i];
    int sc, m;
    scale_min_k4(i & 7, wb + 4, &sc, &m);
    return i < 8 ? sc : m;
}
__device__ __forceinline__ int kq_sums(const u8* xb, bool q6, int i) {
    if (q6) return q8k_bsum(xb, i);
    return i < 8 ? q8k_bsum(xb, 2 * i) + q8k_bsum(xb, 2 * i + 1) : 0;
}

// K-quant prompts: tiles of 32 rows × 32 columns per block of 256 threads, a super-block at
// a time staged in shared memory (the weights unpacked to a value a byte, Q6_K's -32
// applied; their scales and mins; the activations' bytes, d and 16-value sums), each
// output in ggml-cpu's tiled order (matmul_q8k_col's for 8 rows or more): the same bits.
// Thread t: column t % 32, rows t / 32 + 8 i.
#define KT_STRIDE 65  // words per column: +1 spreads a warp's 32 columns over the banks
extern "C" __global__ void __launch_bounds__(256) matmul_q8k_tiled(const u8* w, int ty, int k,
                                                                   int n, const u8* xq, int rows,
                                                                   float* y) {
    step_start();
    __shared__ int ws[TILE_N][KT_STRIDE];
    __shared__ int xs[TILE_M][64];
    __shared__ int scs[TILE_N][17];  // Q4_K: 8 scales, 8 mins; Q6_K: 16 scales
    __shared__ float dws[TILE_N], dms[TILE_N], dxs[TILE_M];
    __shared__ int bs[TILE_M][16];  // Q4_K: 8 sums of 32; Q6_K: 16 sums of 16
    int nb = k / 256, bb = k_bytes(ty);
    bool q6 = ty == T_Q6_K;
    int t = threadIdx.x, c = t & 31, rq = t >> 5;
    int tn = (n + TILE_N - 1) / TILE_N;
    int col0 = (blockIdx.x % tn) * TILE_N, row0 = (blockIdx.x / tn) * TILE_M;
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int bi = 0; bi < nb; bi++) {
        for (int e = t; e < TILE_N * 64; e += 256) {
            int wi = e & 63, cc = e >> 6;
            const u8* wb = w + ((size_t)min(col0 + cc, n - 1) * nb + bi) * bb;
            ws[cc][wi] = kq_word(wb, q6, wi);
            if (wi < 16) scs[cc][wi] = kq_scale(wb, q6, wi);
            if (wi == 0) {
                dws[cc] = h2f(rd16(wb + (q6 ? 208 : 0)));
                dms[cc] = q6 ? 0.0f : h2f(rd16(wb + 2));
            }
        }
        for (int e = t; e < TILE_M * 64; e += 256) {
            int wi = e & 63, rr = e >> 6;
            const u8* xb = xq + ((size_t)min(row0 + rr, rows - 1) * nb + bi) * 292;
            xs[rr][wi] = ld4(xb + 4 + 4 * wi);
            if (wi < 16) bs[rr][wi] = kq_sums(xb, q6, wi);
            if (wi == 0) dxs[rr] = q8k_d(xb);
        }
        __syncthreads();
        int s1[4] = {0, 0, 0, 0}, s2[4] = {0, 0, 0, 0};
        if (q6) {
            for (int sb = 0; sb < 16; sb++) {
                int w0 = ws[c][4 * sb], w1 = ws[c][4 * sb + 1], w2 = ws[c][4 * sb + 2],
                    w3 = ws[c][4 * sb + 3], sc = scs[c][sb];
#pragma unroll
                for (int i = 0; i < 4; i++) {
                    const int* xr = xs[rq + 8 * i] + 4 * sb;
                    int d = __dp4a(w0, xr[0], 0);
                    d = __dp4a(w1, xr[1], d);
                    d = __dp4a(w2, xr[2], d);
                    d = __dp4a(w3, xr[3], d);
                    s1[i] += sc * d;
                }
            }
        } else {
            for (int sb = 0; sb < 8; sb++) {
                int ww[8];
#pragma unroll
                for (int q = 0; q < 8; q++) ww[q] = ws[c][8 * sb + q];
                int sc = scs[c][sb], m = scs[c][8 + sb];
#pragma unroll
                for (int i = 0; i < 4; i++) {
                    const int* xr = xs[rq + 8 * i] + 8 * sb;
                    int d = 0;
#pragma unroll
                    for (int q = 0; q < 8; q++) d = __dp4a(ww[q], xr[q], d);
                    s1[i] += sc * d;
                    s2[i] += m * bs[rq + 8 * i][sb];
                }
            }
        }
        float dw = dws[c], dm = dms[c];
#pragma unroll
        for (int i = 0; i < 4; i++) {
            float dx = dxs[rq + 8 * i], p = __fmul_rn((float)s1[i], dw);
            if (!q6) p = fmaf(-dm, (float)s2[i], p);
            acc[i] = __fadd_rn(acc[i], __fmul_rn(p, dx));
        }
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 4; i++) {
        int row = row0 + rq + 8 * i, col = col0 + c;
        if (row < rows && col < n) y[(size_t)row * n + col] = acc[i];
    }
}

// K-quant prompts on the tensor cores (sm_80 and later): the same tiled order, the exact
// integer sums of each sub-block (32 values, Q6_K's 16) from int8 MMAs instead of dp4a.
// Tiles of 64 rows × 64 columns per block of 256 threads, a super-block at a time in shared
// memory (rows and columns of 256 bytes, +16 so that fragment loads meet no bank twice);
// warp w takes rows 16 (w % 4).. and columns 32 (w / 4).., four MMA tiles of 16 × 8. A
// thread holds MMA output e of tile j: row g + 8 (e / 2), column 8 j + 2 q + e % 2 (lane =
// 4 g + q), whose sums, scales and float steps it keeps.
//
// Loads are software-pipelined: the next super-block's bytes travel into registers (KmNext)
// while the tensor cores work on this one, then are unpacked into shared memory. Each thread
// has fixed places: weights, column t / 4, a quarter of its super-block (Q4_K: 32 bytes of
// nibbles, 16-byte loads, and a word of its scales; Q6_K, whose 210-byte blocks are only
// 2-byte aligned: 48 bytes as aligned words one past, shifted on unpacking); activations,
// row t / 4, words t % 4 + 4 i and up to three of its d and sums words.
#define KM_TILE 64
#define KM_PITCH 272
#define KM_META 9  // an activation row's words: d, then the 16 sums of 16 as 8 pairs
struct KmNext {
    unsigned w[18];  // Q4_K uses 12
    int x[16];
    int m[3];
};

// The 4-byte words at p, p + 4, ... (N of them) from a 2-byte aligned p: N + 1 aligned words
// from p rounded down where p is not 4-byte aligned (funnel-shifted on use, km_word).
template <int N>
__device__ __forceinline__ void km_words2(const u8* p, unsigned* r) {
    const unsigned* a = (const unsigned*)((size_t)p & ~(size_t)3);
#pragma unroll
    for (int i = 0; i < N; i++) r[i] = a[i];
    // (Aligned, the word past is not needed: it may be past the tensor's last block.)
    r[N] = (size_t)p & 2 ? a[N] : 0u;
}
__device__ __forceinline__ unsigned km_word(const unsigned* r, int i, int shift) {
    return __funnelshift_r(r[i], r[i + 1], shift);
}

template <int TY>
__device__ __forceinline__ void km_load_w(KmNext& nx, const u8* w, int nb, int bb, int col,
                                          int p, int bi) {
    const u8* wb = w + ((size_t)col * nb + bi) * bb;
    if constexpr (TY == T_Q4_K) {
        uint4 a = *(const uint4*)(wb + 16 + 32 * p), b = *(const uint4*)(wb + 32 + 32 * p);
        uint4 h = *(const uint4*)wb;
        unsigned v[12] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w, h.x, h.y, h.z, h.w};
#pragma unroll
        for (int i = 0; i < 12; i++) nx.w[i] = v[i];
    } else {
        // Thread p: half n = p / 2, values 16 (p % 2).. of each of its four runs of 32.
        int n = p >> 1, hf = p & 1;
        km_words2<4>(wb + 64 * n + 16 * hf, nx.w);
        km_words2<4>(wb + 64 * n + 32 + 16 * hf, nx.w + 5);
        km_words2<4>(wb + 128 + 32 * n + 16 * hf, nx.w + 10);
        km_words2<1>(wb + 192 + 4 * p, nx.w + 15);
        nx.w[17] = *(const u16*)(wb + 208);
    }
}
__device__ __forceinline__ void km_load_x(KmNext& nx, const u8* xq, int nb, int rows,
                                          int row, int p, int bi) {
    // Row t / 4 (as the weights' column): words p + 4i of its values, its d and sums words
    // p, p + 4, p + 8 (of 9).
    const u8* xb = xq + ((size_t)min(row, rows - 1) * nb + bi) * 292;
#pragma unroll
    for (int i = 0; i < 16; i++) nx.x[i] = *(const int*)(xb + 4 + 4 * p + 16 * i);
#pragma unroll
    for (int j = 0; j < 3; j++) {
        int wd = p + 4 * j;
        if (wd < KM_META) nx.m[j] = *(const int*)(xb + (wd ? 256 + 4 * wd : 0));
    }
}

template <int TY>
__device__ __forceinline__ void km_store(const KmNext& nx, const u8* wb_for_shift, int cc,
                                         int p, signed char* ws, int (*scs)[17],
                                         unsigned (*mpk)[2], float* dws, float* dms,
                                         signed char* xs, int (*xm)[KM_META]) {
    int* wrow = (int*)(ws + cc * KM_PITCH);
    if constexpr (TY == T_Q4_K) {
        // Bytes 32p.. of the nibbles: sub-block 2p's values (low nibbles), then 2p + 1's.
        int* o = wrow + 16 * p;
#pragma unroll
        for (int i = 0; i < 8; i++) {
            o[i] = (int)(nx.w[i] & 0x0f0f0f0fu);
            o[8 + i] = (int)((nx.w[i] >> 4) & 0x0f0f0f0fu);
        }
        // The 6-bit scales (p 0, 1) and mins (p 2, 3), four each, by words as q8k_item.
        unsigned u0 = nx.w[9], u1 = nx.w[10], u2 = nx.w[11], e;
        if (p == 0) e = u0 & 0x3f3f3f3fu;
        else if (p == 1) e = (u2 & 0x0f0f0f0fu) | (((u0 >> 6) & 0x03030303u) << 4);
        else if (p == 2) e = u1 & 0x3f3f3f3fu;
        else e = ((u2 >> 4) & 0x0f0f0f0fu) | (((u1 >> 6) & 0x03030303u) << 4);
        // Scales a word each (the sub-block loop's), mins as their four bytes (the MMAs').
        if (p < 2) {
#pragma unroll
            for (int i = 0; i < 4; i++) scs[cc][4 * p + i] = (int)((e >> (8 * i)) & 0xff);
        } else {
            mpk[cc][p - 2] = e;
        }
        if (p == 0) {
            dws[cc] = h2f((u16)(nx.w[8] & 0xffff));
            dms[cc] = h2f((u16)(nx.w[8] >> 16));
        }
    } else {
        int n = p >> 1, hf = p & 1;
        int sh = (int)(((size_t)wb_for_shift & 2) * 8);
#pragma unroll
        for (int k = 0; k < 4; k++) {
#pragma unroll
            for (int i = 0; i < 4; i++) {
                unsigned lo = km_word(nx.w + (k & 1 ? 5 : 0), i, sh);
                lo = k < 2 ? lo & 0x0f0f0f0fu : (lo >> 4) & 0x0f0f0f0fu;
                unsigned hb = (km_word(nx.w + 10, i, sh) >> (2 * k)) & 0x03030303u;
                wrow[32 * n + 8 * k + 4 * hf + i] = (int)__vsub4(lo | (hb << 4), 0x20202020u);
            }
        }
        unsigned sc = km_word(nx.w + 15, 0, sh);
#pragma unroll
        for (int i = 0; i < 4; i++) scs[cc][4 * p + i] = (int)(signed char)(sc >> (8 * i));
        if (p == 0) {
            dws[cc] = h2f((u16)nx.w[17]);
            dms[cc] = 0.0f;
        }
    }
    int* xrow = (int*)(xs + cc * KM_PITCH);
#pragma unroll
    for (int i = 0; i < 16; i++) xrow[p + 4 * i] = nx.x[i];
#pragma unroll
    for (int j = 0; j < 3; j++) {
        if (p + 4 * j < KM_META) xm[cc][p + 4 * j] = nx.m[j];
    }
}

// An activation row's sum for scale entry i (Q4_K: sub-block i's 32 values; Q6_K: values
// 16i.. — unused, its -32 is in the unpacked weights) from its raw words.
__device__ __forceinline__ int km_bsum(const int* m, int i) {
    int v = m[1 + i];
    return (int)(short)(v & 0xffff) + (v >> 16);
}

// The block's shared memory (one set for both types' code).
struct KmShared {
    __align__(16) signed char ws[KM_TILE * KM_PITCH];
    __align__(16) signed char xs[KM_TILE * KM_PITCH];
    int scs[KM_TILE][17];      // Q4_K: the 8 scales; Q6_K: the 16
    unsigned mpk[KM_TILE][2];  // Q4_K: the 8 mins as bytes
    int xm[KM_TILE][KM_META];
    float dws[KM_TILE], dms[KM_TILE];
};

template <int TY>
__device__ __forceinline__ void matmul_q8k_mma_typed(const u8* w, int k, int n, const u8* xq,
                                                     int rows, float* y, KmShared& sh) {
    signed char *ws = sh.ws, *xs = sh.xs;
    int(*scs)[17] = sh.scs;
    unsigned(*mpk)[2] = sh.mpk;
    int(*xm)[KM_META] = sh.xm;
    float *dws = sh.dws, *dms = sh.dms;
    constexpr bool q6 = TY == T_Q6_K;
    int nb = k / 256, bb = q6 ? 210 : 144;
    int t = threadIdx.x, lane = t & 31, wid = t >> 5, g = lane >> 2, q = lane & 3;
    int tn = (n + KM_TILE - 1) / KM_TILE;
    int col0 = (blockIdx.x % tn) * KM_TILE, row0 = (blockIdx.x / tn) * KM_TILE;
    int wr = 16 * (wid & 3), wc = 32 * (wid >> 2);
    int cc = t >> 2, p = t & 3, wcol = min(col0 + cc, n - 1);
    KmNext nx;
    // The first weights before step_start (read-only), the activations after it.
    km_load_w<TY>(nx, w, nb, bb, wcol, p, 0);
    step_start();
    km_load_x(nx, xq, nb, rows, row0 + cc, p, 0);
    float acc[4][4];
#pragma unroll
    for (int j = 0; j < 4; j++)
#pragma unroll
        for (int e = 0; e < 4; e++) acc[j][e] = 0.0f;
    for (int bi = 0; bi < nb; bi++) {
        const u8* wb = w + ((size_t)wcol * nb + bi) * bb;
        km_store<TY>(nx, wb, cc, p, ws, scs, mpk, dws, dms, xs, xm);
        __syncthreads();
        if (bi + 1 < nb) {
            km_load_w<TY>(nx, w, nb, bb, wcol, p, bi + 1);
            km_load_x(nx, xq, nb, rows, row0 + cc, p, bi + 1);
        }
        int s1[4][4];
#pragma unroll
        for (int j = 0; j < 4; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) s1[j][e] = 0;
        const signed char* xa = xs + (wr + g) * KM_PITCH + 4 * q;
        if (q6) {
#pragma unroll 1
            for (int sb = 0; sb < 16; sb++) {
                int a0 = *(const int*)(xa + 16 * sb), a1 = *(const int*)(xa + 8 * KM_PITCH + 16 * sb);
#pragma unroll
                for (int j = 0; j < 4; j++) {
                    int b0 = *(const int*)(ws + (wc + 8 * j + g) * KM_PITCH + 16 * sb + 4 * q);
                    int c0 = 0, c1 = 0, c2 = 0, c3 = 0;
                    asm volatile(
                        "mma.sync.aligned.m16n8k16.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, "
                        "{%4,%5}, {%6}, {%0,%1,%2,%3};"
                        : "+r"(c0), "+r"(c1), "+r"(c2), "+r"(c3)
                        : "r"(a0), "r"(a1), "r"(b0));
                    int c[4] = {c0, c1, c2, c3};
#pragma unroll
                    for (int e = 0; e < 4; e++) s1[j][e] += scs[wc + 8 * j + 2 * q + (e & 1)][sb] * c[e];
                }
            }
        } else {
#pragma unroll 1
            for (int sb = 0; sb < 8; sb++) {
                const signed char* xk = xa + 32 * sb;
                int a0 = *(const int*)xk, a1 = *(const int*)(xk + 8 * KM_PITCH);
                int a2 = *(const int*)(xk + 16), a3 = *(const int*)(xk + 8 * KM_PITCH + 16);
#pragma unroll
                for (int j = 0; j < 4; j++) {
                    const signed char* wk = ws + (wc + 8 * j + g) * KM_PITCH + 32 * sb + 4 * q;
                    int b0 = *(const int*)wk, b1 = *(const int*)(wk + 16);
                    int c0 = 0, c1 = 0, c2 = 0, c3 = 0;
                    asm volatile(
                        "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, "
                        "{%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                        : "+r"(c0), "+r"(c1), "+r"(c2), "+r"(c3)
                        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
                    int c[4] = {c0, c1, c2, c3};
#pragma unroll
                    for (int e = 0; e < 4; e++) {
                        s1[j][e] += scs[wc + 8 * j + 2 * q + (e & 1)][sb] * c[e];
                    }
                }
            }
        }
        // Q4_K's mins: s2 = Σ_sb min[col][sb] · sum[row][sb], exact integers, by two MMAs
        // of k = 16 (8 used): the row sums (14 bits) split into a low byte (u8) and a high
        // one (s8), s2 = low + 256 · high.
        int s2[4][4];
        if (!q6) {
            unsigned alo[2] = {0u, 0u}, ahi[2] = {0u, 0u};
            if (q < 2) {
#pragma unroll
                for (int h = 0; h < 2; h++) {
#pragma unroll
                    for (int i = 0; i < 4; i++) {
                        int v = km_bsum(xm[wr + g + 8 * h], 4 * q + i);
                        alo[h] |= (unsigned)(v & 0xff) << (8 * i);
                        ahi[h] |= (unsigned)((v >> 8) & 0xff) << (8 * i);
                    }
                }
            }
#pragma unroll
            for (int j = 0; j < 4; j++) {
                unsigned b0 = q < 2 ? mpk[wc + 8 * j + g][q] : 0u;
                int l0 = 0, l1 = 0, l2 = 0, l3 = 0, h0 = 0, h1 = 0, h2 = 0, h3 = 0;
                asm volatile(
                    "mma.sync.aligned.m16n8k16.row.col.s32.u8.s8.s32 {%0,%1,%2,%3}, "
                    "{%4,%5}, {%6}, {%0,%1,%2,%3};"
                    : "+r"(l0), "+r"(l1), "+r"(l2), "+r"(l3)
                    : "r"(alo[0]), "r"(alo[1]), "r"(b0));
                asm volatile(
                    "mma.sync.aligned.m16n8k16.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, "
                    "{%4,%5}, {%6}, {%0,%1,%2,%3};"
                    : "+r"(h0), "+r"(h1), "+r"(h2), "+r"(h3)
                    : "r"(ahi[0]), "r"(ahi[1]), "r"(b0));
                s2[j][0] = l0 + 256 * h0;
                s2[j][1] = l1 + 256 * h1;
                s2[j][2] = l2 + 256 * h2;
                s2[j][3] = l3 + 256 * h3;
            }
        }
#pragma unroll
        for (int j = 0; j < 4; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                int col = wc + 8 * j + 2 * q + (e & 1), row = wr + g + 8 * (e >> 1);
                float p = __fmul_rn((float)s1[j][e], dws[col]);
                if (!q6) p = fmaf(-dms[col], (float)s2[j][e], p);
                acc[j][e] = __fadd_rn(acc[j][e], __fmul_rn(p, __int_as_float(xm[row][0])));
            }
        __syncthreads();
    }
#pragma unroll
    for (int j = 0; j < 4; j++)
#pragma unroll
        for (int e = 0; e < 4; e++) {
            int col = col0 + wc + 8 * j + 2 * q + (e & 1), row = row0 + wr + g + 8 * (e >> 1);
            if (row < rows && col < n) y[(size_t)row * n + col] = acc[j][e];
        }
}

extern "C" __global__ void __launch_bounds__(256, 2) matmul_q8k_mma(const u8* w, int ty, int k,
                                                                    int n, const u8* xq,
                                                                    int rows, float* y) {
#if __CUDA_ARCH__ >= 800
    __shared__ KmShared sh;
    if (ty == T_Q6_K) matmul_q8k_mma_typed<T_Q6_K>(w, k, n, xq, rows, y, sh);
    else matmul_q8k_mma_typed<T_Q4_K>(w, k, n, xq, rows, y, sh);
#else
    step_start();
    __trap();
#endif
}

// quantize_q8k and matmul_q8k in one launch, for fewer than 8 rows (decoding; 8 rows take
// the tiled order, matmul_q8k), in the CPU backend's order (matmul_q8k_col's) with the
// integer work spread differently: lane 8i + L takes the CPU's f32 lane L (values 4L..4L+3
// of each run of 32) of super-blocks 4u + i, an exact integer sum of scale · dp4a per run
// (Q6_K's -32 and Q4_K's mins as the CPU groups them), and the lanes' f32 chains take the
// super-blocks in order through shuffles. Each warp's first K_CHUNK super-blocks are loaded
// (into registers, two bytes a lane: coalesced) before x is quantized, then staged in the
// warp's shared buffer, Q6_K's 210-byte blocks padded to 212 so that lanes read words; the
// next chunk's loads are in flight while one is summed. Blocks of up to 512 threads;
// dynamic shared memory of warps × K_CHUNK × 212 bytes (the warps' weights), then
// rows × k/256 × 292 (x as Q8_K).
#define K_CHUNK 8
template <int TY>
__device__ __forceinline__ void q8k_item(const u8* wb, const u8* xb, int L, int* s, int* mins) {
    const int* xw = (const int*)(xb + 4);
    int acc = 0;
    if (TY == T_Q4_K) {
        // The 8 six-bit scales and mins from the 12 bytes at 4 (get_scale_min_k4, by words:
        // sc = scales 0-3 | 4-7, mn = mins 0-3 | 4-7, a byte each).
        const unsigned* u = (const unsigned*)(wb + 4);
        unsigned u0 = u[0], u1 = u[1], u2 = u[2];
        unsigned sc[2] = {u0 & 0x3f3f3f3fu, (u2 & 0x0f0f0f0fu) | (((u0 >> 6) & 0x03030303u) << 4)};
        unsigned mn[2] = {u1 & 0x3f3f3f3fu, ((u2 >> 4) & 0x0f0f0f0fu) | (((u1 >> 6) & 0x03030303u) << 4)};
#pragma unroll
        for (int p = 0; p < 4; p++) {
            unsigned w = *(const unsigned*)(wb + 16 + 32 * p + 4 * L);
            int s0 = (sc[p / 2] >> (16 * (p % 2))) & 0xff, s1 = (sc[p / 2] >> (16 * (p % 2) + 8)) & 0xff;
            acc += s0 * __dp4a((int)(w & 0x0f0f0f0fu), xw[(2 * p) * 8 + L], 0);
            acc += s1 * __dp4a((int)((w >> 4) & 0x0f0f0f0fu), xw[(2 * p + 1) * 8 + L], 0);
        }
        int m = 0;
        if (L < 4) {
            int m0 = (mn[L / 2] >> (16 * (L % 2))) & 0xff, m1 = (mn[L / 2] >> (16 * (L % 2) + 8)) & 0xff;
            m = m0 * (q8k_bsum(xb, 4 * L) + q8k_bsum(xb, 4 * L + 1)) +
                m1 * (q8k_bsum(xb, 4 * L + 2) + q8k_bsum(xb, 4 * L + 3));
        }
        *mins = m;
    } else {
        const signed char* sc = (const signed char*)(wb + 192);
#pragma unroll
        for (int run = 0; run < 8; run++) {
            int half = run / 4, quarter = run % 4;
            unsigned lo = *(const unsigned*)(wb + 64 * half + (quarter & 1) * 32 + 4 * L);
            lo = quarter < 2 ? lo & 0x0f0f0f0fu : (lo >> 4) & 0x0f0f0f0fu;
            unsigned hb = *(const unsigned*)(wb + 128 + 32 * half + 4 * L);
            hb = (hb >> (2 * quarter)) & 0x03030303u;
            acc += sc[2 * run + L / 4] * __dp4a((int)(lo | (hb << 4)), xw[run * 8 + L], 0);
        }
        acc -= 32 * (q8k_bsum(xb, 2 * L) * sc[2 * L] + q8k_bsum(xb, 2 * L + 1) * sc[2 * L + 1]);
        *mins = 0;
    }
    *s = acc;
}

// A K_CHUNK of super-blocks (cnt u16 of them from src) into a warp's registers, two bytes
// a lane (coalesced), and from there into its shared buffer, Q6_K's blocks padded to 212.
template <int TY>
struct KChunk {
    static constexpr int BB = TY == T_Q4_K ? 144 : 210, SB = TY == T_Q4_K ? 144 : 212;
    static constexpr int H = BB / 2, NW = (K_CHUNK * H + 31) / 32;
};
template <int TY>
__device__ __forceinline__ void kchunk_load(const u16* src, int cnt, int lane,
                                            unsigned (&r)[KChunk<TY>::NW]) {
#pragma unroll
    for (int i = 0; i < KChunk<TY>::NW; i++) r[i] = lane + 32 * i < cnt ? src[lane + 32 * i] : 0u;
}
template <int TY>
__device__ __forceinline__ void kchunk_store(u8* wg, int cnt, int lane,
                                             const unsigned (&r)[KChunk<TY>::NW]) {
    constexpr int H = KChunk<TY>::H, S = KChunk<TY>::SB / 2;
#pragma unroll
    for (int i = 0; i < KChunk<TY>::NW; i++) {
        int e = lane + 32 * i;
        if (e < cnt) ((u16*)wg)[(e / H) * S + e % H] = (u16)r[i];
    }
}

template <int TY, int R>
__device__ __forceinline__ void matvec_q8k_fused(const u8* w, int k, int n, const float* x,
                                                 int rows, float* y, const Fuse& f, int blk,
                                                 int cpw) {
    constexpr int BB = KChunk<TY>::BB, SB = KChunk<TY>::SB, H = KChunk<TY>::H;
    extern __shared__ __align__(16) u8 smem[];
    int lane = threadIdx.x & 31, wib = threadIdx.x >> 5, warps = blockDim.x >> 5;
    int nb = k / 256, cpc = (nb + K_CHUNK - 1) / K_CHUNK;
    // The warp's columns col0.. (cpw of them) in chunks as matvec_q8_fused's.
    int col0 = (blk * warps + wib) * cpw;
    int passes = f.w2 ? 2 : 1;  // a column of w, then (GLU) the same of w2
    int total = max(0, min(cpw, n - col0)) * cpc * passes;
    const u16* wr = (const u16*)(w + (size_t)col0 * nb * BB);
    const u16* wr2 = (const u16*)(f.w2 + (size_t)col0 * nb * BB);
    u8* wg = smem + wib * K_CHUNK * 212;
    u8* xs = smem + warps * K_CHUNK * 212;
    unsigned r[KChunk<TY>::NW];
    int cnt = total ? min(K_CHUNK, nb) * H : 0;
    kchunk_load<TY>(wr, cnt, lane, r);
    step_start();
    __shared__ float rs[MATVEC_ROWS];
    if (f.nw) norm_scales(x, rows, k, f.eps, rs);
    int blocks = rows * nb;
    for (int base = wib; base < blocks; base += 2 * warps) {
        float v[2][8];
#pragma unroll
        for (int u = 0; u < 2; u++) {
            int xb = min(base + u * warps, blocks - 1), q = xb / nb;
            int at = (xb % nb) * 256 + lane * 8;
#pragma unroll
            for (int i = 0; i < 8; i++) {
                v[u][i] = fused_in(x, f, rs, q, k, at + i);
            }
        }
#pragma unroll
        for (int u = 0; u < 2; u++) {
            if (base + u * warps < blocks) q8k_block_v(v[u], base + u * warps, lane, xs);
        }
    }
    kchunk_store<TY>(wg, cnt, lane, r);
    __syncthreads();
    int L = lane & 7, sub = lane >> 3;
    float acc[R], accm[R], gate[R];
#pragma unroll
    for (int q = 0; q < R; q++) acc[q] = accm[q] = gate[q] = 0.0f;
    Item it = {0, 0, 0};
    for (int t = 0; t < total; t++) {
        int col = col0 + it.c, pass = it.pass;
        int c0 = it.ch * K_CHUNK;
        int live = min(K_CHUNK, nb - c0);
        int next = 0;
        it.next(passes, cpc);
        if (t + 1 < total) {
            int nc0 = it.ch * K_CHUNK;
            next = min(K_CHUNK, nb - nc0) * H;
            // Columns follow each other in the file: the next chunk starts where its
            // column's blocks nc0.. are.
            const u16* src = (it.pass ? wr2 : wr) + ((size_t)it.c * nb + nc0) * H;
            kchunk_load<TY>(src, next, lane, r);
        }
#pragma unroll
        for (int q = 0; q < R; q++) {
            if (q >= rows) break;
            const u8* xr = xs + ((size_t)q * nb + c0) * 292;
#pragma unroll
            for (int u = 0; u < K_CHUNK / 4; u++) {
                int sb = min(4 * u + sub, live - 1);
                const u8* wb = wg + sb * SB;
                const u8* xb = xr + (size_t)sb * 292;
                int s, m;
                q8k_item<TY>(wb, xb, L, &s, &m);
                float dx = q8k_d(xb);
                float d = __fmul_rn(dx, h2f(*(const u16*)(wb + (TY == T_Q4_K ? 0 : 208))));
                float dm = TY == T_Q4_K ? __fmul_rn(-dx, h2f(*(const u16*)(wb + 2))) : 0.0f;
#pragma unroll
                for (int jj = 0; jj < 4; jj++) {
                    // Super-block 4u + jj: lane L + 8jj's.
                    float dj = __shfl_sync(0xffffffff, d, L + 8 * jj);
                    int sj = __shfl_sync(0xffffffff, s, L + 8 * jj);
                    float dmj = TY == T_Q4_K ? __shfl_sync(0xffffffff, dm, L + 8 * jj) : 0.0f;
                    int mj = TY == T_Q4_K ? __shfl_sync(0xffffffff, m, L + 8 * jj) : 0;
                    if (4 * u + jj < live) {
                        acc[q] = fmaf(dj, (float)sj, acc[q]);
                        if (TY == T_Q4_K) accm[q] = fmaf(dmj, (float)mj, accm[q]);
                    }
                }
            }
        }
        if (c0 + K_CHUNK >= nb) {
            // The column's last chunk: hsum_float_8 of the CPU lanes (lanes 0-7), plus Q4_K's
            // mins (m0 + m2) + (m1 + m3).
#pragma unroll
            for (int q = 0; q < R; q++) {
                if (q >= rows) break;
                float s = hsum8(acc[q]);
                if (TY == T_Q4_K) {
                    float u = __fadd_rn(accm[q], __shfl_down_sync(0xffffffff, accm[q], 2));
                    s = __fadd_rn(s, __fadd_rn(u, __shfl_down_sync(0xffffffff, u, 1)));
                }
                if (lane == 0) fused_out(f, y, (size_t)q * n + col, s, pass, gate[q]);
                acc[q] = accm[q] = 0.0f;
            }
        }
        if (next) {
            __syncwarp();
            kchunk_store<TY>(wg, next, lane, r);
            __syncwarp();
        }
    }
}

// As matmul_q8_fused's launch: up to three products of the same x, a norm before, an add
// or a GLU after.
template <int R>
__device__ __forceinline__ void matvec_q8k_typed(const Pick& p, int k, const float* x, int rows,
                                                 int cpw) {
    if (p.ty == T_Q4_K) matvec_q8k_fused<T_Q4_K, R>(p.w, k, p.n, x, rows, p.y, p.f, p.blk, cpw);
    else matvec_q8k_fused<T_Q6_K, R>(p.w, k, p.n, x, rows, p.y, p.f, p.blk, cpw);
}
extern "C" __global__ void __launch_bounds__(512, 1) matmul_q8k_fused(FUSED_ARGS) {
    Pick p = PICK;
    // As matmul_q8_fused: one row in code of its own (up to 7 otherwise: 8 take the tiles).
    if (rows == 1) matvec_q8k_typed<1>(p, k, x, rows, cpw);
    else matvec_q8k_typed<MATVEC_ROWS - 1>(p, k, x, rows, cpw);
}

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

// f16 ↔ f32 by PTX (no headers: NVRTC compiles this file alone).
__device__ __forceinline__ float h2f(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

// f32 → f16, rounded to nearest even, in integer code (the PTX conversion's result lost
// its low byte when stored through a 16-bit register here).
__device__ u16 f2h(float f) {
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
    int i = blockIdx.x;
    if (i >= n) return;
    const u8* row = w + (size_t)ids[i] * row_bytes(ty, k);
    for (int c = threadIdx.x; c < k; c += blockDim.x) {
        out[(size_t)i * k + c] = dq_at(row, ty, c) * scale;
    }
}

// RMS norm of each group of `g` values (g = len(w)), one block per (row, group).
extern "C" __global__ void rms_norm(const float* x, const float* w, int g, float eps, float* y,
                                    int groups) {
    __shared__ double part[32];
    const float* xg = x + (size_t)blockIdx.x * g;
    float* yg = y + (size_t)blockIdx.x * g;
    // As ggml: squares in f32, summed in f64.
    double s = 0;
    for (int i = threadIdx.x; i < g; i += blockDim.x) s += (double)(xg[i] * xg[i]);
    for (int o = 16; o > 0; o >>= 1) s += __shfl_down_sync(0xffffffff, s, o);
    if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = s;
    __syncthreads();
    if (threadIdx.x == 0) {
        double t = 0;
        for (int i = 0; i < (int)((blockDim.x + 31) / 32); i++) t += part[i];
        part[0] = t;
    }
    __syncthreads();
    float mean = (float)(part[0] / g);
    float scale = 1.0f / sqrtf(mean + eps);
    for (int i = threadIdx.x; i < g; i += blockDim.x) yg[i] = (xg[i] * scale) * w[i];
}

// RoPE in place, one thread per (row, head, pair).
// RoPE in place, one thread per (row, head, pair). `theta_scale` (base^(-2/n_rot)) and
// `mscale` (attn_factor, times YaRN's magnitude correction) come from the host, computed
// by the CPU backend's own code; cos and sin through double, so that both round alike.
extern "C" __global__ void rope(float* x, int rows, int cols, int head_dim, int n_rot, int neox,
                                const int* pos_p, float theta_scale, float freq_scale,
                                float ext_factor, float mscale, float corr0, float corr1,
                                const float* factors, int has_factors) {
    int pos = *pos_p;
    int half = n_rot / 2, heads = cols / head_dim;
    int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= rows * heads * half) return;
    int i = t % half, h = (t / half) % heads, r = t / (half * heads);
    // As ggml-cpu: the angle by repeated products of theta_scale from the position.
    float theta_extrap = (float)(pos + r);
    for (int ii = 0; ii < i; ii++) theta_extrap = __fmul_rn(theta_extrap, theta_scale);
    if (has_factors) theta_extrap = __fdiv_rn(theta_extrap, factors[i]);
    float theta_interp = __fmul_rn(freq_scale, theta_extrap), theta = theta_interp;
    if (ext_factor != 0.0f) {
        float y = __fdiv_rn((float)i - corr0, fmaxf(corr1 - corr0, 0.001f));
        float mix = __fmul_rn(1.0f - fminf(fmaxf(y, 0.0f), 1.0f), ext_factor);
        theta = fmaf(theta_interp, 1.0f - mix, __fmul_rn(theta_extrap, mix));
    }
    float c = __fmul_rn((float)cos((double)theta), mscale);
    float s = __fmul_rn((float)sin((double)theta), mscale);
    float* head = x + (size_t)r * cols + h * head_dim;
    int a = neox ? i : 2 * i, b = neox ? i + half : 2 * i + 1;
    float x0 = head[a], x1 = head[b];
    head[a] = fmaf(x0, c, -__fmul_rn(x1, s));
    head[b] = fmaf(x0, s, __fmul_rn(x1, c));
}

// Keys and values of `rows` positions from `pos` into a layer's f16 cache.
extern "C" __global__ void kv_store(const float* k, const float* v, int rows, int width,
                                    const int* pos_p, u16* kc, u16* vc) {
    int pos = *pos_p;
    int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= rows * width) return;
    kc[(size_t)pos * width + t] = f2h(k[t]);
    vc[(size_t)pos * width + t] = f2h(v[t]);
}

// Causal attention, one block per (row, head), in the CPU backend's numerics (ggml-cpu's
// flash_attn_ext_f16): q rounded to f16, scores as f32 sums of f16 products, and an online
// softmax whose weighted sum of values is accumulated in f16, rescaled in f16 whenever
// the running maximum rises. Positions in chunks of ATT_CHUNK: their scores first (a warp
// per position, into shared memory), then each thread walks them in order for its own
// output values (at most two per thread: head_dim <= 2 * blockDim). The position comes
// from device memory, so that a decode step's launches are the same from token to token.
// e^x rounded to the nearest float (through double: CUDA's expf may be 2 ulp off, and the
// CPU backend's is glibc's, within 0.502 ulp), so both backends weigh positions alike.
__device__ __forceinline__ float exp_rn(float x) {
    return (float)exp((double)x);
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

#define ATT_CHUNK 2048
extern "C" __global__ void attention(const float* q, const u16* kc, const u16* vc, int rows,
                                     int n_head, int n_kv, int hd, const int* pos_p,
                                     float scale, int window, float softcap, float* out) {
    // Scores, then per position the online softmax's factors: `msa` rescales what was
    // summed before (1 when the maximum did not rise), `vsa` weighs the position's value.
    // They depend on the scores only, so the block computes them once (a prefix maximum
    // over the chunk, eight positions per thread: blockDim is 256) and each thread's walk
    // over its output values is left with the f16 rounding chain, in the same order.
    __shared__ float sc[ATT_CHUNK], msa[ATT_CHUNK], vsa[ATT_CHUNK];
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
    for (int c0 = 0; c0 < len; c0 += ATT_CHUNK) {
        int cl = min(ATT_CHUNK, len - c0);
        __syncthreads();
        for (int j = warp; j < cl; j += warps) {
            const u16* kr = kc + (size_t)(start + c0 + j) * width + kvh * hd;
            float s;
            if (hd % 64 == 0) {
                s = score64(qs, kr, hd, lane);
            } else {
                s = 0;
                for (int d = lane; d < hd; d += 32) s += qs[d] * h2f(kr[d]);
                s = warp_sum(s);
            }
            // Soft-capped scores as ggml-cpu: scale (already divided by softcap on the
            // host), then softcap · tanh, rounded through double as glibc's tanhf.
            if (lane == 0) {
                float x = __fmul_rn(s, scale);
                sc[j] = softcap != 0.0f ? __fmul_rn(softcap, (float)tanh((double)x)) : x;
            }
        }
        __syncthreads();
        int base = threadIdx.x * 8;
        float lm = NEG_INF;
        for (int i = 0; i < 8; i++) {
            if (base + i < cl) lm = fmaxf(lm, sc[base + i]);
        }
        float incl = lm;
        for (int o = 1; o < 32; o <<= 1) {
            float y = __shfl_up_sync(0xffffffff, incl, o);
            if (lane >= o) incl = fmaxf(incl, y);
        }
        if (lane == 31) wmax[warp] = incl;
        __syncthreads();
        float run = m_prev, total = m_prev;
        for (int w = 0; w < warps; w++) {
            if (w < warp) run = fmaxf(run, wmax[w]);
            total = fmaxf(total, wmax[w]);
        }
        float excl = __shfl_up_sync(0xffffffff, incl, 1);
        if (lane > 0) run = fmaxf(run, excl);
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
        for (int t = 0; t < 2; t++) {
            int d = threadIdx.x + t * blockDim.x;
            if (d >= hd) break;
            const u16* vcol = vc + (size_t)(start + c0) * width + kvh * hd + d;
            // Eight values loaded ahead of the dependent chain, not one load per step.
            for (int j0 = 0; j0 < cl; j0 += 8) {
                u16 vv[8];
#pragma unroll
                for (int u = 0; u < 8; u++) vv[u] = j0 + u < cl ? vcol[(size_t)(j0 + u) * width] : 0;
#pragma unroll
                for (int u = 0; u < 8; u++) {
                    int j = j0 + u;
                    if (j >= cl) break;
                    float ms = msa[j], vs = vsa[j];
                    if (ms != 1.0f) acc[t] = f2h(h2f(acc[t]) * ms);
                    sum[t] = fmaf(sum[t], ms, vs);
                    acc[t] = f2h(fmaf(h2f(vv[u]), vs, h2f(acc[t])));
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
    float g = 0.5f * h * (1.0f + tanhf(0.7978846f * h * inner));
    return h2f(f2h(g));
}

// up = act(gate) * up (0: SiLU, 1: GELU, tanh form), as the CPU backend.
extern "C" __global__ void glu(const float* gate, float* up, int n, int act) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float g = gate[i];
    float a = act == 0 ? g / (1.0f + v_expf(0.0f - g)) : gelu_f16(g);
    up[i] *= a;
}

extern "C" __global__ void add(float* acc, const float* x, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) acc[i] += x[i];
}

extern "C" __global__ void scale(float* x, int n, float s) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] *= s;
}

// Softmax of each row, one block per row.
extern "C" __global__ void softmax(float* x, int cols) {
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
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < cols) x[i] = x[(size_t)(rows - 1) * cols + i];
}

// Activations quantized as ggml's quantize_row_q8_0 / q8_1 (the CPU backend's numerics:
// scale amax/127 stored in f16, values rounded half to even; q8_1 also stores d·Σq), one
// warp per 32-value block: rows × k/32 blocks of 34 (q8_0) or 36 (q8_1) bytes.
__device__ __forceinline__ void q8_block(const float* x, int blk, int lane, int q81, u8* out) {
    float v = x[(size_t)blk * 32 + lane];
    float amax = fabsf(v);
    for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffff, amax, o));
    float d = amax / 127.0f;
    float id = amax != 0.0f ? 127.0f / amax : 0.0f;
    int q = (int)rintf(v * id);
    int sum = q;
    for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffff, sum, o);
    int bytes = q81 ? 36 : 34;
    u8* b = out + (size_t)blk * bytes;
    if (lane == 0) {
        u16 dh = f2h(d);
        b[0] = dh & 255;
        b[1] = dh >> 8;
        if (q81) {
            u16 sh = f2h(d * (float)sum);
            b[2] = sh & 255;
            b[3] = sh >> 8;
        }
    }
    b[(q81 ? 4 : 2) + lane] = (u8)(signed char)q;
}

extern "C" __global__ void quantize_q8(const float* x, int rows, int k, int q81, u8* out) {
    int blk = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    if (blk >= rows * (k / 32)) return;
    q8_block(x, blk, threadIdx.x & 31, q81, out);
}

// y[r][j] = w[j] · x[r] with x quantized (quantize_q8): integer dot products per block,
// combined in f32 as ggml's vec_dot_q*_q8_* do. One warp per output column, a lane per
// block at a time.
__device__ __forceinline__ void matmul_q8_col(const u8* w, int ty, int k, int n, const u8* xq,
                                              int rows, float* y, int warp, int lane) {
    int nb = k / 32, bb = block_bytes(ty);
    int q81 = ty == T_Q4_1 || ty == T_Q5_1;
    int xbytes = q81 ? 36 : 34;
    const u8* wr = w + (size_t)warp * nb * bb;
    for (int r = 0; r < rows; r++) {
        const u8* xr = xq + (size_t)r * nb * xbytes;
        float acc = 0.0f;
        for (int bi = lane; bi < nb; bi += 32) {
            const u8* wb = wr + (size_t)bi * bb;
            const u8* xb = xr + (size_t)bi * xbytes;
            const signed char* qx = (const signed char*)(xb + (q81 ? 4 : 2));
            float dx = h2f(rd16(xb));
            int dot = 0;
            switch (ty) {
                case T_Q4_0:
                    for (int j = 0; j < 16; j++) {
                        dot += ((wb[2 + j] & 15) - 8) * qx[j] + ((wb[2 + j] >> 4) - 8) * qx[j + 16];
                    }
                    acc += h2f(rd16(wb)) * dx * (float)dot;
                    break;
                case T_Q4_1:
                    for (int j = 0; j < 16; j++) {
                        dot += (wb[4 + j] & 15) * qx[j] + (wb[4 + j] >> 4) * qx[j + 16];
                    }
                    acc += h2f(rd16(wb)) * dx * (float)dot + h2f(rd16(wb + 2)) * h2f(rd16(xb + 2));
                    break;
                case T_Q5_0: {
                    unsigned qh = wb[2] | (wb[3] << 8) | (wb[4] << 16) | ((unsigned)wb[5] << 24);
                    for (int j = 0; j < 16; j++) {
                        int lo = (wb[6 + j] & 15) | (((qh >> j) & 1) << 4);
                        int hi = (wb[6 + j] >> 4) | (((qh >> (j + 16)) & 1) << 4);
                        dot += (lo - 16) * qx[j] + (hi - 16) * qx[j + 16];
                    }
                    acc += h2f(rd16(wb)) * dx * (float)dot;
                    break;
                }
                case T_Q5_1: {
                    unsigned qh = wb[4] | (wb[5] << 8) | (wb[6] << 16) | ((unsigned)wb[7] << 24);
                    for (int j = 0; j < 16; j++) {
                        int lo = (wb[8 + j] & 15) | (((qh >> j) & 1) << 4);
                        int hi = (wb[8 + j] >> 4) | (((qh >> (j + 16)) & 1) << 4);
                        dot += lo * qx[j] + hi * qx[j + 16];
                    }
                    acc += h2f(rd16(wb)) * dx * (float)dot + h2f(rd16(wb + 2)) * h2f(rd16(xb + 2));
                    break;
                }
                default: // Q8_0
                    for (int j = 0; j < 32; j++) dot += (signed char)wb[2 + j] * qx[j];
                    acc += h2f(rd16(wb)) * dx * (float)dot;
                    break;
            }
        }
        float s = warp_sum(acc);
        if (lane == 0) y[(size_t)r * n + warp] = s;
    }
}

extern "C" __global__ void matmul_q8(const u8* w, int ty, int k, int n, const u8* xq, int rows,
                                     float* y) {
    int warp = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    if (warp >= n) return;
    matmul_q8_col(w, ty, k, n, xq, rows, y, warp, threadIdx.x & 31);
}

// quantize_q8 and matmul_q8 in one launch, for a few rows (decoding): each block quantizes
// all of x into shared memory (the same bytes quantize_q8 writes), then its warps take their
// columns. One launch a matmul instead of two.
extern "C" __global__ void matmul_q8_fused(const u8* w, int ty, int k, int n, const float* x,
                                           int rows, float* y) {
    extern __shared__ u8 xs[];
    int lane = threadIdx.x & 31, wib = threadIdx.x >> 5, warps = blockDim.x >> 5;
    int q81 = ty == T_Q4_1 || ty == T_Q5_1;
    for (int blk = wib; blk < rows * (k / 32); blk += warps) q8_block(x, blk, lane, q81, xs);
    __syncthreads();
    int warp = blockIdx.x * warps + wib;
    if (warp < n) matmul_q8_col(w, ty, k, n, xs, rows, y, warp, lane);
}

// Rows of x in ggml's Q8_K (quantize_row_q8_K_ref), one warp per 256-value block, eight
// values per lane: the scale from the signed value of largest magnitude (the first such),
// -127 / max, rounded half to even and clamped at 127; then f32 1/scale, 256 × i8 and the
// 16 sums of 16 as i16 (292 bytes).
__device__ __forceinline__ void q8k_block(const float* x, int blk, int lane, u8* out) {
    const float* xb = x + (size_t)blk * 256 + lane * 8;
    float v[8];
    float amax = 0.0f, max = 0.0f;
    int at = 256;
    for (int i = 0; i < 8; i++) {
        v[i] = xb[i];
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

extern "C" __global__ void quantize_q8k(const float* x, int blocks, u8* out) {
    int blk = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    if (blk >= blocks) return;
    q8k_block(x, blk, threadIdx.x & 31, out);
}

// y[r][j] = w[j] · x[r] for Q4_K and Q6_K weights against Q8_K rows: one warp per output
// column, a super-block at a time, eight values per lane (lanes 4s..4s+3: sub-block s of
// 32); each super-block's integer sums are exact, combined in f32 as ggml's
// vec_dot_q4_K/q6_K_q8_K do (d_x·d_w·Σ scale·dot, minus d_x·dmin·Σ min·bsum).
__device__ __forceinline__ void matmul_q8k_col(const u8* w, int ty, int k, int n, const u8* xq,
                                               int rows, float* y, int warp, int lane) {
    int nb = k / 256, bb = k_bytes(ty);
    const u8* wr = w + (size_t)warp * nb * bb;
    int sub = lane / 4, at = lane * 8;
    for (int r = 0; r < rows; r++) {
        const u8* xr = xq + (size_t)r * nb * 292;
        float acc = 0.0f, acc_m = 0.0f;
        for (int bi = 0; bi < nb; bi++) {
            const u8* wb = wr + (size_t)bi * bb;
            const u8* xb = xr + (size_t)bi * 292;
            const signed char* q8 = (const signed char*)(xb + 4) + at;
            float dy = __uint_as_float((unsigned)xb[0] | ((unsigned)xb[1] << 8) |
                                       ((unsigned)xb[2] << 16) | ((unsigned)xb[3] << 24));
            int dot = 0, mins = 0;
            if (ty == T_Q4_K) {
                // Sub-block s: values 32s..32s+32, nibbles of bytes 32(s/2).. (low for
                // even s, high for odd).
                int sc, m;
                scale_min_k4(sub, wb + 4, &sc, &m);
                const u8* qs = wb + 16 + 32 * (sub / 2) + (at % 32);
                for (int i = 0; i < 8; i++) {
                    int q = sub & 1 ? qs[i] >> 4 : qs[i] & 0xF;
                    dot += q * q8[i];
                }
                dot *= sc;
                // Lane 0..7: sub-block `lane`'s min times its two sums of 16.
                if (lane < 8) {
                    int sc2, m2;
                    scale_min_k4(lane, wb + 4, &sc2, &m2);
                    const u8* bs = xb + 260 + 4 * lane;
                    int b0 = (short)((unsigned short)bs[0] | ((unsigned short)bs[1] << 8));
                    int b1 = (short)((unsigned short)bs[2] | ((unsigned short)bs[3] << 8));
                    mins = m2 * (b0 + b1);
                }
            } else {
                // Q6_K: values 128n + 32q + l (l < 32) in quarter q of half n.
                int j0 = at, n2 = j0 / 128, rr = j0 % 128, quarter = rr / 32, l0 = rr % 32;
                const u8 *ql = wb + 64 * n2, *qh = wb + 128 + 32 * n2;
                const signed char* sc = (const signed char*)(wb + 192 + 8 * n2);
                for (int i = 0; i < 8; i++) {
                    int l = l0 + i;
                    int lo = quarter & 1 ? ql[l + 32] : ql[l];
                    lo = quarter < 2 ? lo & 0xF : lo >> 4;
                    int q = (lo | (((qh[l] >> (2 * quarter)) & 3) << 4)) - 32;
                    dot += q * q8[i];
                }
                dot *= sc[l0 / 16 + 2 * quarter];
            }
            for (int o = 16; o > 0; o >>= 1) {
                dot += __shfl_xor_sync(0xffffffff, dot, o);
                mins += __shfl_xor_sync(0xffffffff, mins, o);
            }
            if (ty == T_Q4_K) {
                acc = fmaf(dy * h2f(rd16(wb)), (float)dot, acc);
                acc_m = fmaf(-dy * h2f(rd16(wb + 2)), (float)mins, acc_m);
            } else {
                acc = fmaf(dy * h2f(rd16(wb + 208)), (float)dot, acc);
            }
        }
        if (lane == 0) y[(size_t)r * n + warp] = acc + acc_m;
    }
}

extern "C" __global__ void matmul_q8k(const u8* w, int ty, int k, int n, const u8* xq,
                                      int rows, float* y) {
    int warp = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    if (warp >= n) return;
    matmul_q8k_col(w, ty, k, n, xq, rows, y, warp, threadIdx.x & 31);
}

// quantize_q8k and matmul_q8k in one launch, as matmul_q8_fused.
extern "C" __global__ void matmul_q8k_fused(const u8* w, int ty, int k, int n, const float* x,
                                            int rows, float* y) {
    extern __shared__ u8 xs[];
    int lane = threadIdx.x & 31, wib = threadIdx.x >> 5, warps = blockDim.x >> 5;
    for (int blk = wib; blk < rows * (k / 256); blk += warps) q8k_block(x, blk, lane, xs);
    __syncthreads();
    int warp = blockIdx.x * warps + wib;
    if (warp < n) matmul_q8k_col(w, ty, k, n, xs, rows, y, warp, lane);
}

// RWKV-7 WKV recurrence with the clampw decay (spec §3.4, §4.1), bf16 in/out, fp32 state.
//
// One block per (head, batch), one thread per channel. Inputs are staged in shared memory one chunk of
// WKV7_CHUNK_LEN steps at a time, so a chunk costs two barriers instead of two per step.
#include "wkv7_clampw.h"

namespace {

using bf16 = __nv_bfloat16;

constexpr int CHUNK = WKV7_CHUNK_LEN;
// decay = exp(W_SCALE * sigmoid(w_raw)) lies in (0.545, 1): the backward may divide by it.
constexpr float W_SCALE = -0.6065306597126334f;  // -exp(-0.5)

__device__ __forceinline__ float load(const bf16* p, long idx) { return __bfloat162float(p[idx]); }

__device__ __forceinline__ float sigmoid(float x) { return 1.0f / (1.0f + __expf(-x)); }

// Component c of a float4; c is a compile-time constant after unrolling.
__device__ __forceinline__ float part(const float4& x, int c) {
    return c == 0 ? x.x : c == 1 ? x.y : c == 2 ? x.z : x.w;
}

template <int N>
__device__ __forceinline__ const float4* as_vec4(const float (&row)[N]) {
    return reinterpret_cast<const float4*>(row);
}

// Thread i keeps row i of S (S[i, j], i = value channel, j = key channel) in registers.
template <int N>
__global__ void __launch_bounds__(N, 2)
wkv7_forward_kernel(int T, int H, Wkv7Inputs in, bf16* __restrict__ y, float* __restrict__ s, float* __restrict__ sa) {
    const int h = blockIdx.x, b = blockIdx.y, i = threadIdx.x;
    const long stride = static_cast<long>(H) * N;  // one time step
    const long base = (static_cast<long>(b) * T * H + h) * N + i;
    const int n_chunks = T / CHUNK;
    float* s_bh = s + (static_cast<long>(b) * H + h) * n_chunks * N * N;

    __shared__ __align__(16) float r_s[CHUNK][N], d_s[CHUNK][N], k_s[CHUNK][N], a_s[CHUNK][N], b_s[CHUNK][N];
    __shared__ float v_s[CHUNK][N];

    float state[N];
#pragma unroll
    for (int j = 0; j < N; ++j) state[j] = 0.0f;

    for (int c = 0; c < n_chunks; ++c) {
        const long chunk_base = base + c * CHUNK * stride;
        __syncthreads();
#pragma unroll
        for (int tt = 0; tt < CHUNK; ++tt) {
            const long idx = chunk_base + tt * stride;
            r_s[tt][i] = load(in.r, idx);
            d_s[tt][i] = __expf(W_SCALE * sigmoid(load(in.w, idx)));
            k_s[tt][i] = load(in.k, idx);
            v_s[tt][i] = load(in.v, idx);
            a_s[tt][i] = load(in.a, idx);
            b_s[tt][i] = load(in.b, idx);
        }
        __syncthreads();

        for (int tt = 0; tt < CHUNK; ++tt) {
            // Four partial sums per dot product break the dependency chain.
            float p[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
            for (int q = 0; q < N / 4; ++q) {
                const float4 av = as_vec4(a_s[tt])[q];
#pragma unroll
                for (int e = 0; e < 4; ++e) p[e] = fmaf(state[4 * q + e], part(av, e), p[e]);
            }
            const float sa_i = (p[0] + p[1]) + (p[2] + p[3]);
            const float v_i = v_s[tt][i];

            float o[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
            for (int q = 0; q < N / 4; ++q) {
                const float4 dv = as_vec4(d_s[tt])[q], bv = as_vec4(b_s[tt])[q];
                const float4 kv = as_vec4(k_s[tt])[q], rv = as_vec4(r_s[tt])[q];
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    float& st = state[4 * q + e];
                    st = fmaf(st, part(dv, e), fmaf(sa_i, part(bv, e), part(kv, e) * v_i));
                    o[e] = fmaf(st, part(rv, e), o[e]);
                }
            }
            const long idx = chunk_base + tt * stride;
            y[idx] = __float2bfloat16_rn((o[0] + o[1]) + (o[2] + o[3]));
            sa[idx] = sa_i;
        }

        // Stored key-major: thread i writes column i of the (j, i) matrix, coalesced across threads.
        float* s_c = s_bh + static_cast<long>(c) * N * N;
#pragma unroll
        for (int j = 0; j < N; ++j) s_c[j * N + i] = state[j];
    }
}

// Walks t from T-1 down to 0. Thread i keeps column i of S (st[j] = S[j, i]), rebuilt one step back at a time
// by inverting the update and reloaded exactly at every chunk end, and dL/dS in both orientations
// (gr[j] = G[i, j], gc[j] = G[j, i]) so that every reduction is thread-local.
template <int N>
__global__ void __launch_bounds__(N, 1)
wkv7_backward_kernel(int T, int H, Wkv7Inputs in, const bf16* __restrict__ dy, const float* __restrict__ s,
                const float* __restrict__ sa, Wkv7Grads g) {
    const int h = blockIdx.x, b = blockIdx.y, i = threadIdx.x;
    const long stride = static_cast<long>(H) * N;
    const long base = (static_cast<long>(b) * T * H + h) * N + i;
    const int n_chunks = T / CHUNK;
    const float* s_bh = s + (static_cast<long>(b) * H + h) * n_chunks * N * N;

    __shared__ __align__(16) float r_s[CHUNK][N], d_s[CHUNK][N], k_s[CHUNK][N], a_s[CHUNK][N], b_s[CHUNK][N];
    __shared__ __align__(16) float v_s[CHUNK][N], dy_s[CHUNK][N], sa_s[CHUNK][N];
    __shared__ float dwf_s[CHUNK][N];             // d(decay)/d(w_raw) for the own channel
    __shared__ __align__(16) float dsa_s[2][N];  // double-buffered by step parity: one barrier per step

    float st[N], gr[N], gc[N];
#pragma unroll
    for (int j = 0; j < N; ++j) {
        gr[j] = 0.0f;
        gc[j] = 0.0f;
    }

    for (int c = n_chunks - 1; c >= 0; --c) {
        const long chunk_base = base + c * CHUNK * stride;
        __syncthreads();
#pragma unroll
        for (int tt = 0; tt < CHUNK; ++tt) {
            const long idx = chunk_base + tt * stride;
            const float sig = sigmoid(load(in.w, idx));
            const float decay = __expf(W_SCALE * sig);
            r_s[tt][i] = load(in.r, idx);
            d_s[tt][i] = decay;
            dwf_s[tt][i] = decay * W_SCALE * sig * (1.0f - sig);
            k_s[tt][i] = load(in.k, idx);
            v_s[tt][i] = load(in.v, idx);
            a_s[tt][i] = load(in.a, idx);
            b_s[tt][i] = load(in.b, idx);
            dy_s[tt][i] = load(dy, idx);
            sa_s[tt][i] = sa[idx];
        }
        const float4* s4 = reinterpret_cast<const float4*>(s_bh + static_cast<long>(c) * N * N + i * N);
#pragma unroll
        for (int q = 0; q < N / 4; ++q) {
            const float4 x = s4[q];
#pragma unroll
            for (int e = 0; e < 4; ++e) st[4 * q + e] = part(x, e);
        }
        __syncthreads();

        for (int tt = CHUNK - 1; tt >= 0; --tt) {
            const float r_i = r_s[tt][i], d_i = d_s[tt][i], k_i = k_s[tt][i];
            const float a_i = a_s[tt][i], b_i = b_s[tt][i], dy_i = dy_s[tt][i];
            const float inv_d = 1.0f / d_i;

            float dr = 0.0f, dk = 0.0f, db = 0.0f, dd = 0.0f, dv = 0.0f, dsa = 0.0f;
#pragma unroll
            for (int q = 0; q < N / 4; ++q) {
                const float4 dyv = as_vec4(dy_s[tt])[q], vv = as_vec4(v_s[tt])[q], sav = as_vec4(sa_s[tt])[q];
                const float4 rv = as_vec4(r_s[tt])[q], kv = as_vec4(k_s[tt])[q], bv = as_vec4(b_s[tt])[q];
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int j = 4 * q + e;
                    dr = fmaf(st[j], part(dyv, e), dr);
                    st[j] = fmaf(-k_i, part(vv, e), fmaf(-b_i, part(sav, e), st[j])) * inv_d;  // S_{t-1}[j, i]
                    gr[j] = fmaf(dy_i, part(rv, e), gr[j]);
                    gc[j] = fmaf(part(dyv, e), r_i, gc[j]);
                    dk = fmaf(gc[j], part(vv, e), dk);
                    db = fmaf(gc[j], part(sav, e), db);
                    dd = fmaf(gc[j], st[j], dd);
                    dv = fmaf(gr[j], part(kv, e), dv);
                    dsa = fmaf(gr[j], part(bv, e), dsa);
                }
            }
            dsa_s[tt & 1][i] = dsa;
            __syncthreads();

            float da = 0.0f;
#pragma unroll
            for (int q = 0; q < N / 4; ++q) {
                const float4 dsav = as_vec4(dsa_s[tt & 1])[q], dv4 = as_vec4(d_s[tt])[q], av = as_vec4(a_s[tt])[q];
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int j = 4 * q + e;
                    da = fmaf(st[j], part(dsav, e), da);
                    gr[j] = fmaf(gr[j], part(dv4, e), dsa * part(av, e));
                    gc[j] = fmaf(gc[j], d_i, part(dsav, e) * a_i);
                }
            }

            const long idx = chunk_base + tt * stride;
            g.dr[idx] = __float2bfloat16_rn(dr);
            g.dw[idx] = __float2bfloat16_rn(dd * dwf_s[tt][i]);
            g.dk[idx] = __float2bfloat16_rn(dk);
            g.dv[idx] = __float2bfloat16_rn(dv);
            g.da[idx] = __float2bfloat16_rn(da);
            g.db[idx] = __float2bfloat16_rn(db);
        }
    }
}

template <int N>
void launch_forward(int B, int T, int H, Wkv7Inputs in, bf16* y, float* s, float* sa, cudaStream_t stream) {
    wkv7_forward_kernel<N><<<dim3(H, B), N, 0, stream>>>(T, H, in, y, s, sa);
}

template <int N>
void launch_backward(int B, int T, int H, Wkv7Inputs in, const bf16* dy, const float* s, const float* sa,
                     Wkv7Grads g, cudaStream_t stream) {
    wkv7_backward_kernel<N><<<dim3(H, B), N, 0, stream>>>(T, H, in, dy, s, sa, g);
}

}  // namespace

bool wkv7_head_size_supported(int head_size) { return head_size == 32 || head_size == 64; }

cudaError_t wkv7_clampw_forward(int B, int T, int H, int N, Wkv7Inputs in, bf16* y, float* s, float* sa,
                                cudaStream_t stream) {
    if (T % CHUNK != 0) return cudaErrorInvalidValue;
    switch (N) {
        case 32: launch_forward<32>(B, T, H, in, y, s, sa, stream); break;
        case 64: launch_forward<64>(B, T, H, in, y, s, sa, stream); break;
        default: return cudaErrorInvalidValue;
    }
    return cudaGetLastError();
}

cudaError_t wkv7_clampw_backward(int B, int T, int H, int N, Wkv7Inputs in, const bf16* dy, const float* s,
                                 const float* sa, Wkv7Grads grads, cudaStream_t stream) {
    if (T % CHUNK != 0) return cudaErrorInvalidValue;
    switch (N) {
        case 32: launch_backward<32>(B, T, H, in, dy, s, sa, grads, stream); break;
        case 64: launch_backward<64>(B, T, H, in, dy, s, sa, grads, stream); break;
        default: return cudaErrorInvalidValue;
    }
    return cudaGetLastError();
}

// RWKV-7 WKV recurrence with the clampw decay (spec §3.4, §4.1): host API of wkv7_clampw.cu.
// Free of torch headers so that CI can compile the kernels with plain nvcc.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

// Exact state is checkpointed after every WKV7_CHUNK_LEN steps; T must be a multiple of it.
constexpr int WKV7_CHUNK_LEN = 16;

// r, w (raw decay logit), k, v, a, b: bf16, each (B, T, H, N) contiguous.
struct Wkv7Inputs {
    const __nv_bfloat16 *r, *w, *k, *v, *a, *b;
};

// Gradients of the six inputs, same layout.
struct Wkv7Grads {
    __nv_bfloat16 *dr, *dw, *dk, *dv, *da, *db;
};

// Head sizes the kernels are instantiated for.
bool wkv7_head_size_supported(int head_size);

// y: bf16 (B, T, H, N). s: fp32 (B, H, T/16, N, N) with s[b, h, c, j, i] = S[i, j] after step 16c+15.
// sa: fp32 (B, T, H, N), sa_t = S_{t-1} a_t. Returns the launch status.
cudaError_t wkv7_clampw_forward(int B, int T, int H, int N, Wkv7Inputs in, __nv_bfloat16* y, float* s,
                                float* sa, cudaStream_t stream);

// Backstepping backward from the forward's s and sa and the output gradient dy (bf16, (B, T, H, N)).
cudaError_t wkv7_clampw_backward(int B, int T, int H, int N, Wkv7Inputs in, const __nv_bfloat16* dy,
                                 const float* s, const float* sa, Wkv7Grads grads, cudaStream_t stream);

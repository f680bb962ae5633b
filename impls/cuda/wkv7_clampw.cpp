// Registers the wkv7 clampw kernels as torch.ops.rwkv_harness_wkv7.{forward, backward} (CUDA only).
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "wkv7_clampw.h"

namespace {

using at::Tensor;

const __nv_bfloat16* bf16_ptr(const Tensor& t) {
    return reinterpret_cast<const __nv_bfloat16*>(t.data_ptr<at::BFloat16>());
}

__nv_bfloat16* bf16_ptr_mut(Tensor& t) { return reinterpret_cast<__nv_bfloat16*>(t.data_ptr<at::BFloat16>()); }

void check_like(const Tensor& t, const char* name, const Tensor& r, at::ScalarType dtype) {
    TORCH_CHECK(t.is_cuda() && t.device() == r.device(), "wkv7_clampw: ", name, " must be on ", r.device());
    TORCH_CHECK(t.scalar_type() == dtype, "wkv7_clampw: ", name, " must be ", dtype, ", got ", t.scalar_type());
    TORCH_CHECK(t.is_contiguous(), "wkv7_clampw: ", name, " must be contiguous");
}

void check_inputs(const Tensor& r, const Tensor& w, const Tensor& k, const Tensor& v, const Tensor& a,
                  const Tensor& b) {
    TORCH_CHECK(r.dim() == 4, "wkv7_clampw: inputs must be (B, T, H, N), got ", r.sizes());
    const int64_t T = r.size(1), N = r.size(3);
    TORCH_CHECK(T % WKV7_CHUNK_LEN == 0, "wkv7_clampw: T=", T, " must be a multiple of ", WKV7_CHUNK_LEN);
    TORCH_CHECK(wkv7_head_size_supported(static_cast<int>(N)), "wkv7_clampw: head size ", N,
                " is not supported (32 or 64)");
    const std::pair<const Tensor*, const char*> all[] = {{&r, "r"}, {&w, "w"}, {&k, "k"},
                                                         {&v, "v"}, {&a, "a"}, {&b, "b"}};
    for (const auto& [t, name] : all) {
        TORCH_CHECK(t->sizes() == r.sizes(), "wkv7_clampw: ", name, " has shape ", t->sizes(), ", r has ",
                    r.sizes());
        check_like(*t, name, r, at::kBFloat16);
    }
}

Wkv7Inputs inputs_of(const Tensor& r, const Tensor& w, const Tensor& k, const Tensor& v, const Tensor& a,
                     const Tensor& b) {
    return {bf16_ptr(r), bf16_ptr(w), bf16_ptr(k), bf16_ptr(v), bf16_ptr(a), bf16_ptr(b)};
}

void check_launch(cudaError_t status, const char* what) {
    TORCH_CHECK(status == cudaSuccess, "wkv7_clampw ", what, " failed: ", cudaGetErrorString(status));
}

std::tuple<Tensor, Tensor, Tensor> forward(const Tensor& r, const Tensor& w, const Tensor& k, const Tensor& v,
                                           const Tensor& a, const Tensor& b) {
    check_inputs(r, w, k, v, a, b);
    const c10::cuda::CUDAGuard guard(r.device());
    const int64_t B = r.size(0), T = r.size(1), H = r.size(2), N = r.size(3);
    Tensor y = at::empty_like(r);
    Tensor s = at::empty({B, H, T / WKV7_CHUNK_LEN, N, N}, r.options().dtype(at::kFloat));
    Tensor sa = at::empty({B, T, H, N}, r.options().dtype(at::kFloat));
    if (r.numel() > 0) {
        check_launch(wkv7_clampw_forward(B, T, H, N, inputs_of(r, w, k, v, a, b), bf16_ptr_mut(y),
                                         s.data_ptr<float>(), sa.data_ptr<float>(),
                                         c10::cuda::getCurrentCUDAStream()),
                     "forward");
    }
    return {y, s, sa};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> backward(const Tensor& r, const Tensor& w,
                                                                    const Tensor& k, const Tensor& v,
                                                                    const Tensor& a, const Tensor& b,
                                                                    const Tensor& dy, const Tensor& s,
                                                                    const Tensor& sa) {
    check_inputs(r, w, k, v, a, b);
    check_like(dy, "dy", r, at::kBFloat16);
    check_like(s, "s", r, at::kFloat);
    check_like(sa, "sa", r, at::kFloat);
    TORCH_CHECK(dy.sizes() == r.sizes() && sa.sizes() == r.sizes(), "wkv7_clampw: dy and sa must match r");
    const c10::cuda::CUDAGuard guard(r.device());
    const int64_t B = r.size(0), T = r.size(1), H = r.size(2), N = r.size(3);
    TORCH_CHECK(s.numel() == B * H * (T / WKV7_CHUNK_LEN) * N * N, "wkv7_clampw: s has the wrong size");
    Tensor dr = at::empty_like(r), dw = at::empty_like(r), dk = at::empty_like(r);
    Tensor dv = at::empty_like(r), da = at::empty_like(r), db = at::empty_like(r);
    if (r.numel() > 0) {
        const Wkv7Grads grads{bf16_ptr_mut(dr), bf16_ptr_mut(dw), bf16_ptr_mut(dk),
                              bf16_ptr_mut(dv), bf16_ptr_mut(da), bf16_ptr_mut(db)};
        check_launch(wkv7_clampw_backward(B, T, H, N, inputs_of(r, w, k, v, a, b), bf16_ptr(dy),
                                          s.data_ptr<float>(), sa.data_ptr<float>(), grads,
                                          c10::cuda::getCurrentCUDAStream()),
                     "backward");
    }
    return {dr, dw, dk, dv, da, db};
}

}  // namespace

TORCH_LIBRARY(rwkv_harness_wkv7, m) {
    m.def("forward(Tensor r, Tensor w, Tensor k, Tensor v, Tensor a, Tensor b) -> (Tensor, Tensor, Tensor)");
    m.def("backward(Tensor r, Tensor w, Tensor k, Tensor v, Tensor a, Tensor b, Tensor dy, Tensor s, Tensor sa)"
          " -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(rwkv_harness_wkv7, CUDA, m) {
    m.impl("forward", &forward);
    m.impl("backward", &backward);
}

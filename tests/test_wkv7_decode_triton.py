"""The fused decode step (Triton kernels for the token shifts and for the time-mix from its matmuls to its output
projection) against the unfused reference step: in fp64, token for token (CPU, under the Triton interpreter in a
subprocess, since ``TRITON_INTERPRET`` must be set before Triton is imported), compiled ahead of time for sm_90; in
bf16 against the fp64 oracle and as a CUDA graph (GPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import REPO, rel_err
from test_inference import decode_all, rwkv_model, tokens

from harness.bench import decoding as inference
from harness.bench.decoding import capture_graph
from harness.errors import HarnessError
from harness.model.decoding import BACKENDS, CompiledDecoder, RWKVDecoder, WKVBackend, reference_wkv
from impls.base import ImplementationError

pytestmark = pytest.mark.filterwarnings("ignore:According to Bo")


def key_major(wkv):
    """``wkv`` holding its state in FLA's key-major layout, as the fla backend does."""
    def run(r, w, k, v, kk, a, state):
        y, final = wkv(r, w, k, v, kk, a, None if state is None else state.transpose(-1, -2))
        return y, final.transpose(-1, -2).contiguous()
    return run


KEY_MAJOR_REFERENCE = WKVBackend("reference_key_major", key_major(reference_wkv), key_major(reference_wkv),
                                 key_major=True)


@torch.no_grad()
def fused_against_unfused(dtype: torch.dtype, layout: str) -> dict[str, float | bool]:
    """Decode 8 tokens after a 5-token prompt with the fused and the unfused step of one model."""
    backend = BACKENDS["reference"] if layout == "value_major" else KEY_MAJOR_REFERENCE
    model = rwkv_model(n_layer=3, n_embd=64, head_size=16).to(dtype)
    idx = tokens(2, 13, 97)
    unfused, unfused_state = decode_all(RWKVDecoder(model, backend), idx, prompt=5)
    fused_decoder = RWKVDecoder(model, backend, fused_step=True)
    fused, fused_state = decode_all(fused_decoder, idx, prompt=5)
    parallel = model(idx)[:, 4:]
    pairs = zip(fused_state.tensors(), unfused_state.tensors(), strict=True)
    return {"logits": rel_err(fused, unfused), "state": max(rel_err(f, u) for f, u in pairs),
            "vs_parallel": rel_err(fused, parallel),
            "greedy_identical": bool(torch.equal(fused.argmax(-1), parallel.argmax(-1))),
            "impl": fused_decoder.impl, "state_dtype": str(fused_state.wkv[0].dtype)}


@torch.no_grad()
def compiled_against_eager(layout: str) -> dict[str, float]:
    """The fused step through torch.compile (its kernels as opaque ops that mutate the state) against the eager one."""
    backend = BACKENDS["reference"] if layout == "value_major" else KEY_MAJOR_REFERENCE
    model = rwkv_model(n_layer=2, n_embd=64, head_size=16)
    idx = tokens(2, 10, 97)
    eager, eager_state = decode_all(RWKVDecoder(model, backend, fused_step=True), idx, prompt=5)
    compiled, compiled_state = decode_all(CompiledDecoder(RWKVDecoder(model, backend, fused_step=True)), idx, 5)
    pairs = zip(compiled_state.tensors(), eager_state.tensors(), strict=True)
    return {"logits": rel_err(compiled, eager), "state": max(rel_err(c, e) for c, e in pairs)}


def interpreted(check: str, *args: str) -> dict:
    code = f"import json, torch, test_wkv7_decode_triton as t; print(json.dumps(t.{check}({', '.join(args)})))"
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": f"{REPO / 'tests'}{os.pathsep}{REPO}"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("layout", ["value_major", "key_major"])
def test_the_fused_step_is_the_unfused_step_in_fp64(layout: str) -> None:
    errors = interpreted("fused_against_unfused", "torch.float64", repr(layout))
    assert errors["impl"] == "reference+fused" if layout == "value_major" else "reference_key_major+fused"
    assert errors["state_dtype"] == "torch.float64"
    assert errors["logits"] < 1e-12 and errors["state"] < 1e-12, errors
    assert errors["vs_parallel"] < 1e-10 and errors["greedy_identical"], errors


def test_the_fused_step_in_fp32_stays_at_fp32_rounding() -> None:
    errors = interpreted("fused_against_unfused", "torch.float32", "'value_major'")
    assert errors["logits"] < 1e-5 and errors["state"] < 1e-5 and errors["greedy_identical"], errors


@pytest.mark.parametrize("layout", ["value_major", "key_major"])
def test_the_compiled_fused_step_is_the_eager_fused_step(layout: str) -> None:
    errors = interpreted("compiled_against_eager", repr(layout))
    assert errors["logits"] < 1e-5 and errors["state"] < 1e-5, errors


@torch.no_grad()
def test_on_a_cpu_without_the_interpreter_the_fused_step_is_one_line(monkeypatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    model = rwkv_model(n_layer=2, n_embd=64, head_size=16)
    decoder = RWKVDecoder(model, BACKENDS["reference"], fused_step=True)
    logits, state = decoder.prefill(tokens(1, 4, 97))
    with pytest.raises(ImplementationError, match="needs a CUDA GPU .* TRITON_INTERPRET=1"):
        decoder.step(logits.argmax(-1, keepdim=True), state)


def test_without_triton_the_fused_step_is_one_line(monkeypatch) -> None:
    import impls
    from harness.model import decoding

    monkeypatch.setitem(sys.modules, "triton", None)  # what an install without the fla extra has
    monkeypatch.delitem(sys.modules, "impls.wkv7_decode_triton", raising=False)
    monkeypatch.delattr(impls, "wkv7_decode_triton", raising=False)
    decoding.fused_kernels.cache_clear()
    try:
        with pytest.raises(HarnessError, match=r"needs Triton \(triton is not installed\)"):
            RWKVDecoder(rwkv_model(n_layer=2, n_embd=64, head_size=16), BACKENDS["reference"], fused_step=True)
    finally:
        decoding.fused_kernels.cache_clear()


def test_a_head_size_the_kernel_cannot_hold_is_one_line() -> None:
    from impls.wkv7_decode_triton import wkv7_decode_step

    att = rwkv_model(n_layer=2, n_embd=96, head_size=48).blocks[1].att
    x = torch.zeros(1, 96)
    with pytest.raises(ImplementationError, match="power-of-two head size"):
        wkv7_decode_step(att, torch.zeros(1, 2, 48, 48), (x,) * 7, x)


def test_the_decoding_bench_times_a_fused_twin_of_every_rwkv_impl(tmp_path) -> None:
    from test_inference import TINY, read_rows

    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-m", "harness.bench", "inference", *TINY, "models=rwkv", "fused_step=1",
                           "lengths=8", "batches=1", f"out={tmp_path}", f"figures={tmp_path}"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_rows(tmp_path / "inference.csv")
    assert sorted((row["impl"], row["status"]) for row in rows) == [("reference", "ok"), ("reference+fused", "ok")]
    plain, fused = sorted(rows, key=lambda row: row["impl"])
    assert fused["state_bytes_measured"] == plain["state_bytes_measured"]


# --- GPU ----------------------------------------------------------------------------------------------------------


def gpu_model(dtype: torch.dtype):
    return rwkv_model(n_layer=3, n_embd=256, head_size=64, vocab=1000).to("cuda", dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["rwkv", "fla"])
@torch.no_grad()
def test_fused_bf16_steps_are_as_close_to_fp64_as_the_unfused_ones(backend: str) -> None:
    idx = tokens(2, 80, 1000, "cuda")
    want, _ = decode_all(RWKVDecoder(gpu_model(torch.float64), BACKENDS["reference"]), idx, 64)
    fused, fused_state = decode_all(RWKVDecoder(gpu_model(torch.bfloat16), BACKENDS[backend], fused_step=True),
                                    idx, 64)
    unfused, _ = decode_all(RWKVDecoder(gpu_model(torch.bfloat16), BACKENDS[backend]), idx, 64)
    fused_err, unfused_err = rel_err(fused, want), rel_err(unfused, want)
    print(f"\n{backend}: bf16 logits vs fp64, fused {fused_err:.2e}, unfused {unfused_err:.2e}")
    assert fused_err < max(2 * unfused_err, 1e-2)
    assert fused_state.key_major == BACKENDS[backend].key_major


@pytest.mark.gpu
@torch.no_grad()
def test_fused_fp32_steps_decode_greedily_as_the_parallel_forward() -> None:
    model = gpu_model(torch.float32)
    idx = tokens(2, 80, 1000, "cuda")
    fused, _ = decode_all(RWKVDecoder(model, BACKENDS["reference"], fused_step=True), idx, 64)
    parallel = model(idx)[:, 63:]
    assert rel_err(fused, parallel) < 1e-4 and torch.equal(fused.argmax(-1), parallel.argmax(-1))


@pytest.mark.gpu
@torch.no_grad()
def test_the_fused_step_replays_as_a_cuda_graph_like_its_eager_steps() -> None:
    decoder = RWKVDecoder(gpu_model(torch.bfloat16), BACKENDS["rwkv"], fused_step=True)
    idx = tokens(2, 64, 1000, "cuda")

    def run(graph: bool) -> torch.Tensor:
        logits, state = decoder.prefill(idx, 0)
        token = logits.argmax(-1, keepdim=True)

        def greedy() -> None:
            token.copy_(decoder.step(token, state).argmax(-1, keepdim=True))

        replay = capture_graph(greedy).replay if graph else greedy
        for _ in range(0 if graph else inference.CAPTURE_WARMUP):
            greedy()
        for _ in range(6):
            replay()
        torch.cuda.synchronize()
        return torch.cat([token, *[s.flatten(1) for s in state.wkv]], dim=1).float()

    assert rel_err(run(graph=True), run(graph=False)) < 1e-6


# --- compiled for the GPU without one ------------------------------------------------------------------------------


def hopper_compile(kernel, constants: dict[str, object], pointer_types: dict[str, str]) -> str:
    """PTX of ``kernel`` for sm_90 (Triton compiles ahead of time without a GPU)."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = kernel.arg_names
    signature = {name: "constexpr" if name in constants else pointer_types.get(name, "i32") for name in names}
    source = ASTSource(fn=kernel, signature=signature,
                       constexprs={(names.index(name),): value for name, value in constants.items()})
    return triton.compile(source, target=GPUTarget("cuda", 90, 32)).asm["ptx"]


@pytest.mark.parametrize("fp64", [False, True])
@pytest.mark.parametrize("value_residual", [False, True])
@pytest.mark.parametrize("head_size", [16, 64, 128])
def test_the_decode_step_kernel_compiles_for_hopper(fp64: bool, value_residual: bool, head_size: int) -> None:
    from impls import wkv7_decode_triton as fused

    data = "*fp64" if fp64 else "*bf16"
    pointers = {name: data for name in fused._decode_step_kernel.arg_names} | {
        "S": "*fp64" if fp64 else "*fp32", "eps": "fp32"} | {f"stride_{axis}": "i32" for axis in "bhij"}
    constants = {"H": 12, "N": head_size, "W_LOG": fused.W_SCALE, "NORM_EPS": fused.NORMALIZE_EPS,
                 "VALUE_RESIDUAL": value_residual, "FP64": fp64}
    assert ".entry _decode_step_kernel" in hopper_compile(fused._decode_step_kernel, constants, pointers)


@pytest.mark.parametrize("mixes", [1, 6])
def test_the_token_shift_kernel_compiles_for_hopper(mixes: int) -> None:
    from impls import wkv7_decode_triton as fused

    names = fused._token_shift_mix_kernel.arg_names
    pointers = {name: "*bf16" for name in names if name not in ("numel", "C")}
    constants = {"MIXES": mixes, "BLOCK": fused.SHIFT_BLOCK, "FP64": False}
    assert ".entry _token_shift_mix_kernel" in hopper_compile(fused._token_shift_mix_kernel, constants, pointers)

"""The decoding benchmark: RWKV's carried-state path against its parallel forward, the baselines' caches, parameter
matching, the grid's rows and figures (CPU); the CUDA and FLA decode paths and CUDA graphs (GPU)."""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import pytest
import torch
from helpers import assert_one_line_user_error, perturb, rel_err

import impls
from harness.bench import decoding as inference
from harness.bench import decoding_report
from harness.bench.cli import main as bench_main
from harness.bench.decoding import FIELDS, capture_graph, time_decode
from harness.errors import HarnessError
from harness.model import decoding
from harness.model.baselines import (
    LSTMLM,
    CausalTransformer,
    lstm_params,
    matched_lstm_layers,
    matched_mlp_width,
    transformer_params,
)
from harness.model.decoding import BACKENDS, RWKVDecoder
from harness.model.rwkv import RWKV, ModelConfig, count_parameters

pytestmark = pytest.mark.filterwarnings("ignore:According to Bo")

TINY = ["device=cpu", "dtype=fp32", "impls=reference", "n_layer=2", "n_embd=64", "head_size=32", "vocab=97",
        "lengths=8,16", "batches=1,2", "decode_warmup=1", "decode_tokens=4", "prefill_reps=1"]


def rwkv_model(impl: str = "reference", n_layer: int = 3, n_embd: int = 64, head_size: int = 32,
               vocab: int = 97) -> RWKV:
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=n_layer, n_embd=n_embd, head_size=head_size, vocab_size=vocab, ctx_len=256)
    model = RWKV(impls.get(impl), cfg)
    model.load_state_dict(perturb(model.state_dict(), seed=1))
    return model.eval()


def tokens(batch: int, length: int, vocab: int, device: str = "cpu") -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(2)).to(device)


@torch.no_grad()
def decode_all(decoder, idx: torch.Tensor, prompt: int) -> tuple[torch.Tensor, object]:
    """Logits at positions prompt-1 .. T-1 (B, T - prompt + 1, V): prefill the prompt, then one step per token."""
    logits, state = decoder.prefill(idx[:, :prompt], idx.shape[1])
    out = [logits]
    for t in range(prompt, idx.shape[1]):
        out.append(decoder.step(idx[:, t:t + 1], state))
    return torch.stack(out, dim=1), state


# --- RWKV: single-step path against the parallel (training) forward -------------------------------------------


@torch.no_grad()
def test_rwkv_steps_match_parallel_forward_and_its_state() -> None:
    model = rwkv_model()
    idx = tokens(2, 12, 97)
    decoder = RWKVDecoder(model, BACKENDS["reference"])
    parallel = model(idx)
    stepped, state = decode_all(decoder, idx, prompt=5)
    assert rel_err(stepped, parallel[:, 4:]) < 1e-4
    _, long_pass = decoder.prefill(idx)
    for name, got, want in zip(("att_x", "ffn_x", "wkv"), (state.att_x, state.ffn_x, state.wkv),
                               (long_pass.att_x, long_pass.ffn_x, long_pass.wkv), strict=True):
        for layer, (g, w) in enumerate(zip(got, want, strict=True)):
            assert rel_err(g, w) < 1e-5, (name, layer)
    assert state.wkv[0].dtype == torch.float32 and state.wkv[0].shape == (2, 2, 32, 32)


@torch.no_grad()
def test_rwkv_prefill_is_the_training_forward() -> None:
    model = rwkv_model()
    idx = tokens(2, 9, 97)
    logits, _ = RWKVDecoder(model, BACKENDS["reference"]).prefill(idx)
    torch.testing.assert_close(logits, model(idx)[:, -1], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_rwkv_state_bytes_match_the_formula(dtype: torch.dtype) -> None:
    model = rwkv_model(n_layer=2).to(dtype)
    decoder = RWKVDecoder(model, BACKENDS["reference"])
    _, state = decoder.prefill(tokens(3, 4, 97))
    measured = sum(t.numel() * t.element_size() for t in state.tensors())
    H, N, C = 2, 32, 64
    assert measured == decoder.analytic_state_bytes(3) == 2 * 3 * (H * N * N * 4 + 2 * C * dtype.itemsize)


def test_state_layout_flag_transposes_to_value_major() -> None:
    s = torch.arange(8.0).view(1, 1, 2, 4)[..., :2]
    state = decoding.RWKVState([], [], [s], key_major=True)
    assert torch.equal(state.wkv_value_major()[0], s.transpose(-1, -2))
    assert BACKENDS["fla"].key_major and not BACKENDS["rwkv"].key_major


# --- baselines ------------------------------------------------------------------------------------------------


@torch.no_grad()
def test_transformer_cached_decoding_matches_uncached_forward() -> None:
    torch.manual_seed(0)
    model = CausalTransformer(vocab=97, n_layer=2, n_embd=64, head_size=32, mlp_width=128).eval()
    idx = tokens(2, 12, 97)
    stepped, cache = decode_all(model, idx, prompt=5)
    assert rel_err(stepped, model(idx)[:, 4:]) < 1e-5
    assert int(cache.pos) == 12
    assert sum(t.numel() * t.element_size() for t in cache.tensors()) == model.analytic_state_bytes(2, 12) \
        == 2 * 2 * 2 * 12 * 64 * 4


@torch.no_grad()
def test_transformer_cache_capacity_beyond_the_tokens_is_masked() -> None:
    torch.manual_seed(0)
    model = CausalTransformer(vocab=97, n_layer=2, n_embd=64, head_size=32, mlp_width=128).eval()
    idx = tokens(1, 8, 97)
    roomy, _ = model.prefill(idx[:, :4], capacity=50)
    exact, _ = model.prefill(idx[:, :4], capacity=4)
    assert torch.equal(roomy, exact)
    cache = model.prefill(idx[:, :4], capacity=50)[1]
    torch.testing.assert_close(model.step(idx[:, 4:5], cache), model(idx[:, :5])[:, -1], rtol=1e-5, atol=1e-5)
    with pytest.raises(HarnessError, match="capacity"):
        model.prefill(idx, capacity=4)


@torch.no_grad()
def test_lstm_steps_match_full_sequence() -> None:
    torch.manual_seed(0)
    model = LSTMLM(vocab=97, n_layer=3, n_embd=64).eval()
    idx = tokens(2, 10, 97)
    stepped, state = decode_all(model, idx, prompt=4)
    full, full_state = model(idx)
    assert rel_err(stepped, full[:, 3:]) < 1e-5
    assert rel_err(state.h, full_state.h) < 1e-5 and rel_err(state.c, full_state.c) < 1e-5
    assert state.h.shape == (3, 2, 64)
    measured = sum(t.numel() * t.element_size() for t in state.tensors())
    assert measured == model.analytic_state_bytes(2) == 3 * 2 * 2 * 64 * 4


def test_parameter_formulas_count_the_modules() -> None:
    assert count_parameters(CausalTransformer(97, 3, 64, 32, 192)) == transformer_params(97, 3, 64, 192)
    assert count_parameters(LSTMLM(97, 3, 64)) == lstm_params(97, 3, 64)


def test_baselines_match_rwkv_l12_d768_parameters_within_two_percent() -> None:
    target = count_parameters(RWKV(impls.get("reference"), ModelConfig(n_layer=12, n_embd=768)))
    width = matched_mlp_width(target, 65536, 12, 768)
    layers = matched_lstm_layers(target, 65536, 768)
    print(f"RWKV {target:,}; transformer MLP {width}: {transformer_params(65536, 12, 768, width):,}; "
          f"LSTM {layers} layers: {lstm_params(65536, layers, 768):,}")
    assert width % 64 == 0 and abs(transformer_params(65536, 12, 768, width) / target - 1) < 0.02
    assert abs(lstm_params(65536, layers, 768) / target - 1) < 0.02


# --- timing and the grid ------------------------------------------------------------------------------------------


def test_cpu_timer_times_every_step() -> None:
    calls = []
    timing = time_decode(lambda: calls.append(1), torch.device("cpu"), warmup=2, tokens=5, graphs=True)
    assert len(calls) == 7 and len(timing.samples_ms) == 5 and not timing.graphs and timing.timer == "perf_counter"


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_bench_writes_a_tidy_csv_and_figures(tmp_path: Path) -> None:
    bench_main(["inference", *TINY, f"out={tmp_path}", f"figures={tmp_path}/fig"])
    rows = read_rows(tmp_path / "inference.csv")
    assert tuple(rows[0]) == FIELDS and len(rows) == 2 * 2 * 3
    assert {(r["model"], r["impl"]) for r in rows} == {("rwkv", "reference"), ("transformer", "sdpa"),
                                                      ("lstm", "nn.LSTM")}
    for r in rows:
        assert r["status"] == "ok" and r["graphs"] == "False" and r["timer"] == "perf_counter"
        assert int(r["batch"]) in (1, 2) and int(r["L"]) in (8, 16) and int(r["params"]) > 0
        assert float(r["prefill_ms"]) > 0 and float(r["decode_ms_p20"]) <= float(r["decode_ms_median"]) \
            <= float(r["decode_ms_p80"])
        assert float(r["tokens_per_s"]) == pytest.approx(int(r["batch"]) * 1e3 / float(r["decode_ms_median"]),
                                                         rel=1e-3)
        assert int(r["state_bytes_measured"]) == int(r["state_bytes_analytic"]) > 0
        assert r["peak_mem_gib"] == "" and r["size"] == "L2-D64" and r["dtype"] == "fp32"
    kv = [r for r in rows if r["model"] == "transformer"]
    assert all(int(r["cache_len"]) == int(r["L"]) + inference.decode_steps(inference.InferenceConfig(
        decode_warmup=1, decode_tokens=4)) for r in kv)
    figures = {name: (tmp_path / "fig" / f"inference_{name}.png").read_bytes()
               for name in ("latency", "memory", "prefill")}
    assert all(data.startswith(b"\x89PNG") for data in figures.values())
    bench_main(["inference", f"out={tmp_path}", f"figures={tmp_path}/fig", "--plot-only"])
    assert all((tmp_path / "fig" / f"inference_{n}.png").read_bytes() == data for n, data in figures.items())


def test_summary_table_reads_latency_at_chosen_lengths_and_state_at_the_longest(tmp_path: Path) -> None:
    bench_main(["inference", *TINY, f"out={tmp_path}", f"figures={tmp_path}/fig"])
    frame = decoding_report.read_csv(tmp_path / "inference.csv")
    table = decoding_report.summary_table(frame, lengths=(8, 16, 4096))  # 4096 was not measured: no column
    assert [c for c in table.columns if c.startswith("decode_ms_")] == ["decode_ms_L8", "decode_ms_L16"]
    assert len(table) == 3 * 2 and set(table["at_L"]) == {16}
    row = table[(table["model"] == "transformer") & (table["batch"] == 2)].iloc[0]
    source = frame[(frame["model"] == "transformer") & (frame["batch"] == 2)].set_index("L")
    assert row["decode_ms_L8"] == source.loc[8, "decode_ms_median"]
    assert row["state_mib"] == source.loc[16, "state_bytes_measured"] / 2**20


def test_step_ops_counts_compute_not_views() -> None:
    class Doubler:
        model_name, impl = "toy", "toy"
        module = torch.nn.Linear(4, 4)

        def prefill(self, idx, capacity):
            return None, None

        def step(self, idx, state):
            x = idx.view(-1, 1).expand(-1, 4).reshape(-1, 4)  # views only
            return (x * 2) + 1  # two operators

    assert inference.step_ops(Doubler()) == 2


def test_op_count_file_has_one_row_per_model(tmp_path: Path) -> None:
    bench_main(["inference", "--count-ops", *TINY, f"out={tmp_path}"])
    frame = __import__("pandas").read_csv(tmp_path / "inference_ops.csv")
    assert list(frame["model"]) == ["rwkv", "transformer", "lstm"]
    assert (frame["ops_per_layer"] == frame["ops_per_step"] / frame["layers"]).all()
    # RWKV-7's step (token shifts, five LoRAs, the WKV update, group norm) dispatches more per layer than attention
    rwkv, transformer = frame["ops_per_layer"].iloc[0], frame["ops_per_layer"].iloc[1]
    assert rwkv > 2 * transformer > 0


@pytest.mark.parametrize("name", ["rwkv", "transformer"])
def test_compiled_decode_steps_match_the_eager_ones(name: str) -> None:
    torch.manual_seed(0)
    eager = RWKVDecoder(rwkv_model(), BACKENDS["reference"]) if name == "rwkv" else \
        CausalTransformer(97, 2, 64, 32, 128).eval()
    compiled = decoding.CompiledDecoder(eager)
    assert compiled.impl == f"{eager.impl}+compile" and compiled.model_name == eager.model_name
    idx = tokens(2, 12, 97)
    expected, expected_state = decode_all(eager, idx, prompt=6)
    got, got_state = decode_all(compiled, idx, prompt=6)
    assert rel_err(got, expected) < 1e-5
    assert max(rel_err(g, e) for g, e in zip(got_state.tensors(), expected_state.tensors(), strict=True)) < 1e-5


def test_compile_adds_a_compiled_twin_of_every_model(tmp_path: Path) -> None:
    bench_main(["inference", *TINY, "models=rwkv,lstm", "lengths=8", "batches=1", "compile=1", f"out={tmp_path}",
                f"figures={tmp_path}"])
    rows = read_rows(tmp_path / "inference.csv")
    assert [(r["model"], r["impl"]) for r in rows] == [("rwkv", "reference"), ("lstm", "nn.LSTM"),
                                                       ("rwkv", "reference+compile"), ("lstm", "nn.LSTM+compile")]
    assert all(r["status"] == "ok" for r in rows)
    assert rows[0]["state_bytes_measured"] == rows[2]["state_bytes_measured"]


def test_out_of_memory_is_a_status_and_skips_longer_contexts(tmp_path: Path, monkeypatch) -> None:
    measure = inference.measure

    def lstm_runs_out(decoder, batch, length, cfg):
        if decoder.model_name == "lstm" and length == 16:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return measure(decoder, batch, length, cfg)

    monkeypatch.setattr(inference, "measure", lstm_runs_out)
    bench_main(["inference", *TINY, "batches=1", "lengths=8,16,32", f"out={tmp_path}", f"figures={tmp_path}"])
    status = {(r["model"], r["L"]): r["status"] for r in read_rows(tmp_path / "inference.csv")}
    assert status[("lstm", "8")] == "ok" and status[("lstm", "16")] == "oom"
    assert status[("lstm", "32")] == "skipped (oom at L=16)"
    assert status[("rwkv", "32")] == status[("transformer", "32")] == "ok"


def test_a_model_failing_its_warm_start_is_skipped(tmp_path: Path, monkeypatch) -> None:
    def broken(self, idx, capacity):
        raise RuntimeError("no kernel image is available for execution on the device")

    monkeypatch.setattr(LSTMLM, "prefill", broken)
    bench_main(["inference", *TINY, f"out={tmp_path}", f"figures={tmp_path}"])
    rows = read_rows(tmp_path / "inference.csv")
    assert {r["status"] for r in rows if r["model"] == "lstm"} == {
        "skipped (warm start: error (RuntimeError: no kernel image is available for execution on the device))"}
    assert all(r["status"] == "ok" for r in rows if r["model"] != "lstm")


def test_time_budget_skips_the_rest(tmp_path: Path) -> None:
    bench_main(["inference", *TINY, "time_budget_s=1e-9", f"out={tmp_path}", f"figures={tmp_path}"])
    assert all(r["status"].startswith("skipped (time budget") for r in read_rows(tmp_path / "inference.csv"))


def test_resume_measures_only_what_the_budget_skipped_and_keeps_the_rest_as_written(tmp_path: Path) -> None:
    run = ["inference", *TINY, f"out={tmp_path}", f"figures={tmp_path}"]
    csv_path = tmp_path / "inference.csv"
    bench_main([*run, "time_budget_s=1e-9"])
    bench_main([*run, "resume=true"])
    measured = csv_path.read_bytes()
    rows = read_rows(csv_path)[12:]  # appended after the 12 rows the budget skipped
    assert len(rows) == 12 and all(r["status"] == "ok" for r in rows)
    bench_main([*run, "resume=true"])  # nothing left to measure: the file is left as it was
    assert csv_path.read_bytes() == measured
    bench_main([*run])  # without resume every row is measured again, and appended
    again = read_rows(csv_path)[24:]
    assert len(again) == 12 and ([r["timestamp"] for r in again] != [r["timestamp"] for r in rows] or
                                 [r["decode_ms_median"] for r in again] != [r["decode_ms_median"] for r in rows])


def test_resume_keeps_rows_of_this_gpu_only_and_failures_block_longer_contexts(tmp_path: Path) -> None:
    run = ["inference", *TINY, f"out={tmp_path}", f"figures={tmp_path}"]
    csv_path = tmp_path / "inference.csv"
    bench_main(run)
    rows = read_rows(csv_path)
    for row in rows:
        if row["model"] == "lstm":
            row["gpu"] = "Another GPU"  # measured elsewhere: measured again here
        elif row["model"] == "transformer" and row["batch"] == "1":  # failed at L=8, L=16 left by the budget:
            row["status"] = "oom" if row["L"] == "8" else "skipped (time budget time_budget_s=1 used up)"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    bench_main([*run, "resume=true"])
    after = {(r["model"], r["batch"], r["L"]): r for r in read_rows(csv_path)}
    assert all(r["gpu"] == "" and r["status"] == "ok" for k, r in after.items() if k[0] == "lstm")
    assert after[("transformer", "1", "8")]["status"] == "oom"
    assert after[("transformer", "1", "16")]["status"] == "skipped (oom at L=8)"  # not tried: it would fail too
    assert after[("transformer", "2", "16")]["status"] == "ok"
    kept = [r for r in rows if r["model"] == "rwkv"]
    assert [after[(r["model"], r["batch"], r["L"])] for r in kept] == kept  # kept as written


@pytest.mark.parametrize(("words", "message"), [
    (["models=rwkv,gru"], "unknown model(s) gru"),
    (["impls=rwkv"], "needs a CUDA GPU"),
    (["impls=cuda"], "unknown RWKV impl(s) cuda"),
    (["dtype=fp16"], "dtype=fp16"),
    (["n_layer=1"], "n_layer must be at least 2"),
    (["fused_step=1"], "the fused decode step is a Triton kernel: it needs a CUDA GPU"),
    pytest.param(["device=cuda"], "no CUDA GPU", marks=pytest.mark.skipif(torch.cuda.is_available(),
                                                                         reason="a GPU is visible")),
])
def test_bad_configurations_are_one_line_errors(words: list[str], message: str, tmp_path: Path, capsys) -> None:
    assert_one_line_user_error(lambda: bench_main(["inference", *TINY, *words, f"out={tmp_path}"]), message, capsys)


# --- GPU ----------------------------------------------------------------------------------------------------------


def gpu_rwkv(impl: str, dtype: torch.dtype) -> RWKV:
    return rwkv_model(impl, n_layer=3, n_embd=256, head_size=64, vocab=1000).to("cuda", dtype)


@pytest.mark.gpu
@torch.no_grad()
def test_rwkv_cuda_prefill_and_steps_match_parallel_forward_in_bf16() -> None:
    """impl=rwkv: prefill on the CUDA kernel, bf16 single steps on the reference recurrence, against the bf16
    parallel forward on the CUDA kernel and both against the fp32 reference."""
    idx = tokens(2, 96, 1000, "cuda")
    parallel = gpu_rwkv("rwkv", torch.bfloat16)(idx).float()
    want = gpu_rwkv("reference", torch.float32)(idx)
    stepped, state = decode_all(RWKVDecoder(gpu_rwkv("rwkv", torch.bfloat16), BACKENDS["rwkv"]), idx, prompt=48)
    _, want_state = decode_all(RWKVDecoder(gpu_rwkv("reference", torch.float32), BACKENDS["reference"]), idx, 48)
    step_err, parallel_err = rel_err(stepped, parallel[:, 47:]), rel_err(parallel[:, 47:], want[:, 47:])
    state_err = max(rel_err(g, w) for g, w in zip(state.wkv, want_state.wkv, strict=True))
    print(f"\nbf16 steps vs bf16 parallel {step_err:.2e}; vs fp32 {rel_err(stepped, want[:, 47:]):.2e}; "
          f"bf16 parallel vs fp32 {parallel_err:.2e}; WKV state vs fp32 {state_err:.2e}")
    assert step_err < 2e-2 and rel_err(stepped, want[:, 47:]) < max(3 * parallel_err, 2e-2) and state_err < 3e-2


@pytest.mark.gpu
@torch.no_grad()
def test_fla_chunk_prefill_and_recurrent_steps_match_reference() -> None:
    idx = tokens(2, 160, 1000, "cuda")
    want, want_state = decode_all(RWKVDecoder(gpu_rwkv("reference", torch.float32), BACKENDS["reference"]), idx, 96)
    got, state = decode_all(RWKVDecoder(gpu_rwkv("reference", torch.bfloat16), BACKENDS["fla"]), idx, 96)
    plain, _ = decode_all(RWKVDecoder(gpu_rwkv("reference", torch.bfloat16), BACKENDS["reference"]), idx, 96)
    state_err = max(rel_err(g, w) for g, w in zip(state.wkv_value_major(), want_state.wkv, strict=True))
    print(f"\nfla bf16 vs fp32 reference: logits {rel_err(got, want):.2e} (reference bf16 {rel_err(plain, want):.2e}), "
          f"WKV state {state_err:.2e}")
    assert state.wkv[0].shape == (2, 4, 64, 64) and state.key_major
    assert rel_err(got, want) < max(5 * rel_err(plain, want), 3e-2) and state_err < 3e-2


def gpu_decoders() -> dict[str, object]:
    torch.manual_seed(0)
    return {"rwkv": RWKVDecoder(gpu_rwkv("reference", torch.bfloat16), BACKENDS["rwkv"]),
            "fla": RWKVDecoder(gpu_rwkv("reference", torch.bfloat16), BACKENDS["fla"]),
            "transformer": CausalTransformer(1000, 3, 256, 64, 512).to("cuda", torch.bfloat16),
            "lstm": LSTMLM(1000, 3, 256).to("cuda", torch.bfloat16)}


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["rwkv", "transformer"])  # fla+compile: whatever Dynamo makes of FLA's kernels
@torch.no_grad()
def test_compiled_step_as_a_cuda_graph_matches_the_eager_step(name: str) -> None:
    eager = gpu_decoders()[name]
    compiled = decoding.CompiledDecoder(eager)
    idx = tokens(2, 64, 1000, "cuda")
    logits, state = eager.prefill(idx, 64 + inference.CAPTURE_WARMUP + 2)
    token = logits.argmax(-1, keepdim=True)
    compiled_state = type(state)(**{f.name: [t.clone() for t in v] if isinstance(v, list) else
                                    (v.clone() if isinstance(v, torch.Tensor) else v)
                                    for f in dataclasses.fields(state) for v in [getattr(state, f.name)]})
    out = torch.empty_like(logits)
    replay = capture_graph(lambda: out.copy_(compiled.step(token, compiled_state))).replay  # CAPTURE_WARMUP steps
    for _ in range(inference.CAPTURE_WARMUP + 1):
        expected = eager.step(token, state)
    replay()
    torch.cuda.synchronize()
    assert rel_err(out, expected) < 3e-2
    pairs = zip(compiled_state.tensors(), state.tensors(), strict=True)
    assert max(rel_err(c.float(), e.float()) for c, e in pairs) < 3e-2


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["rwkv", "fla", "transformer", "lstm"])
@torch.no_grad()
def test_cuda_graph_replay_decodes_like_eager_steps(name: str) -> None:
    decoder = gpu_decoders()[name]
    idx = tokens(2, 64, 1000, "cuda")
    steps = 6

    def run(graph: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        logits, state = decoder.prefill(idx, 64 + inference.CAPTURE_WARMUP + steps)
        token = logits.argmax(-1, keepdim=True)

        def greedy() -> None:
            token.copy_(decoder.step(token, state).argmax(-1, keepdim=True))

        if graph:  # a capture that fails is a failure: every decoder's step is captured on an H100 (inference.csv)
            replay = capture_graph(greedy).replay  # runs CAPTURE_WARMUP eager steps first
        else:
            replay = greedy
            for _ in range(inference.CAPTURE_WARMUP):
                greedy()
        for _ in range(steps):
            replay()
        torch.cuda.synchronize()
        return token.clone(), [t.float() for t in state.tensors()]

    eager_token, eager_state = run(graph=False)
    graph_token, graph_state = run(graph=True)
    assert torch.equal(eager_token, graph_token)
    assert max(rel_err(g, e) for g, e in zip(graph_state, eager_state, strict=True)) < 1e-3


@pytest.mark.gpu
def test_bench_smoke_on_gpu(tmp_path: Path) -> None:
    bench_main(["inference", "device=cuda", "dtype=bf16", "impls=reference,rwkv,fla", "n_layer=2", "n_embd=128",
                "head_size=64", "vocab=1000", "lengths=32,64", "batches=1,4", "decode_warmup=2", "decode_tokens=16",
                f"out={tmp_path}", f"figures={tmp_path}"])
    rows = read_rows(tmp_path / "inference.csv")
    print("\n" + "\n".join(f"{r['model']}/{r['impl']} B={r['batch']} L={r['L']}: {r['status']} graphs={r['graphs']} "
                           f"decode {r['decode_ms_median']} ms" for r in rows))
    assert all(r["status"] == "ok" for r in rows)
    assert all(r["graphs"] == "True" for r in rows), "a decode step fell back to eager steps: its capture failed"
    assert all(float(r["peak_mem_gib"]) > 0 and int(r["decode_peak_bytes"]) >= int(r["state_bytes_measured"])
               for r in rows)

"""Autoregressive decoding benchmark: ``python -m harness.bench inference [key=value ...] [--plot-only]``.

RWKV-7 decoding one token per step from its recurrent state, against a parameter-matched causal Transformer with a
KV cache and a parameter-matched LSTM, after a prefill of L tokens (anchors-survey §C: the published claims time
parallel forwards without synchronisation and measure no memory; this measures decoding).

Models (same width, vocabulary and, for the Transformer, depth; parameter counts in the ``params`` column):

* ``rwkv``: :class:`harness.model.RWKV` with the reference time-mix modules. Prefill runs the parallel (training)
  forward and keeps, per layer, the last ln1 and ln2 outputs (the two token shifts) and the WKV state; decoding
  runs the same :meth:`TimeMix.project` / :meth:`TimeMix.readout` / :meth:`ChannelMix.mix` math on T=1 with the
  carried shifts. Only the WKV differs by ``impl`` (:data:`BACKENDS`):
  ``reference`` (sequential PyTorch loop for both), ``rwkv`` (prefill on the wkv7 clampw CUDA kernel, whose last
  per-chunk snapshot is the final state; decoding on the reference recurrence for one step, fp32 math on the GPU),
  ``fla`` (prefill ``chunk_rwkv7``, decoding ``fused_mul_recurrent_rwkv7``; FLA's state is [B, H, K, V], the
  transpose of ours, and stays in FLA's layout while decoding).
* ``transformer``: pre-LN GPT block (LayerNorm, fused qkv, rotary positions, SDPA, GELU MLP), same n_layer,
  n_embd, head size and vocabulary, MLP width chosen so the total parameter count matches RWKV's
  (:func:`matched_mlp_width`). Prefill is SDPA causal over L and fills a KV cache allocated for L + every decode
  step; a decode step writes one slot and attends over the whole cache with a mask (static shapes, so the step
  can be a CUDA graph; the masked tail is at most ``decode_steps`` slots).
* ``lstm``: ``nn.LSTM`` of the same width and vocabulary, layer count matched to RWKV's parameters.

``compile=1`` adds a twin of every model whose decode step runs through ``torch.compile`` (:class:`CompiledDecoder`,
impl ``<impl>+compile``; prefill stays eager): what the same models decode at when TorchInductor fuses the small
operators of an eager step, the cost that bounds a small model's eager decoding (``--count-ops``).
``fused_step=1`` adds a twin of every RWKV impl whose decode step runs each layer's WKV update and readout (GroupNorm,
bonus, gate) as one Triton kernel (:mod:`impls.wkv7_decode_triton`, impl ``<impl>+fused``; the prefill stays the
impl's); with ``compile=1`` too, those are compiled as well (``<impl>+fused+compile``).

Timing. Before the grid every model runs once untimed (batch 1, the shortest L, one decode step: the CUDA build,
Triton autotuning and cuDNN/cuBLAS set-up happen there). Prefill: ``prefill_warmup`` untimed runs, then the median
of ``prefill_reps`` runs between two ``torch.cuda.synchronize()``. Decode: greedy (each step feeds its own argmax
back, on the device), captured as a CUDA graph with static state buffers after ``CAPTURE_WARMUP`` eager steps
(``graphs=0``, or a failed capture, replays the eager step instead; column ``graphs``), ``decode_warmup`` untimed
steps, then ``decode_tokens`` steps each between two CUDA events: median and p20/p80 per token, plus
``decode_ms_wall`` (wall time of all timed steps over their number, host gaps included). Without CUDA every step is
timed with ``time.perf_counter``.

Memory. ``state_bytes_measured``: bytes of the state / cache tensors actually held after prefill;
``state_bytes_analytic``: RWKV n_layer·B·(H·N·N·4 + 2·C·dtype bytes), KV cache n_layer·B·2·cache_len·C·dtype bytes,
LSTM layers·B·2·C·dtype bytes. ``prefill_peak_bytes`` / ``decode_peak_bytes``: ``torch.cuda.max_memory_allocated``
during prefill / decoding minus what was allocated before the prefill (all models' weights), so activations, state
and (decode) the graph's pool; ``peak_mem_gib`` = this model's weights + the larger of the two.

Grid: L ascending (outermost), then batch, then model. An out-of-memory error, a failure or a warm-up prefill slower
than ``max_prefill_s`` is recorded as the row's status and skips larger L for that (model, impl, batch);
``time_budget_s`` > 0 stops measuring after that many seconds (remaining rows ``skipped (time budget ...)``), and
``resume=true`` reuses the rows of the existing CSV measured with the same model size, dtype, device and GPU model
and measures only the rest. Rows are appended to ``<out>/inference.csv`` as they are measured (with the
environment): the CSV only grows, so published rows stay byte for byte beside a user's (:mod:`harness.bench.grid`).
Figures, from the rows of this run's series (device, size and dtype): ``<figures>/inference<suffix>_{latency,memory,
prefill}.png``, the suffix empty for the CSV's first series (the published H200 rows: ``inference_latency.png``) and
naming the device and set-up otherwise (``inference-cpu-l2-d64-fp32_latency.png``); ``--plot-only`` redraws every
series' figures from the CSV. ``--count-ops`` appends to ``<out>/inference_ops.csv`` the same way.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import impls
from harness.bench.grid import (
    BenchCsv,
    Cell,
    Sweep,
    guarded_measurement,
    resumable_rows,
    run_cells,
    with_environment,
)
from harness.env import environment
from harness.errors import HarnessError
from harness.model.baselines import LSTMLM, CausalTransformer, matched_lstm_layers, matched_mlp_width
from harness.model.decoding import BACKENDS, CompiledDecoder, Decoder, RWKVDecoder, fused_kernels
from harness.model.rwkv import RWKV, ModelConfig, count_parameters
from harness.numerics import synchronize
from impls.wkv7_cuda import CHUNK_LEN

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
MODELS = ("rwkv", "transformer", "lstm")
CAPTURE_WARMUP = 3  # eager decode steps (on a side stream) before a CUDA graph capture

FIELDS = ("timestamp", "model", "impl", "batch", "L", "size", "params", "layers", "dtype", "prefill_ms",
          "decode_ms_median", "decode_ms_p20", "decode_ms_p80", "decode_ms_wall", "tokens_per_s", "decode_tokens",
          "cache_len", "state_bytes_measured", "state_bytes_analytic", "weights_bytes", "prefill_peak_bytes",
          "decode_peak_bytes", "peak_mem_gib", "graphs", "timer", "status", "device", "gpu", "torch", "triton", "fla",
          "cuda", "git_commit", "git_dirty")


# --- RWKV: the WKV with a carried state -------------------------------------------------------------------------


# --- RWKV: the model with a carried state ---------------------------------------------------------------------


# --- Transformer baseline ---------------------------------------------------------------------------------------


# --- LSTM baseline ----------------------------------------------------------------------------------------------


# --- timing -----------------------------------------------------------------------------------------------------


def capture_graph(fn: Callable[[], None]) -> torch.cuda.CUDAGraph:
    """``fn`` as a CUDA graph, after CAPTURE_WARMUP eager calls on a side stream (which run, so they advance any
    state ``fn`` updates)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(CAPTURE_WARMUP):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


@dataclass(frozen=True)
class DecodeTiming:
    samples_ms: list[float]
    wall_ms: float  # wall time of all timed steps / their number
    graphs: bool
    timer: str


def time_decode(fn: Callable[[], None], device: torch.device, warmup: int, tokens: int,
                graphs: bool) -> DecodeTiming:
    """Per-step times of ``fn`` (one decode step): CUDA graph replays (or eager calls) between CUDA events, or
    ``time.perf_counter`` off the GPU."""
    if device.type != "cuda":
        for _ in range(warmup):
            fn()
        samples, start = [], time.perf_counter()
        for _ in range(tokens):
            begin = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - begin) * 1e3)
        return DecodeTiming(samples, (time.perf_counter() - start) * 1e3 / tokens, False, "perf_counter")
    run, captured = fn, False
    if graphs:
        try:
            run, captured = capture_graph(fn).replay, True
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as exc:  # an op that cannot be captured: time the eager step instead
            print(f"  CUDA graph capture failed, timing eager steps: {' '.join(str(exc).split())[:200]}")
            torch.cuda.synchronize()
    for _ in range(warmup):
        run()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(tokens)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(tokens)]
    torch.cuda.synchronize()
    start = time.perf_counter()
    for begin, end in zip(starts, ends, strict=True):
        begin.record()
        run()
        end.record()
    torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - start) * 1e3 / tokens
    samples = [begin.elapsed_time(end) for begin, end in zip(starts, ends, strict=True)]
    return DecodeTiming(samples, wall_ms, captured, "cuda_graph+events" if captured else "cuda_events")


def _timed(fn: Callable[[], object], device: torch.device) -> tuple[float, object]:
    synchronize(device.type)
    start = time.perf_counter()
    result = fn()
    synchronize(device.type)
    return (time.perf_counter() - start) * 1e3, result


# --- the benchmark ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InferenceConfig:
    models: tuple[str, ...] = MODELS
    impls: tuple[str, ...] = ("rwkv", "fla")  # WKV backends of the RWKV rows (reference, rwkv, fla)
    batches: tuple[int, ...] = (1, 16)
    lengths: tuple[int, ...] = (128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
    n_layer: int = 12
    n_embd: int = 768
    head_size: int = 64
    vocab: int = 65536
    dtype: str = "bf16"
    decode_warmup: int = 20
    decode_tokens: int = 200
    prefill_warmup: int = 1
    prefill_reps: int = 2
    graphs: int = 1  # 1: decode steps as CUDA graphs (on a GPU)
    compile: int = 0  # 1: also each model with its decode step compiled by torch.compile (impl "<impl>+compile")
    fused_step: int = 0  # 1: also each RWKV impl with its WKV + readout as one Triton kernel (impl "<impl>+fused")
    max_prefill_s: float = 30.0  # a slower warm-up prefill skips this and larger L for the model
    time_budget_s: float = 0.0  # 0: no limit
    resume: bool = False  # keep the rows of out/inference.csv measured with this set-up; measure the rest
    seed: int = 0
    device: str = "cuda"
    out: str = "results/bench"
    figures: str = "figures"


def decode_steps(cfg: InferenceConfig) -> int:
    """Decode steps one measurement takes, so the KV cache is allocated for L + this many tokens."""
    return CAPTURE_WARMUP + cfg.decode_warmup + cfg.decode_tokens


def validate(cfg: InferenceConfig) -> None:
    """One-line errors for a configuration that cannot run."""
    if unknown := sorted(set(cfg.models) - set(MODELS)):
        raise HarnessError(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    if "rwkv" in cfg.models and (unknown := sorted(set(cfg.impls) - set(BACKENDS))):
        raise HarnessError(f"unknown RWKV impl(s) {', '.join(unknown)}; choose from {', '.join(BACKENDS)}")
    if cfg.dtype not in DTYPES:
        raise HarnessError(f"dtype={cfg.dtype} is not one of {', '.join(DTYPES)}")
    if cfg.n_layer < 2:
        raise HarnessError(f"n_layer={cfg.n_layer}: RWKV-7's init needs at least 2 layers")
    if min(cfg.batches + cfg.lengths) < 1 or cfg.decode_tokens < 1 or cfg.prefill_reps < 1:
        raise HarnessError("batches, lengths, decode_tokens and prefill_reps must be at least 1")
    cuda = cfg.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise HarnessError("device=cuda but no CUDA GPU is visible; use device=cpu for a smoke run")
    if cfg.fused_step and "rwkv" in cfg.models:
        fused_kernels().check_runnable(torch.device(cfg.device))
    for name in cfg.impls if "rwkv" in cfg.models else ():
        backend = BACKENDS[name]
        if backend.needs_cuda and not cuda:
            raise HarnessError(f"RWKV impl {name} needs a CUDA GPU; use impls=reference on the CPU")
        if backend.needs_bf16 and cfg.dtype != "bf16":
            raise HarnessError(f"RWKV impl {name} runs its kernel in bf16; use dtype=bf16")
        if name == "rwkv" and any(length % CHUNK_LEN for length in cfg.lengths):
            raise HarnessError(f"impl=rwkv prefills multiples of {CHUNK_LEN} tokens; got lengths {cfg.lengths}")


def build_decoders(cfg: InferenceConfig) -> list[Decoder]:
    """The RWKV model (one per run, shared by its impls) and the baselines matched to its parameter count, on the
    device in cfg.dtype; with ``fused_step=1`` each RWKV impl once more with the fused decode step, with ``compile=1``
    each of them once more with a compiled decode step."""
    device, dtype = torch.device(cfg.device), DTYPES[cfg.dtype]
    torch.manual_seed(cfg.seed)
    rwkv = RWKV(impls.get("reference"), ModelConfig(n_layer=cfg.n_layer, n_embd=cfg.n_embd,
                                                    head_size=cfg.head_size, vocab_size=cfg.vocab))
    target = count_parameters(rwkv)
    decoders: list[Decoder] = []
    for name in cfg.models:
        if name == "rwkv":
            rwkv = rwkv.to(device=device, dtype=dtype)
            fused_twins = (False, True) if cfg.fused_step else (False,)
            decoders += [RWKVDecoder(rwkv, BACKENDS[impl], fused) for fused in fused_twins for impl in cfg.impls]
        elif name == "transformer":
            width = matched_mlp_width(target, cfg.vocab, cfg.n_layer, cfg.n_embd)
            decoders.append(CausalTransformer(cfg.vocab, cfg.n_layer, cfg.n_embd, cfg.head_size, width)
                            .to(device=device, dtype=dtype))
        else:
            layers = matched_lstm_layers(target, cfg.vocab, cfg.n_embd)
            decoders.append(LSTMLM(cfg.vocab, layers, cfg.n_embd).to(device=device, dtype=dtype))
    return decoders + [CompiledDecoder(decoder) for decoder in decoders] if cfg.compile else decoders


def _allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def _peak_over(device: torch.device, base: int) -> int | None:
    return torch.cuda.max_memory_allocated(device) - base if device.type == "cuda" else None


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


class TooSlow(Exception):
    """The warm-up prefill took longer than max_prefill_s."""


@torch.no_grad()
def measure(decoder: Decoder, batch: int, length: int, cfg: InferenceConfig) -> dict[str, object]:
    """Prefill and decode columns of one (decoder, batch, L)."""
    device = torch.device(cfg.device)
    generator = torch.Generator().manual_seed(cfg.seed + length)
    idx = torch.randint(0, cfg.vocab, (batch, length), generator=generator).to(device)
    capacity = length + decode_steps(cfg)
    base = _allocated(device)
    for _ in range(cfg.prefill_warmup):
        warm_ms = _timed(lambda: decoder.prefill(idx, capacity), device)[0]  # its state is freed at once
        if warm_ms > cfg.max_prefill_s * 1e3:
            raise TooSlow(f"too_slow (warm-up prefill {warm_ms / 1e3:.1f} s > max_prefill_s={cfg.max_prefill_s:g})")
    _reset_peak(device)
    prefill_ms, state = [], None
    for _ in range(cfg.prefill_reps):
        state = None  # free the previous repetition's state first
        elapsed, (logits, state) = _timed(lambda: decoder.prefill(idx, capacity), device)
        prefill_ms.append(elapsed)
    prefill_peak = _peak_over(device, base)
    token = logits.argmax(-1, keepdim=True)
    del logits

    def greedy_step() -> None:
        token.copy_(decoder.step(token, state).argmax(-1, keepdim=True))

    _reset_peak(device)
    timing = time_decode(greedy_step, device, cfg.decode_warmup, cfg.decode_tokens, bool(cfg.graphs))
    decode_peak = _peak_over(device, base)
    weights = sum(p.numel() * p.element_size() for p in decoder.module.parameters())
    median, p20, p80 = (float(np.percentile(timing.samples_ms, q)) for q in (50, 20, 80))
    cache_len = capacity if decoder.model_name == "transformer" else None
    return {
        "prefill_ms": float(np.median(prefill_ms)),
        "decode_ms_median": median, "decode_ms_p20": p20, "decode_ms_p80": p80, "decode_ms_wall": timing.wall_ms,
        "tokens_per_s": batch * 1e3 / median, "decode_tokens": cfg.decode_tokens, "cache_len": cache_len,
        "state_bytes_measured": sum(t.numel() * t.element_size() for t in state.tensors()),
        "state_bytes_analytic": decoder.analytic_state_bytes(batch, cache_len or 0),
        "weights_bytes": weights, "prefill_peak_bytes": prefill_peak, "decode_peak_bytes": decode_peak,
        "peak_mem_gib": None if prefill_peak is None else (weights + max(prefill_peak, decode_peak)) / 2**30,
        "graphs": timing.graphs, "timer": timing.timer, "status": "ok",
    }


def _progress(row: dict[str, object], elapsed_s: float) -> str:
    head = f"[{elapsed_s:6.0f}s] {row['model']:<11} {row['impl']:<9} B={row['batch']:<3} L={row['L']:<6}"
    if row["status"] != "ok":
        return f"{head} {row['status']}"
    return (f"{head} prefill {row['prefill_ms']:9.2f} ms  decode {row['decode_ms_median']:8.4f} ms "
            f"(p20-p80 {row['decode_ms_p20']:.4f}-{row['decode_ms_p80']:.4f}, wall {row['decode_ms_wall']:.4f})  "
            f"{row['tokens_per_s']:9.0f} tok/s  state {row['state_bytes_measured'] / 2**20:9.2f} MiB  "
            f"graphs={row['graphs']}")


def warm_start(decoders: list[Decoder], cfg: InferenceConfig) -> dict[tuple[str, str, int], str]:
    """One small untimed measurement per decoder (batch 1, the shortest L, one decode step) before the grid, so that
    the CUDA build, Triton autotuning and cuDNN/cuBLAS set-up are neither timed nor taken for a slow prefill.
    Returns the skip status of every row of a decoder that failed there."""
    small = dataclasses.replace(cfg, decode_warmup=0, decode_tokens=1, prefill_warmup=0, prefill_reps=1)
    blocked = {}
    for decoder in decoders:
        begin = time.perf_counter()
        status = guarded_measurement(partial(measure, decoder, 1, min(cfg.lengths), small), cfg.device,
                                     reported=(TooSlow,))["status"]
        print(f"warm start {decoder.model_name}/{decoder.impl}: {time.perf_counter() - begin:.1f} s, {status}",
              flush=True)
        if status != "ok":
            blocked |= {(decoder.model_name, decoder.impl, batch): f"skipped (warm start: {status})"
                        for batch in cfg.batches}
    return blocked


RowKey = tuple[str, str, int, int]  # model, impl, batch, L
KEY = ("model", "impl", "batch", "L")  # the columns of a row's key
SETUP = ("size", "dtype")  # with the device: what a series of rows shares (harness.bench.grid.bench_series)


def setup_columns(cfg: InferenceConfig) -> dict[str, object]:
    """The columns every row of this configuration shares, besides the environment."""
    return {"size": f"L{cfg.n_layer}-D{cfg.n_embd}", "dtype": cfg.dtype, "device": cfg.device}


def earlier_rows(csv_path: Path, cfg: InferenceConfig) -> dict[RowKey, dict[str, str]]:
    """Rows of an earlier run to keep with ``resume=true``: those of the same model size, dtype, device and GPU model,
    except the ones its time budget skipped (the last of each key); as written."""
    if not cfg.resume:
        return {}
    same = {k: str(v) for k, v in setup_columns(cfg).items()}
    return {(r["model"], r["impl"], int(r["batch"]), int(r["L"])): r for r in resumable_rows(csv_path, FIELDS, same)}


def cells(cfg: InferenceConfig, decoders: list[Decoder], fixed: dict[str, object]) -> Iterator[Cell]:
    """Every (decoder, batch, L) with L outermost and ascending, so a time budget cuts the longest contexts."""
    for length in sorted(cfg.lengths):
        for batch in cfg.batches:
            for decoder in decoders:
                yield Cell((decoder.model_name, decoder.impl, batch, length),
                           {**fixed, "model": decoder.model_name, "impl": decoder.impl, "batch": batch, "L": length,
                            "params": count_parameters(decoder.module), "layers": decoder.layers()},
                           partial(measure, decoder, batch, length, cfg))


def run_grid(cfg: InferenceConfig, csv_path: Path) -> list[dict[str, object]]:
    """Measure the grid, appending each row to ``csv_path`` as soon as it is measured (rows kept by ``resume`` are
    already there); returns the rows appended."""
    validate(cfg)
    log = BenchCsv(csv_path, FIELDS)
    kept = earlier_rows(csv_path, cfg)
    sweep = Sweep(swept=KEY.index("L"), swept_name="L", budget_option="time_budget_s", budget_s=cfg.time_budget_s,
                  device=cfg.device, reported=(TooSlow,))  # the budget counts the models' build and warm start
    decoders = build_decoders(cfg)
    fixed = {**setup_columns(cfg), **with_environment({}, environment())}
    pending = [d for d in decoders if any((d.model_name, d.impl, batch, length) not in kept
                                          for batch in cfg.batches for length in cfg.lengths)]
    return run_cells(cells(cfg, decoders, fixed), log, sweep, kept, _progress, blocked=warm_start(pending, cfg))


# --- figures ----------------------------------------------------------------------------------------------------


# --- operator count of one decode step -------------------------------------------------------------------------


class _OpCounter(TorchDispatchMode):
    """Counts the operators one region dispatches, leaving out those that only relabel memory (views)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view and func.overloadpacket is not torch.ops.aten._unsafe_view:
            self.count += 1
        return func(*args, **(kwargs or {}))


def step_ops(decoder: Decoder, batch: int = 1, prompt: int = 16) -> int:
    """Operators one decode step dispatches after a prompt of ``prompt`` tokens: on a GPU each is about one kernel
    launch, which is what a decode step of a small model costs even as a CUDA graph."""
    device = next(decoder.module.parameters()).device
    idx = torch.randint(0, 2, (batch, prompt), device=device)  # ids every vocabulary has
    with torch.no_grad():
        _, state = decoder.prefill(idx, prompt + 2)
        decoder.step(idx[:, -1:], state)  # first-call work (caches, lazy allocations) stays out of the count
        with _OpCounter() as counter:
            decoder.step(idx[:, -1:], state)
    return counter.count


OPS_FIELDS = ("model", "impl", "layers", "ops_per_step", "ops_per_layer", "device", "dtype", "torch")


def ops_rows(cfg: InferenceConfig) -> list[dict[str, object]]:
    """One row per decoder of ``cfg`` (columns OPS_FIELDS): operators per decode step, in total and per layer."""
    rows = []
    for decoder in build_decoders(dataclasses.replace(cfg, compile=0)):  # a compiled step is not dispatched op by op
        ops = step_ops(decoder)
        rows.append({"model": decoder.model_name, "impl": decoder.impl, "layers": decoder.layers(),
                     "ops_per_step": ops, "ops_per_layer": ops / decoder.layers(), "device": cfg.device,
                     "dtype": cfg.dtype, "torch": torch.__version__})
    return rows

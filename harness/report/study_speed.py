"""The study's speed, by layer of the stack: FLA over ``rwkv_jit`` at bsz 48 on one GPU model: the WKV op alone
(results/bench/kernels.csv, B=48 T=512 H=12, forward + backward), the bare step (results/bench/step.csv, eager),
plain Lightning (results/bench/trainer_overhead.csv, ``plain_bf16_true``) and DeepSpeed ZeRO-2 (the study's own
dedicated runs; runs flagged ``loss_only`` shared their GPU and give no speed), beside the published ratio."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

PUBLISHED = Path("published") / "rwkv-fla-comparison.csv"


def speed_layers(results_dir: Path, throughput: pd.DataFrame, bench: pd.DataFrame | None,
                 experiment: str) -> pd.DataFrame:
    """FLA over rwkv_jit at each layer of the stack, per GPU model (see the module docstring), from the report's
    ``throughput`` table (training runs; shared-GPU runs already left out) and ``bench`` table (bare steps)."""
    rows = [*_wkv_op_ratio(results_dir), *_bare_step_ratio(bench), *_plain_lightning_ratio(results_dir),
            *_deepspeed_ratio(throughput, experiment)]
    published = published_comparison(results_dir)
    if published is not None:
        speed = published[published["quantity"] == "kt_per_s"].set_index("arm")["value"]
        rows.append({"layer": "published training (DeepSpeed ZeRO-2, grad_cp on)", "gpu": "published (not stated)",
                     "fla": speed["fla"], "rwkv_jit": speed["rwkv_jit"], "fla_vs_rwkv_jit": speed["fla"] /
                     speed["rwkv_jit"], "unit": "kt/s"})
    return pd.DataFrame(rows, columns=["layer", "gpu", "fla", "rwkv_jit", "fla_vs_rwkv_jit", "unit"])


def _wkv_op_ratio(results_dir: Path) -> list[dict]:
    path = results_dir / "bench" / "kernels.csv"
    if not path.exists():
        return []
    k = pd.read_csv(path)
    shape = k[(k["B"] == 48) & (k["T"] == 512) & (k["H"] == 12) & (k["mode"] == "fwdbwd") & (k["status"] == "ok")]
    latest = shape.sort_values("timestamp").groupby(["gpu", "kernel"]).tail(1)
    times = latest.pivot_table(index="gpu", columns="kernel", values="median_ms")
    return [{"layer": "WKV op alone (B=48 T=512 H=12, fwd+bwd; time: lower is faster)", "gpu": gpu,
             "fla": row["fla_chunk"], "rwkv_jit": row["cuda"], "fla_vs_rwkv_jit": row["cuda"] / row["fla_chunk"],
             "unit": "ms"} for gpu, row in times.iterrows() if {"fla_chunk", "cuda"} <= set(row.dropna().index)]


def _bare_step_ratio(bench: pd.DataFrame | None) -> list[dict]:
    if bench is None:
        return []
    eager = bench[(bench["bsz"] == 48) & (bench["accel"] == "eager")]  # the latest row of each already
    speed = eager.pivot_table(index="gpu", columns="impl", values="kt_per_s")
    return _ratio_rows("bare step (bf16 weights, fused AdamW)", speed)


def _plain_lightning_ratio(results_dir: Path) -> list[dict]:
    path = results_dir / "bench" / "trainer_overhead.csv"
    if not path.exists():
        return []
    overhead = pd.read_csv(path)
    plain = overhead[(overhead["variant"] == "plain_bf16_true") & (overhead["status"] == "completed")]
    speed = plain.groupby(["gpu", "impl"]).tail(1).pivot_table(index="gpu", columns="impl", values="kt_per_s")
    return _ratio_rows("plain Lightning (bf16-true, single device)", speed)


def _deepspeed_ratio(throughput: pd.DataFrame, experiment: str) -> list[dict]:
    if throughput.empty:
        return []
    arms = throughput[(throughput["experiment"] == experiment) & (throughput["init"] == "shared")
                      & (throughput["grouping"] == "by_role") & (throughput["accel"] == "eager")]
    speed = arms.pivot_table(index="gpu", columns="impl", values="kt_s_aggregate")
    return _ratio_rows(f"DeepSpeed ZeRO-2 training ({experiment}, dedicated runs)", speed)


def _ratio_rows(layer: str, speed: pd.DataFrame) -> list[dict]:
    return [{"layer": layer, "gpu": gpu, "fla": row["fla"], "rwkv_jit": row["rwkv_jit"],
             "fla_vs_rwkv_jit": row["fla"] / row["rwkv_jit"], "unit": "kt/s"}
            for gpu, row in speed.iterrows() if {"fla", "rwkv_jit"} <= set(row.dropna().index)]


def published_comparison(results_dir: Path) -> pd.DataFrame | None:
    path = results_dir / PUBLISHED
    return pd.read_csv(path) if path.exists() else None

"""Where a step's time goes: kernel and host tables from a ``torch.profiler`` run (the step benchmark's
``--profile`` and the trainer's ``trainer.profile_steps`` both print them)."""

from __future__ import annotations

import re

# Kernel name patterns -> what they do, first match wins.
KERNEL_KINDS = (
    ("wkv7 (time-mix recurrence)", r"wkv7"),
    ("optimizer + grad clip", r"adam|multi_tensor|foreach"),
    ("matmul", r"gemm|cutlass|xmma|cublas|gemv|matmul|nvjet"),
    ("softmax / cross-entropy", r"softmax|cross_entropy|nll_loss"),
    ("layer / group norm", r"layer_norm|group_norm|layernorm|groupnorm|welford"),
    ("reductions", r"reduce"),
    ("elementwise / copies", r"elementwise|vectorized|unrolled|fused|copy|fill|cat|index|scatter|gather|pad"),
)


def kernel_kind(name: str) -> str:
    lowered = name.lower()
    return next((kind for kind, pattern in KERNEL_KINDS if re.search(pattern, lowered)), "other")


def kernel_report(kernels: list[tuple[str, int, float]], steps: int, wall_s: float, top: int = 25) -> str:
    """Table of (kernel name, calls, total µs): top kernels, then time per kind of work."""
    total_us = sum(us for _, _, us in kernels)
    if not total_us:
        return "no CUDA kernels recorded"
    launches = sum(calls for _, calls, _ in kernels) / steps
    lines = [f"{steps} profiled steps: {wall_s / steps * 1e3:.1f} ms/step wall (with profiler), "
             f"{total_us / steps / 1e3:.1f} ms/step of kernels ({100 * total_us / 1e6 / wall_s:.0f}% GPU busy), "
             f"{launches:.0f} kernels/step",
             "", f"{'ms/step':>8} {'%':>5} {'calls/step':>10}  kernel"]
    for name, calls, us in sorted(kernels, key=lambda k: -k[2])[:top]:
        lines.append(f"{us / steps / 1e3:8.2f} {100 * us / total_us:5.1f} {calls / steps:10.0f}  {name[:110]}")
    by_kind: dict[str, float] = {}
    for name, _, us in kernels:
        by_kind[kernel_kind(name)] = by_kind.get(kernel_kind(name), 0.0) + us
    lines += ["", f"{'ms/step':>8} {'%':>5}  kind of work"]
    for kind, us in sorted(by_kind.items(), key=lambda item: -item[1]):
        lines.append(f"{us / steps / 1e3:8.2f} {100 * us / total_us:5.1f}  {kind}")
    return "\n".join(lines)


def cpu_report(ops: list[tuple[str, int, float]], steps: int, top: int = 12) -> str:
    """Host side: (op name, calls, self CPU µs), the ops that cost the CPU most (profiler overhead included)."""
    total_us = sum(us for _, _, us in ops)
    lines = [f"host: {total_us / steps / 1e3:.1f} ms/step of self CPU time in ops",
             f"{'ms/step':>8} {'calls/step':>10}  op"]
    for name, calls, us in sorted(ops, key=lambda op: -op[2])[:top]:
        lines.append(f"{us / steps / 1e3:8.2f} {calls / steps:10.0f}  {name[:110]}")
    return "\n".join(lines)


def profile_summary(events, steps: int, wall_s: float, header: str) -> str:
    """Kernel and host tables from a profiler's ``key_averages()`` over ``steps`` steps."""
    from torch.autograd import DeviceType

    kernels = [(e.key, e.count, e.self_device_time_total) for e in events if e.device_type == DeviceType.CUDA]
    ops = [(e.key, e.count, e.self_cpu_time_total) for e in events if e.device_type == DeviceType.CPU]
    return "\n\n".join([header, kernel_report(kernels, steps, wall_s), cpu_report(ops, steps)])

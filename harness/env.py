"""The environment every result carries: hardware, package versions, git state."""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import os
import platform
import socket
import subprocess
from pathlib import Path

import torch

from impls import triton_autotune

REPO_ROOT = Path(__file__).resolve().parent.parent
_PACKAGES = ("torch", "lightning", "triton", "flash-linear-attention", "fla-core", "deepspeed",
             "hydra-core", "numpy", "transformers")


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in _PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_state(root: Path = REPO_ROOT) -> dict[str, object]:
    """Commit of the harness and whether the working tree had uncommitted changes.

    ``$RWKV_GIT_COMMIT`` (and ``$RWKV_GIT_DIRTY``, 0/1) win over ``.git``: a copy of the tree on a remote GPU box may
    carry no ``.git`` or a stale one (seen on the device: an older commit, reported dirty)."""
    if os.environ.get("RWKV_GIT_COMMIT"):
        dirty = os.environ.get("RWKV_GIT_DIRTY")
        return {"commit": os.environ["RWKV_GIT_COMMIT"], "dirty": None if dirty in (None, "unknown") else dirty == "1"}

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_info() -> dict[str, object]:
    if not torch.cuda.is_available():
        return {"gpu": None, "gpu_count": 0, "cuda": None}
    props = torch.cuda.get_device_properties(0)
    return {"gpu": props.name, "gpu_count": torch.cuda.device_count(), "cuda": torch.version.cuda,
            "gpu_memory_gib": round(props.total_memory / 2**30, 1),
            "compute_capability": f"{props.major}.{props.minor}"}


def environment() -> dict[str, object]:
    """Everything needed to tell where a number came from."""
    return {
        "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        **gpu_info(),
        "versions": package_versions(),
        "git": git_state(),
        "env_flags": behaviour_flags(os.environ),
        "triton_autotune": triton_autotune.status(),
    }


def behaviour_flags(env: dict[str, str]) -> dict[str, str]:
    """Environment variables that change what the kernels do; cache and tool locations are left out."""
    return {k: v for k, v in env.items()
            if k.startswith(("FLA_", "TRITON_", "RWKV_", "CUDA_VISIBLE")) and not k.endswith(("_DIR", "_PATH"))}


# Dense bf16 peak per GPU, for MFU (6 x non-embedding parameters per token).
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def model_flops_utilization(kt_per_s: float | None, non_embedding_parameters: int, world_size: int = 1
                            ) -> float | None:
    """6 x non-embedding parameters per token at ``kt_per_s`` over the dense bf16 peak of ``world_size`` GPUs like GPU
    0; None without a known peak or a speed."""
    peak = peak_bf16_flops()
    if not (peak and kt_per_s):
        return None
    return kt_per_s * 1000 * 6 * non_embedding_parameters / (peak * world_size)


def peak_bf16_flops() -> float | None:
    """The dense bf16 peak of GPU 0 (FLOP/s), None without a GPU or for a model not in :data:`PEAK_BF16_FLOPS`."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(0)
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)

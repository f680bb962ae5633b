"""The wkv7 "clampw" CUDA op (``impls/cuda``): built on first use, wrapped for autograd, any sequence length.

Inputs are (B, T, H, N) bf16 tensors on one CUDA device; ``w`` is the raw decay logit, and the decay
``exp(-e^-0.5 * sigmoid(w))`` is computed in fp32 inside the kernel (spec §4.1). Head sizes 32 and 64.
T need not be a multiple of 16: the wrapper pads the end of time with zeros (k = v = a = b = 0 leaves every
earlier output unchanged) and cuts the padding off the output and the gradients.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

from impls.custom_ops import wkv_op

CUDA_DIR = Path(__file__).resolve().parent / "cuda"
SOURCES = (CUDA_DIR / "wkv7_clampw.cu", CUDA_DIR / "wkv7_clampw.cpp")
CHUNK_LEN = 16  # WKV7_CHUNK_LEN in cuda/wkv7_clampw.h
HEAD_SIZES = (32, 64)
NVCC_FLAGS = ("--use_fast_math", "-O3", "-Xptxas=-O3", "--extra-device-vectorization")
LOCK_TIMEOUT_ENV = "RWKV_BUILD_LOCK_TIMEOUT"
DEFAULT_LOCK_TIMEOUT_S = 300.0
EXTENSION = "rwkv_harness_wkv7"  # also the op namespace: torch.ops.rwkv_harness_wkv7


class BuildLockError(RuntimeError):
    """The extension's build directory stayed locked for longer than the timeout."""


def arch_flags(capability: tuple[int, int]) -> list[str]:
    """nvcc flags for exactly the given compute capability (no PTX for other GPUs)."""
    arch = f"{capability[0]}{capability[1]}"
    return [f"-gencode=arch=compute_{arch},code=sm_{arch}"]


def build_directory(capability: tuple[int, int]) -> Path:
    """Per-user build cache: $TORCH_EXTENSIONS_DIR or ~/.cache/rwkv-harness/torch_extensions, per torch/CUDA/arch."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    base = Path(root) if root else Path.home() / ".cache" / "rwkv-harness" / "torch_extensions"
    tag = f"torch{torch.__version__}-cuda{torch.version.cuda}-sm{capability[0]}{capability[1]}"
    return base / tag / EXTENSION


def lock_timeout_s() -> float:
    return float(os.environ.get(LOCK_TIMEOUT_ENV, DEFAULT_LOCK_TIMEOUT_S))


@contextlib.contextmanager
def build_lock(directory: Path, timeout_s: float, what: str = "the wkv7 CUDA extension") -> Iterator[None]:
    """Serialise builds in ``directory`` across processes without ever waiting forever.

    Our lock is an flock, which the OS drops when its holder dies, so it cannot go stale. While we hold it, torch's
    own ``lock`` file (a FileBaton, which torch would wait on forever) can only be left over from a killed build.
    """
    directory.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout_s
    with open(directory / "harness.flock", "w") as handle:
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise BuildLockError(
                        f"another process has been building {what} in {directory} for over "
                        f"{timeout_s:.0f} s; wait for it, or raise {LOCK_TIMEOUT_ENV}") from None
                time.sleep(0.2)
        _wait_for_torch_lock(directory / "lock", timeout_s)
        yield


def _wait_for_torch_lock(lock: Path, timeout_s: float) -> None:
    while True:
        try:
            age_s = time.time() - lock.stat().st_mtime
        except FileNotFoundError:
            return
        if age_s > timeout_s:
            raise BuildLockError(
                f"stale build lock {lock} (left {age_s:.0f} s ago by an interrupted build in {lock.parent}); "
                "delete that file and retry")
        time.sleep(0.2)


@functools.cache
def load_extension() -> None:
    """Build the op library for the current GPU on first use (cached per user) and load it into this process."""
    from torch.utils import cpp_extension

    capability = torch.cuda.get_device_capability()
    directory = build_directory(capability)
    with build_lock(directory, lock_timeout_s()):
        cpp_extension.load(
            name=EXTENSION,
            sources=[str(path) for path in SOURCES],
            extra_cflags=["-O3"],
            extra_cuda_cflags=[*NVCC_FLAGS, *arch_flags(capability)],
            build_directory=str(directory),
            is_python_module=False,
            verbose=False,
        )


def _check_inputs(tensors: tuple[torch.Tensor, ...]) -> None:
    r = tensors[0]
    if r.dim() != 4 or r.shape[-1] not in HEAD_SIZES:
        raise ValueError(f"wkv7_clampw takes (B, T, H, N) inputs with N in {HEAD_SIZES}, got {tuple(r.shape)}")
    for t in tensors:
        if t.shape != r.shape or t.dtype != torch.bfloat16 or not t.is_cuda:
            raise ValueError("wkv7_clampw takes six bf16 CUDA tensors of one shape, got "
                             f"{[(tuple(x.shape), x.dtype, x.device.type) for x in tensors]}")


def _pad_time(x: torch.Tensor, chunk: int = CHUNK_LEN) -> torch.Tensor:
    pad = (chunk - x.shape[1] % chunk) % chunk  # chunk as an argument: TorchScript takes no global ints
    if pad == 0:
        return x.contiguous()
    return F.pad(x, [0, 0, 0, 0, 0, pad])


def _forward(r: torch.Tensor, w: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor,
             b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_inputs((r, w, k, v, a, b))
    load_extension()
    return torch.ops.rwkv_harness_wkv7.forward(r, w, k, v, a, b)  # y and the state checkpoints s, sa


def _backward(r: torch.Tensor, w: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
              s: torch.Tensor, sa: torch.Tensor, dy: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return torch.ops.rwkv_harness_wkv7.backward(r, w, k, v, a, b, dy.to(torch.bfloat16), s, sa)


def _fake_checkpoints(r: torch.Tensor) -> list[torch.Tensor]:
    B, T, H, N = r.shape
    return [r.new_empty((B, H, T // CHUNK_LEN, N, N), dtype=torch.float32), r.new_empty(r.shape, dtype=torch.float32)]


wkv_op("wkv7_clampw", _forward, _backward, fake_output=torch.empty_like, fake_extras=_fake_checkpoints)
# Under autocast (Lightning's bf16-mixed: fp32 weights) the inputs arrive in fp32: the op takes them as bf16, and
# autograd returns their gradients in the inputs' own dtype.
torch.library.register_autocast("rwkv_harness::wkv7_clampw", "cuda", torch.bfloat16)


def wkv7_clampw(r: torch.Tensor, w: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """y_t = S_t r_t with S_t = S_{t-1} (diag(decay(w_t)) + a_t b_t^T) + v_t k_t^T; (B, T, H, N) bf16 in and out.

    The kernel runs as the custom op ``torch.ops.rwkv_harness.wkv7_clampw`` (:mod:`impls.custom_ops`): one opaque
    node for torch.compile and TorchScript alike. Scriptable, so that ``impl=rwkv_jit`` compiles calls to it."""
    length = r.shape[1]
    y = torch.ops.rwkv_harness.wkv7_clampw(_pad_time(r), _pad_time(w), _pad_time(k), _pad_time(v), _pad_time(a),
                                          _pad_time(b))[0]
    return y[:, :length]

"""Whether a training run fits in memory, estimated before anything is allocated.

A step's peak is the weights with their optimizer state, the activations the forward keeps for the backward, the
logits with their gradients and, on a CPU, the Python process itself. The constants were measured on a CPU with the
reference implementation in fp32; tests/test_user_errors.py checks them against the tensors the model saves for its
backward, the peak RSS of a real run, and the GPU peaks the step benchmark recorded in results/bench/step.csv.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from harness.errors import HarnessError
from harness.model.rwkv import ModelConfig
from impls.init import lora_ranks

# fp32 weights, gradients and AdamW's two moments (16 bytes), plus the transient copies of the foreach AdamW update
# and of the init (8 bytes; measured).
PARAMETER_BYTES = 24
# Values per token and channel that one block saves for its backward besides the WKV state: 156 bytes in fp32,
# measured with torch.autograd.graph.saved_tensors_hooks (the WKV op saves its six inputs).
BLOCK_SAVED_VALUES = 39
# What a block keeps under trainer.grad_cp (its inputs x and v_first); it recomputes the rest one block at a time.
CHECKPOINTED_BLOCK_VALUES = 2
# Copies of the logits at the loss's peak: the logits, the log-softmax and their gradients (measured in fp32).
LOGIT_COPIES = 4
# A Python process with torch and Lightning loaded (measured, CPU runs only: on a GPU it is host memory).
PROCESS_BYTES = 500 * 2**20
# Time steps between the WKV states (head_size x head_size per head, fp32) saved for the backward: the CUDA and Triton
# kernels keep one per chunk of 16 steps in every layer; the reference loop saves none and rebuilds every step's in
# its backward, one layer at a time (impls/reference.py, wkv7_reference_backward).
WKV_STATE_EVERY = {"reference": 1}
DEFAULT_WKV_STATE_EVERY = 16
WKV_STATES_REBUILT_IN_BACKWARD = frozenset({"reference"})
GB = 1e9


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one training process needs at its peak, by what holds them."""

    weights_and_optimizer: int
    activations: int
    logits: int
    process: int

    @property
    def total(self) -> int:
        return self.weights_and_optimizer + self.activations + self.logits + self.process

    def breakdown(self) -> str:
        parts = {"weights and optimizer": self.weights_and_optimizer, "activations": self.activations,
                 "logits": self.logits, "process": self.process}
        return ", ".join(f"{name} {value / GB:.1f} GB" for name, value in parts.items() if value)


def parameter_count(cfg: ModelConfig) -> int:
    """The model's parameters, from its shapes (building the model to count them would cost its whole init)."""
    C = cfg.n_embd
    time_mix = 4 * C * C + 2 * C * sum(lora_ranks(C).values()) + 14 * C  # r, k, v, o; the LoRAs; vectors, ln_x
    channel_mix = 8 * C * C + C
    block = time_mix + channel_mix + 4 * C  # ln1, ln2
    return 2 * cfg.vocab_size * C + cfg.n_layer * block + 2 * C + 2 * C  # emb and head; blocks; ln0 and ln_out


def estimate_training_memory(cfg: ModelConfig, micro_bsz: int, impl_name: str, precision: str,
                             accelerator: str) -> MemoryEstimate:
    """Peak bytes of one training process at micro batch ``micro_bsz``."""
    value_bytes = _activation_bytes(precision)
    state_bytes = max(4, value_bytes)  # the WKV state stays fp32 (fp64 for fp64 inputs)
    state_every = WKV_STATE_EVERY.get(impl_name, DEFAULT_WKV_STATE_EVERY)
    values = micro_bsz * cfg.ctx_len * cfg.n_embd  # per block and value kept per token and channel
    states = values * cfg.head_size * state_bytes / state_every  # one layer's
    rebuilt = impl_name in WKV_STATES_REBUILT_IN_BACKWARD
    saved_block = values * BLOCK_SAVED_VALUES * value_bytes + (0 if rebuilt else states)
    if cfg.grad_cp:
        activations = cfg.n_layer * values * CHECKPOINTED_BLOCK_VALUES * value_bytes + saved_block
    else:
        activations = cfg.n_layer * saved_block
    activations += states if rebuilt else 0  # the one layer whose backward holds them
    return MemoryEstimate(
        weights_and_optimizer=parameter_count(cfg) * PARAMETER_BYTES,
        activations=int(activations),
        logits=micro_bsz * cfg.ctx_len * cfg.vocab_size * LOGIT_COPIES * value_bytes,
        process=PROCESS_BYTES if accelerator == "cpu" else 0,
    )


def _activation_bytes(precision: str) -> int:
    if precision.startswith(("bf16", "16")):
        return 2
    return 8 if precision.startswith("64") else 4


def available_memory(accelerator: str, device_index: int = 0) -> tuple[int, str] | None:
    """(bytes free for a new run, where they were read); None where this platform does not say."""
    if accelerator == "gpu":
        free, _ = torch.cuda.mem_get_info(device_index)
        return free, f"free on GPU {device_index}"
    try:
        meminfo = Path("/proc/meminfo").read_text()
    except OSError:
        return None
    for line in meminfo.splitlines():
        key, _, value = line.partition(":")
        if key == "MemAvailable":
            return int(value.split()[0]) * 1024, "MemAvailable in /proc/meminfo"
    return None


def check_fits(estimate: MemoryEstimate, processes: int, available: tuple[int, str] | None) -> None:
    """Raise a one-line HarnessError when ``processes`` runs of ``estimate`` need more than is ``available``."""
    if available is None:
        return
    free, where = available
    needed = estimate.total * processes
    if needed <= free:
        return
    each = f"{processes} processes of {estimate.total / GB:.1f} GB: " if processes > 1 else ""
    raise HarnessError(f"this run needs about {needed / GB:.1f} GB of memory ({each}{estimate.breakdown()}) and "
                       f"{free / GB:.1f} GB is available ({where}); try model=tiny, a smaller bsz or "
                       f"trainer.grad_cp=true (trainer.memory_check=false starts it anyway)")

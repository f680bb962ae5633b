"""The harness's own model checkpoint: one safetensors file holding the model's native state dict.

The safetensors header carries the metadata as JSON strings: the format tag, the implementation the tensor names
belong to (``impl``; its :class:`~impls.base.NameMap` turns them into RWKV-LM names), the :class:`ModelConfig`,
the implementation's flags and any caller-supplied ``extra`` (e.g. the step). Files are written to a temporary name
and renamed, so a crash never leaves a half-written checkpoint under the final name.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from harness.errors import HarnessError
from harness.model.rwkv import RWKV, ModelConfig

FORMAT = "rwkv7-harness-checkpoint"
FORMAT_VERSION = "1"


class CheckpointError(HarnessError):
    """A file that is not a readable harness checkpoint."""


@dataclass(frozen=True)
class Checkpoint:
    state: dict[str, torch.Tensor]  # native names and layouts of ``impl``
    impl: str
    config: ModelConfig
    impl_flags: dict[str, object] = field(default_factory=dict)
    extra: dict[str, object] = field(default_factory=dict)


def save_checkpoint(path: str | Path, checkpoint: Checkpoint) -> None:
    """Write ``checkpoint`` atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "impl": checkpoint.impl,
        "model_config": json.dumps(asdict(checkpoint.config)),
        "impl_flags": json.dumps(checkpoint.impl_flags),
        "extra": json.dumps(checkpoint.extra),
    }
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in checkpoint.state.items()}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_model(path: str | Path, model: RWKV, extra: dict[str, object] | None = None) -> None:
    """Checkpoint a harness model under its own parameter names."""
    save_checkpoint(path, Checkpoint(model.state_dict(), model.impl.name, model.cfg,
                                     dict(model.impl.flags), dict(extra or {})))


def read_metadata(path: str | Path) -> dict[str, str]:
    """The header metadata of a harness checkpoint; raises :class:`CheckpointError` for anything else."""
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except (OSError, SafetensorError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file ({exc})") from None
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{path} is a safetensors file but not a harness checkpoint (no format={FORMAT})")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format version {metadata.get('format_version')!r}, "
                              f"this harness reads version {FORMAT_VERSION}")
    return metadata


def is_checkpoint(path: str | Path) -> bool:
    try:
        read_metadata(path)
    except CheckpointError:
        return False
    return True


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a harness checkpoint (tensors keep their stored dtype, on CPU)."""
    metadata = read_metadata(path)
    try:
        impl = metadata["impl"]
        config = ModelConfig(**json.loads(metadata["model_config"]))
        flags = json.loads(metadata.get("impl_flags", "{}"))
        extra = json.loads(metadata.get("extra", "{}"))
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path} has unreadable checkpoint metadata ({type(exc).__name__}: {exc})") from None
    return Checkpoint(load_file(str(path)), impl, config, flags, extra)


def _shape_of(config: ModelConfig) -> dict[str, int]:
    return {k: v for k, v in asdict(config).items() if k in ("n_layer", "n_embd", "head_size", "vocab_size")}


def load_model_state(model: RWKV, path: str | Path) -> Checkpoint:
    """Load a checkpoint written for the same implementation and model shape into ``model`` (strict)."""
    checkpoint = load_checkpoint(path)
    if checkpoint.impl != model.impl.name:
        raise CheckpointError(f"{path} holds impl {checkpoint.impl!r} weights, the model is {model.impl.name!r}; "
                              f"convert it first: python -m harness.convert {path} OUT.safetensors "
                              f"--impl {model.impl.name}")
    if _shape_of(checkpoint.config) != _shape_of(model.cfg):
        raise CheckpointError(f"{path} holds a model with {_shape_of(checkpoint.config)}, "
                              f"the model has {_shape_of(model.cfg)}")
    model.load_state_dict(checkpoint.state, strict=True)
    return checkpoint

"""One writer per target format (``rwkv-lm`` ``.pth``, ``fla`` directory, ``harness`` ``.safetensors``); every
target is written under a temporary name next to its destination and renamed, so a failure leaves nothing."""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from harness.convert import ConvertError
from harness.convert.namings import FLA_NAMING, RWKV_LM_NAMING, Naming, harness_naming, impl_name_map
from harness.convert.readers import Source
from harness.convert.shapes import Dims
from harness.model.checkpoint import Checkpoint, save_checkpoint
from harness.model.rwkv import ModelConfig
from impls.base import LAYER0_UNUSED
from impls.init import lora_ranks

TARGET_FORMATS = ("rwkv-lm", "fla", "harness")


@dataclass(frozen=True)
class Target:
    fmt: str
    naming: Naming
    has_layer0_unused: bool  # whether layer 0 holds v0/v1/v2
    impl: str | None = None  # harness targets only


def make_target(fmt: str, impl: str | None) -> Target:
    if fmt == "rwkv-lm":
        return Target(fmt, RWKV_LM_NAMING, has_layer0_unused=True)
    if fmt == "fla":
        return Target(fmt, FLA_NAMING, has_layer0_unused=False)
    name_map = impl_name_map(impl)
    return Target(fmt, harness_naming(name_map), not LAYER0_UNUSED <= name_map.absent_in_layer0, impl)


def detect_target_format(path: Path) -> str:
    by_suffix = {".pth": "rwkv-lm", ".pt": "rwkv-lm", ".safetensors": "harness", "": "fla"}
    if path.suffix not in by_suffix:
        raise ConvertError(f"cannot tell the format to write from {path.name}; "
                           f"pass --to {{{','.join(TARGET_FORMATS)}}}")
    return by_suffix[path.suffix]


def check_destination(dst: Path, force: bool) -> None:
    if not dst.parent.is_dir():
        raise ConvertError(f"the folder of {dst} does not exist")
    if dst.exists() and not force:
        raise ConvertError(f"{dst} exists; pass --force to replace it")


def fla_config(dims: Dims, dtype: torch.dtype) -> dict[str, object]:
    """A ``config.json`` for ``RWKV7ForCausalLM`` that builds exactly these shapes, with RWKV-LM's numerics
    (fuse_norm off: PyTorch norms and exact kk normalisation; LayerNorm eps 1e-5, GroupNorm eps 64e-5 for N=64)."""
    C, L, r = dims.n_embd, dims.n_layer, dims.ranks
    return {
        "architectures": ["RWKV7ForCausalLM"], "model_type": "rwkv7", "attn_mode": "chunk",
        "hidden_size": C, "num_hidden_layers": L, "head_dim": dims.head_size, "num_heads": C // dims.head_size,
        "decay_low_rank_dim": r["w"], "a_low_rank_dim": r["a"], "v_low_rank_dim": r["v"], "gate_low_rank_dim": r["g"],
        "value_dim": [C] * L, "hidden_ratio": 4, "intermediate_size": 4 * C, "hidden_act": "sqrelu",
        "norm_first": True, "norm_bias": True, "norm_eps": 1e-5, "fuse_norm": False,
        "vocab_size": dims.vocab_size, "tie_word_embeddings": False,
        "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": None,  # RWKV vocabularies: token 0 ends a document
        "dtype": str(dtype).removeprefix("torch."),
    }


@dataclass(frozen=True)
class HarnessMetadata:
    config: ModelConfig
    impl_flags: dict[str, object]
    extra: dict[str, object]


def harness_metadata(source: Source, dims: Dims, target: Target) -> HarnessMetadata:
    """The model config, impl flags and extra (e.g. the step) a harness target is written with; checks that the
    harness can build the model."""
    rule = lora_ranks(dims.n_embd)
    for kind, rank in dims.ranks.items():
        if rank != rule[kind] and (kind != "v" or dims.n_layer > 1):
            name = source.names[f"blocks.{0 if kind != 'v' else 1}.att.{kind}1"]
            raise ConvertError(f"{name} has LoRA rank {rank}, but the harness builds rank {rule[kind]} for "
                               f"n_embd={dims.n_embd} (RWKV-LM's size rule); cannot write a harness checkpoint")
    old = source.checkpoint
    shape = dict(n_layer=dims.n_layer, n_embd=dims.n_embd, head_size=dims.head_size, vocab_size=dims.vocab_size)
    try:
        config = ModelConfig(**{**(asdict(old.config) if old else {}), **shape})
    except ValueError as exc:
        raise ConvertError(f"cannot write a harness checkpoint: {exc}") from None
    flags = old.impl_flags if old and old.impl == target.impl else {}
    return HarnessMetadata(config, flags, dict(old.extra) if old else {})


def _own_storage(tensor: torch.Tensor) -> torch.Tensor:
    """Contiguous and not sharing storage, as torch.save and safetensors want."""
    tensor = tensor.contiguous()
    return tensor.clone() if tensor.untyped_storage().nbytes() != tensor.nbytes else tensor


def _with_default_permissions(tmp: Path) -> None:
    """The files under ``tmp`` readable as the umask lets every new file be: safetensors creates its files for
    the owner alone (0600), where torch.save and plain writes give the umask's 0644."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [tmp] if tmp.is_file() else tmp.iterdir():
        path.chmod(0o666 & ~umask)


def _commit(tmp: Path, dst: Path, force: bool) -> None:
    if dst.exists() and force:
        shutil.rmtree(dst) if dst.is_dir() else dst.unlink()
    os.replace(tmp, dst)


def _write_to(tmp: Path, tensors: dict[str, torch.Tensor], target: Target, dims: Dims,
              harness: HarnessMetadata | None) -> None:
    if target.fmt == "rwkv-lm":
        torch.save(tensors, tmp)
    elif target.fmt == "fla":
        tmp.mkdir()
        dtype = Counter(t.dtype for t in tensors.values()).most_common(1)[0][0]
        (tmp / "config.json").write_text(json.dumps(fla_config(dims, dtype), indent=2) + "\n")
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    else:
        save_checkpoint(tmp, Checkpoint(tensors, target.impl, harness.config, harness.impl_flags, harness.extra))


def write(tensors: dict[str, torch.Tensor], dst: Path, target: Target, dims: Dims, force: bool,
          harness: HarnessMetadata | None = None) -> None:
    """Write under a temporary name next to ``dst``, then rename; nothing is left behind on failure."""
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    try:
        _write_to(tmp, {name: _own_storage(t) for name, t in tensors.items()}, target, dims, harness)
        _with_default_permissions(tmp)
        _commit(tmp, dst, force)
    except OSError as exc:
        raise ConvertError(f"cannot write {dst} ({exc})") from None
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp)
        tmp.unlink(missing_ok=True)

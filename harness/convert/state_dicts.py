"""Name -> tensor state dicts out of files as users have them: a flat ``.pth`` / ``.safetensors`` file, a Lightning
checkpoint (``torch.save``'d dict with the weights under ``state_dict``), or a DeepSpeed checkpoint directory.

Lightning's ``DeepSpeedStrategy.save_checkpoint`` (lightning 2.6) calls ``DeepSpeedEngine.save_checkpoint(path,
tag="checkpoint")``, which (deepspeed 0.19, ``runtime/engine.py``) writes ``path/latest`` (the tag),
``path/checkpoint/mp_rank_00_model_states.pt`` (under ZeRO 0-2 the full module weights, in the engine's dtype, under
``module``, beside Lightning's loop state) and the optimizer shards ``path/checkpoint/*_optim_states.pt``; ZeRO-3
writes ``zero_pp_rank_<r>_mp_rank_00_model_states.pt`` with its weights partitioned into the shards. The module's
names carry the wrappers' prefixes: ``model.`` (LitRWKV holds the RWKV as ``self.model``), ``_forward_module.``
before lightning 2.1, ``module.`` where a wrapper's own state dict was saved.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from harness.convert import ConvertError

NESTINGS = ("state_dict", "module")  # Lightning's checkpoint, DeepSpeed's model states
PREFIXES = ("_forward_module.", "module.", "model.")
DEEPSPEED_MODEL_STATES = "mp_rank_00_model_states.pt"
DEEPSPEED_ZERO3_MODEL_STATES = "zero_pp_rank_0_mp_rank_00_model_states.pt"
_SHOWN_KEYS = 6


def is_deepspeed_checkpoint(path: Path) -> bool:
    return path.is_dir() and ((path / "latest").is_file() or any(path.glob("*/*_model_states.pt")))


def deepspeed_model_states(path: Path) -> Path:
    """The file of a DeepSpeed checkpoint directory that holds the full module weights (ZeRO 0-2)."""
    latest = path / "latest"
    if latest.is_file():
        folders = [path / latest.read_text().strip()]
    else:
        folders = sorted({p.parent for p in path.glob("*/*_model_states.pt")})
    if len(folders) != 1:
        raise ConvertError(f"{path} holds {len(folders)} DeepSpeed checkpoint tags and no 'latest' file naming one")
    folder = folders[0]
    if (folder / DEEPSPEED_MODEL_STATES).is_file():
        return folder / DEEPSPEED_MODEL_STATES
    if (folder / DEEPSPEED_ZERO3_MODEL_STATES).is_file():
        raise ConvertError(f"{path} is a DeepSpeed ZeRO-3 checkpoint, whose weights are partitioned into the "
                           f"optimizer shards; consolidate it first with its zero_to_fp32.py")
    raise ConvertError(f"{path} looks like a DeepSpeed checkpoint but has no {folder.name}/{DEEPSPEED_MODEL_STATES}")


def load_torch_file(path: Path) -> object:
    """``torch.load`` with torch's safe loader (tensors and plain containers only, no code runs)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError, KeyError, EOFError, pickle.UnpicklingError) as exc:
        refused = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
        if refused:
            raise ConvertError(f"{path} holds a {refused[1]} object, which torch's safe loader (weights_only) "
                               "refuses; load it yourself and torch.save its state dict") from None
        raise ConvertError(f"cannot read {path} as a PyTorch state dict ({type(exc).__name__})") from None


def read_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """The name -> tensor dict in ``path`` (unwrapped, prefixes stripped) and what kind of file it was."""
    if path.is_dir():
        file = deepspeed_model_states(path)
        kind = f"DeepSpeed checkpoint ({file.relative_to(path)})"
        loaded = load_torch_file(file)
    elif path.suffix == ".safetensors":
        try:
            loaded, kind = load_file(str(path)), "safetensors file"
        except (OSError, SafetensorError) as exc:
            raise ConvertError(f"cannot read {path} as a safetensors file ({type(exc).__name__})") from None
    else:
        loaded = load_torch_file(path)
        kind = "Lightning checkpoint" if isinstance(loaded, dict) and "state_dict" in loaded else "state dict"
    return flat_state_dict(loaded, path), kind


def flat_state_dict(loaded: object, path: Path) -> dict[str, torch.Tensor]:
    """Descends into ``state_dict`` / ``module`` while the dict holds no tensors, then strips the wrappers' prefixes;
    anything else is refused, saying what was found."""
    state, trail = loaded, []
    while isinstance(state, dict) and not _holds_tensors(state):
        key = next((k for k in NESTINGS if isinstance(state.get(k), dict)), None)
        if key is None:
            break
        state, trail = state[key], [*trail, key]
    if not (isinstance(state, dict) and state and all(isinstance(v, torch.Tensor) for v in state.values())):
        where = f" under {'/'.join(trail)}" if trail else ""
        raise ConvertError(f"{path} holds no name -> tensor state dict (looked at the top and under "
                           f"{' or '.join(NESTINGS)}): found {_describe(state)}{where}")
    return strip_prefixes(state)


def strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Removes each wrapper prefix that every name carries (``_forward_module.model.emb.weight`` -> ``emb.weight``)."""
    while prefix := next((p for p in PREFIXES if all(k.startswith(p) for k in state)), None):
        state = {k.removeprefix(prefix): v for k, v in state.items()}
    return state


def _holds_tensors(state: dict) -> bool:
    return any(isinstance(v, torch.Tensor) for v in state.values())


def _describe(value: object) -> str:
    if not isinstance(value, dict):
        return f"a {type(value).__name__}"
    if not value:
        return "an empty dict"
    others = [str(k) for k, v in value.items() if not isinstance(v, torch.Tensor)]
    shown = ", ".join(others[:_SHOWN_KEYS]) + (", ..." if len(others) > _SHOWN_KEYS else "")
    if len(others) == len(value):
        return f"a dict with keys {shown} and no tensors at the top"
    return f"a dict with tensors and {len(others)} other entries ({shown})"

"""One reader per source format, each returning the tensors under canonical (RWKV-LM) names and layouts.

Source formats: ``rwkv-lm`` (a ``.pth`` / ``.safetensors`` state dict with RWKV-LM names, also nested or prefixed
as Lightning and DeepSpeed save them), ``fla`` (a Hugging Face directory), ``harness`` (the harness's
``.safetensors`` checkpoint) and ``run`` (a training run directory, or one of its ``checkpoints/step-N.ckpt``; the
run's ``run.json`` says which implementation's names the weights carry).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from harness.convert import ConvertError
from harness.convert.namings import FLA_NAMING, RWKV_LM_NAMING, Naming, harness_naming, impl_name_map
from harness.convert.shapes import Dims, infer_dims
from harness.convert.state_dicts import is_deepspeed_checkpoint, read_state_dict
from harness.model.checkpoint import Checkpoint, is_checkpoint, load_checkpoint
from harness.model.rwkv import ModelConfig
from harness.results import RunDir, UnreadableRunFile
from impls.base import Transform, to_canonical

SOURCE_FORMATS = ("rwkv-lm", "fla", "harness", "run")


@dataclass(frozen=True)
class Source:
    naming: Naming
    hub: dict[str, torch.Tensor]  # canonical names and layouts
    names: dict[str, str]  # canonical -> the source's own name
    checkpoint: Checkpoint | None = None  # harness and run sources: the implementation, model config and flags
    notes: tuple[str, ...] = ()


def _hub_layout(tensor: torch.Tensor, transform: Transform, name: str) -> torch.Tensor:
    ndim = {"T": 2, "flat": 1}.get(transform)
    if ndim is not None and tensor.dim() != ndim:
        raise ConvertError(f"{name} has shape {list(tensor.shape)}, expected {ndim} dims")
    return to_canonical(tensor, transform)


def _to_hub(naming: Naming, tensors: dict[str, torch.Tensor], **kwargs: object) -> Source:
    hub, names = {}, {}
    for name, tensor in tensors.items():
        try:
            canonical, transform = naming.to_hub(name)
        except KeyError:
            raise ConvertError(f"unexpected tensor {name} (no RWKV-LM counterpart)") from None
        hub[canonical] = _hub_layout(tensor, transform, name)
        names[canonical] = name
    return Source(naming, hub, names, **kwargs)


def read_rwkv_lm(path: Path) -> Source:
    """RWKV-LM-named tensors: a ``.pth`` state dict (also a Lightning checkpoint or DeepSpeed directory of one), or a
    ``.safetensors`` file of them (e.g. an ``init=shared`` file)."""
    state, _ = read_state_dict(path)
    return _to_hub(RWKV_LM_NAMING, state)


# --- FLA / Hugging Face directories -------------------------------------------------------------------------------


def _read_fla_tensors(path: Path) -> dict[str, torch.Tensor]:
    index = path / "model.safetensors.index.json"
    try:
        if index.exists():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return {k: v for shard in shards for k, v in load_file(str(path / shard)).items()}
        return load_file(str(path / "model.safetensors"))
    except (OSError, ValueError, KeyError, SafetensorError) as exc:
        raise ConvertError(f"cannot read the weights in {path} ({type(exc).__name__}: {exc})") from None


def _fla_config_notes(config: dict, path: Path) -> tuple[str, ...]:
    """Checks the model type; notes settings under which the converted model computes something else."""
    if config.get("model_type") != "rwkv7":
        raise ConvertError(f"{path}/config.json has model_type {config.get('model_type')!r}, expected 'rwkv7'")
    notes = []
    if config.get("norm_eps", 1e-5) != 1e-5:
        notes.append(f"note: source norm_eps is {config['norm_eps']}, RWKV-LM uses 1e-5 (weights convert, "
                     "the function differs)")
    if config.get("hidden_act", "sqrelu") != "sqrelu":
        notes.append(f"note: source hidden_act is {config['hidden_act']!r}, RWKV-LM uses relu^2")
    return tuple(notes)


def _check_fla_config(config: dict, dims: Dims, path: Path) -> None:
    claimed = {"hidden_size": dims.n_embd, "num_hidden_layers": dims.n_layer, "vocab_size": dims.vocab_size,
               "head_dim": dims.head_size, "decay_low_rank_dim": dims.ranks["w"], "a_low_rank_dim": dims.ranks["a"],
               "gate_low_rank_dim": dims.ranks["g"], "v_low_rank_dim": dims.ranks["v"]}
    for key, value in claimed.items():
        if key in config and config[key] != value and not (key == "v_low_rank_dim" and dims.n_layer == 1):
            raise ConvertError(f"{path}/config.json says {key}={config[key]} but the tensors say {value}")


def read_fla(path: Path) -> Source:
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ConvertError(f"cannot read {path}/config.json ({exc})") from None
    notes = _fla_config_notes(config, path)
    source = _to_hub(FLA_NAMING, _read_fla_tensors(path), notes=notes)
    _check_fla_config(config, infer_dims(source.hub, source.naming), path)
    return source


def read_harness(path: Path) -> Source:
    checkpoint = load_checkpoint(path)
    return _to_hub(harness_naming(impl_name_map(checkpoint.impl)), checkpoint.state, checkpoint=checkpoint)


# --- training runs ------------------------------------------------------------------------------------------------


def run_dir_of(path: Path) -> RunDir | None:
    """The run ``path`` is, or whose ``checkpoints/`` holds ``path``; None for anything else."""
    for candidate in (path, path.parent.parent if path.parent.name == "checkpoints" else None):
        if candidate is not None and candidate.is_dir() and RunDir(candidate).run_json.is_file():
            return RunDir(candidate)
    return None


def _run_checkpoint(run: RunDir, path: Path) -> Path:
    if path != run.path:
        return path
    try:
        last = run.last_checkpoint()
    except UnreadableRunFile as exc:
        raise ConvertError(f"{exc.path} is unreadable ({exc.reason}); name the checkpoint to convert instead: "
                           f"{run.checkpoint_dir}/step-N.ckpt") from None
    except (OSError, ValueError, KeyError) as exc:
        raise ConvertError(f"cannot read {run.last_checkpoint_record} ({type(exc).__name__})") from None
    if last is None:
        raise ConvertError(f"{run.path} has no complete checkpoint (no checkpoints/{run.last_checkpoint_record.name}); "
                           "a run writes one every trainer.ckpt_every steps and after its last step")
    if not last[1].exists():
        raise ConvertError(f"{run.last_checkpoint_record} names {last[1].name}, which does not exist")
    return last[1]


def _run_model(run: RunDir) -> tuple[str, ModelConfig, dict[str, object]]:
    """The run's implementation, model config and implementation flags, from its run.json."""
    try:
        record = run.read_run_json()
        config = record["config"]
        model = {k: v for k, v in config["model"].items() if k != "name"}
        model_cfg = ModelConfig(**model, grad_cp=bool(config.get("trainer", {}).get("grad_cp", False)))
        return config["impl"]["name"], model_cfg, dict(record.get("impl", {}).get("flags", {}))
    except UnreadableRunFile as exc:
        raise ConvertError(f"cannot read the run's impl and model config from {run.run_json} ({exc.reason})") \
            from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ConvertError(f"cannot read the run's impl and model config from {run.run_json} "
                           f"({type(exc).__name__}: {exc})") from None


def read_run(path: Path) -> Source:
    """A run's last checkpoint (or the one given): Lightning's file (CPU, single device) or DeepSpeed's directory."""
    run = run_dir_of(path)
    if run is None:
        raise ConvertError(f"{path} is neither a run directory (with run.json) nor in a run's checkpoints/ folder")
    checkpoint_path = _run_checkpoint(run, path)
    if not checkpoint_path.exists():
        raise ConvertError(f"{checkpoint_path} does not exist")
    impl, model_cfg, flags = _run_model(run)
    state, kind = read_state_dict(checkpoint_path)
    step = re.fullmatch(r"step-(\d+)\.ckpt", checkpoint_path.name)
    extra = {"step": int(step[1])} if step else {}
    dtypes = ", ".join(sorted({str(t.dtype).removeprefix("torch.") for t in state.values()}))
    note = f"read {checkpoint_path.name} of run {run.path.name} (impl {impl}, {kind}, {dtypes})"
    checkpoint = Checkpoint(state, impl, model_cfg, flags, extra)
    return _to_hub(harness_naming(impl_name_map(impl)), state, checkpoint=checkpoint, notes=(note,))


READERS: dict[str, Callable[[Path], Source]] = {"rwkv-lm": read_rwkv_lm, "fla": read_fla, "harness": read_harness,
                                                "run": read_run}


def detect_source_format(path: Path) -> str:
    if not path.exists():
        raise ConvertError(f"{path} does not exist")
    if run_dir_of(path) is not None:
        return "run"
    if path.is_dir():
        if (path / "config.json").exists():
            return "fla"
        if is_deepspeed_checkpoint(path):
            return "rwkv-lm"
        raise ConvertError(f"{path} is a directory without config.json, run.json or a DeepSpeed checkpoint; "
                           "pass --from")
    if path.suffix == ".safetensors":
        return "harness" if is_checkpoint(path) else "rwkv-lm"
    if path.suffix in (".pth", ".pt", ".ckpt", ".bin"):
        return "rwkv-lm"
    raise ConvertError(f"cannot tell the format of {path}; pass --from {{{','.join(SOURCE_FORMATS)}}}")

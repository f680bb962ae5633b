"""Naming-alignment weight converter between RWKV-LM, FLA / Hugging Face and harness checkpoints.

    python -m harness.convert SRC DST [--from FMT] [--to FMT] [--impl NAME] [--dtype keep|bf16|fp32]
                              [--dry-run] [--force]

Formats: ``rwkv-lm`` (a ``.pth`` state dict with RWKV-LM x070 names), ``fla`` (a directory that
``RWKV7ForCausalLM.from_pretrained`` loads: ``config.json`` + ``model.safetensors``) and ``harness`` (this harness's
``.safetensors`` checkpoint, see :mod:`harness.checkpoint`). Every conversion goes through RWKV-LM's names and
layouts (the hub); model dimensions come from the tensor shapes. Layer 0's unused ``v0/v1/v2`` are dropped toward
formats without them and restored with RWKV-LM's init values toward formats that need them. Any problem is one line
on stderr, exit code 2, and nothing written: everything is checked first, then written under a temporary name and
renamed.

The RWKV-LM <-> FLA time-mix table (notes §5) is :data:`impls.fla_names.FLA_ATT_NAME_MAP`, the name map
``impl=fla`` owns, so the same table backs the converter and ``init=shared``.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import shutil
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import impls
from harness.errors import USER_ERRORS, HarnessError
from harness.model.checkpoint import Checkpoint, is_checkpoint, load_checkpoint, save_checkpoint
from harness.model.rwkv import ModelConfig, canonical_key, native_key
from impls.base import CANONICAL_ATT_NAMES, LAYER0_UNUSED, NameMap, Transform, to_canonical, to_native
from impls.fla_names import FLA_ATT_NAME_MAP
from impls.init import lora_rank, lora_ranks, value_residual_init

FORMATS = ("rwkv-lm", "fla", "harness")
DTYPES: dict[str, torch.dtype | None] = {"keep": None, "bf16": torch.bfloat16, "fp32": torch.float32}
RESTORE_SEED = 0

# FLA RWKV7ForCausalLM names outside the time-mix.
_FLA_TOP = {"emb.weight": "model.embeddings.weight", "ln_out.weight": "model.norm.weight",
            "ln_out.bias": "model.norm.bias", "head.weight": "lm_head.weight"}
_FLA_BLOCK_PART = {"ln0": "pre_norm", "ln1": "attn_norm", "ln2": "ffn_norm", "att": "attn", "ffn": "ffn"}
_FLA_FFN: dict[str, tuple[str, Transform]] = {"x_k": ("x_k", "flat"), "key.weight": ("key.weight", "same"),
                                             "value.weight": ("value.weight", "same")}
_NORM_PARAMS = ("weight", "bias")


class ConvertError(HarnessError):
    """A conversion that cannot be done; the message names the tensor or file."""


# --- namings: canonical (RWKV-LM) name <-> a format's name ---------------------------------------------------------


@dataclass(frozen=True)
class Naming:
    to_format: Callable[[str], tuple[str, Transform]]  # canonical -> (name, transform); KeyError if none
    to_hub: Callable[[str], tuple[str, Transform]]  # name -> (canonical, transform); KeyError if unknown


def _identity(name: str) -> tuple[str, Transform]:
    return name, "same"


def _fla_name(canonical: str) -> tuple[str, Transform]:
    if canonical in _FLA_TOP:
        return _FLA_TOP[canonical], "same"
    match = re.fullmatch(r"blocks\.(\d+)\.(\w+)\.(.+)", canonical)
    if not match or match[2] not in _FLA_BLOCK_PART:
        raise KeyError(canonical)
    layer, part, rest = match.groups()
    if part == "att":
        name, transform = FLA_ATT_NAME_MAP.native(rest)
    elif part == "ffn":
        name, transform = _FLA_FFN[rest]
    elif rest in _NORM_PARAMS:
        name, transform = rest, "same"
    else:
        raise KeyError(canonical)
    return f"model.layers.{layer}.{_FLA_BLOCK_PART[part]}.{name}", transform


def _hub_name_from_fla(name: str) -> tuple[str, Transform]:
    top = {fla: canonical for canonical, fla in _FLA_TOP.items()}
    if name in top:
        return top[name], "same"
    match = re.fullmatch(r"model\.layers\.(\d+)\.(\w+)\.(.+)", name)
    parts = {fla: canonical for canonical, fla in _FLA_BLOCK_PART.items()}
    if not match or match[2] not in parts:
        raise KeyError(name)
    layer, part, rest = match[1], parts[match[2]], match[3]
    if part == "att":
        canonical, transform = FLA_ATT_NAME_MAP.canonical(rest)
    elif part == "ffn":
        canonical, transform = {fla: (c, t) for c, (fla, t) in _FLA_FFN.items()}[rest]
    elif rest in _NORM_PARAMS:
        canonical, transform = rest, "same"
    else:
        raise KeyError(name)
    return f"blocks.{layer}.{part}.{canonical}", transform


RWKV_LM_NAMING = Naming(_identity, _identity)
FLA_NAMING = Naming(_fla_name, _hub_name_from_fla)


def harness_naming(name_map: NameMap) -> Naming:
    return Naming(lambda c: native_key(c, name_map), lambda n: canonical_key(n, name_map))


def impl_name_map(impl: str) -> NameMap:
    """An implementation's name map; fla's is known here, so converting its checkpoints needs no fla install."""
    return FLA_ATT_NAME_MAP if impl == "fla" else impls.get(impl).name_map


# --- model dimensions and the expected canonical tensors ----------------------------------------------------------


@dataclass(frozen=True)
class Dims:
    n_layer: int
    n_embd: int
    head_size: int
    vocab_size: int
    ranks: dict[str, int]  # LoRA ranks: w (decay), a (in-context rate), v (value residual), g (gate)

    def describe(self) -> str:
        r = self.ranks
        return (f"n_layer={self.n_layer} n_embd={self.n_embd} head_size={self.head_size} "
                f"vocab_size={self.vocab_size} lora w/a/v/g={r['w']}/{r['a']}/{r['v']}/{r['g']}")


def expected_shapes(dims: Dims) -> dict[str, tuple[int, ...]]:
    """Every canonical tensor of a model with ``dims`` (layer-0 v0/v1/v2 included), in output order."""
    C, V, N, r = dims.n_embd, dims.vocab_size, dims.head_size, dims.ranks
    att = {**{f"x_{c}": (1, 1, C) for c in "rwkvag"}, "k_k": (1, 1, C), "k_a": (1, 1, C), "r_k": (C // N, N),
           **{f"{c}0": (1, 1, C) for c in "wav"}, **{f"{c}1": (C, r[c]) for c in "wavg"},
           **{f"{c}2": (r[c], C) for c in "wavg"},
           **{f"{m}.weight": (C, C) for m in ("receptance", "key", "value", "output")},
           "ln_x.weight": (C,), "ln_x.bias": (C,)}
    shapes: dict[str, tuple[int, ...]] = {"emb.weight": (V, C)}
    for i in range(dims.n_layer):
        for norm in ("ln0", "ln1", "ln2") if i == 0 else ("ln1", "ln2"):
            shapes.update({f"blocks.{i}.{norm}.{p}": (C,) for p in _NORM_PARAMS})
        shapes.update({f"blocks.{i}.att.{name}": att[name] for name in CANONICAL_ATT_NAMES})
        shapes.update({f"blocks.{i}.ffn.x_k": (1, 1, C), f"blocks.{i}.ffn.key.weight": (4 * C, C),
                       f"blocks.{i}.ffn.value.weight": (C, 4 * C)})
    shapes.update({"ln_out.weight": (C,), "ln_out.bias": (C,), "head.weight": (V, C)})
    return shapes


def _is_layer0_unused(canonical: str) -> bool:
    return canonical in {f"blocks.0.att.{name}" for name in LAYER0_UNUSED}


def infer_dims(hub: dict[str, torch.Tensor], naming: Naming) -> Dims:
    """Model dimensions from the tensor shapes (emb, layer 0's r_k and LoRAs, layer 1's value LoRA)."""
    def shape(canonical: str, ndim: int) -> tuple[int, ...]:
        if canonical not in hub:
            raise ConvertError(f"missing tensor {naming.to_format(canonical)[0]}")
        if hub[canonical].dim() != ndim:
            raise ConvertError(f"{naming.to_format(canonical)[0]} has {hub[canonical].dim()} dims, expected {ndim}")
        return tuple(hub[canonical].shape)

    vocab_size, n_embd = shape("emb.weight", 2)
    n_layer = 1 + max((int(m[1]) for k in hub if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1)
    if n_layer == 0:
        raise ConvertError(f"no layers found (no {naming.to_format('blocks.0.att.r_k')[0]} or similar tensor)")
    _, head_size = shape("blocks.0.att.r_k", 2)
    ranks = {c: shape(f"blocks.0.att.{c}1", 2)[1] for c in "wag"}
    ranks["v"] = shape("blocks.1.att.v1", 2)[1] if n_layer > 1 else lora_rank(1.7, n_embd)
    return Dims(n_layer, n_embd, head_size, vocab_size, ranks)


# --- reading ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    naming: Naming
    hub: dict[str, torch.Tensor]  # canonical names and layouts
    names: dict[str, str]  # canonical -> the source's own name
    checkpoint: Checkpoint | None = None  # harness sources only
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
    """A ``.pth`` state dict, or a ``.safetensors`` file of RWKV-LM-named tensors (e.g. an ``init=shared`` file)."""
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError, SafetensorError) as exc:
        raise ConvertError(f"cannot read {path} as a PyTorch state dict ({type(exc).__name__})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConvertError(f"{path} does not hold a flat name -> tensor state dict")
    return _to_hub(RWKV_LM_NAMING, state)


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


READERS: dict[str, Callable[[Path], Source]] = {"rwkv-lm": read_rwkv_lm, "fla": read_fla, "harness": read_harness}


def check_source(source: Source, dims: Dims) -> None:
    """Every expected tensor present (layer-0 v0/v1/v2 optional), nothing extra, every shape right."""
    expected = expected_shapes(dims)
    for canonical, tensor in source.hub.items():
        if canonical not in expected:
            raise ConvertError(f"unexpected tensor {source.names[canonical]} (not part of a model with "
                               f"{dims.describe()})")
        if tuple(tensor.shape) != expected[canonical]:
            name = source.names[canonical]
            _, transform = source.naming.to_format(canonical)
            want = to_native(torch.empty(expected[canonical], device="meta"), transform).shape
            got = to_native(tensor, transform).shape
            raise ConvertError(f"{name} has shape {list(got)}, expected {list(want)} for a model with "
                               f"{dims.describe()}")
    layer0_unused = [c for c in expected if _is_layer0_unused(c)]
    optional = layer0_unused if not any(c in source.hub for c in layer0_unused) else []
    missing = [c for c in expected if c not in source.hub and c not in optional]
    if missing:
        raise ConvertError(f"missing tensor {source.naming.to_format(missing[0])[0]}"
                           + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))


# --- targets and the conversion plan ------------------------------------------------------------------------------


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


@dataclass(frozen=True)
class Row:
    source_name: str | None  # None: restored
    name: str | None  # None: dropped
    tensor: torch.Tensor | None  # in the target's layout and dtype; None: dropped
    transform: str


def _net_transform(a: Transform, b: Transform) -> str:
    if a == b:
        return "-"
    return "T" if "T" in (a, b) else "reshape"


def _restored_layer0(dims: Dims, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    init = value_residual_init(dims.n_embd, dims.ranks["v"], torch.Generator().manual_seed(RESTORE_SEED))
    return {f"blocks.0.att.{name}": value.to(dtype) for name, value in init.items()}


def plan(source: Source, dims: Dims, target: Target, dtype: torch.dtype | None) -> tuple[list[Row], list[str]]:
    """Rows in output order, and the notes to print (dropped/restored tensors)."""
    restored = {}
    if target.has_layer0_unused and not any(_is_layer0_unused(c) for c in source.hub):
        restored = _restored_layer0(dims, dtype or source.hub["blocks.0.att.w0"].dtype)
    rows, dropped = [], []
    for canonical in expected_shapes(dims):
        if _is_layer0_unused(canonical) and not target.has_layer0_unused:
            if canonical in source.hub:
                dropped.append(canonical)
                rows.append(Row(source.names[canonical], None, None, "dropped"))
            continue
        name, transform = target.naming.to_format(canonical)
        if canonical in restored:
            tensor, source_name, net = restored[canonical], None, "restored"
        else:
            tensor, source_name = source.hub[canonical], source.names[canonical]
            net = _net_transform(source.naming.to_format(canonical)[1], transform)
        tensor = to_native(tensor if dtype is None else tensor.to(dtype), transform)
        rows.append(Row(source_name, name, tensor, net))
    notes = list(source.notes)
    if target.fmt == "fla" and dims.head_size != 64:
        notes.append(f"note: FLA's GroupNorm eps is head_size*norm_eps = {dims.head_size * 1e-5:g}, "
                     "RWKV-LM's ln_x eps is 64e-5")
    if dropped:
        notes.append(f"dropped {', '.join(dropped)}: layer 0 never uses them and the {target.fmt} target has none")
    if restored:
        notes.append(f"restored {', '.join(restored)} with RWKV-LM's init values (v0 = 0.73 - 0.4*linear, v1 = 0, "
                     f"v2 = orthogonal gain 0.1, generator seed {RESTORE_SEED}); layer 0 never uses them")
    return rows, notes


def mapping_table(rows: list[Row]) -> list[str]:
    def shape(row: Row) -> str:
        return "" if row.tensor is None else "x".join(map(str, row.tensor.shape))

    lines = [(r.source_name or "(restored)", r.transform, r.name or "(dropped)", shape(r),
              "" if r.tensor is None else str(r.tensor.dtype).removeprefix("torch.")) for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(4)]
    return [f"{a:<{widths[0]}}  {t:<{widths[1]}}  {b:<{widths[2]}}  {s:<{widths[3]}}  {d}".rstrip()
            for a, t, b, s, d in lines]


# --- writing ------------------------------------------------------------------------------------------------------


def _own_storage(tensor: torch.Tensor) -> torch.Tensor:
    """Contiguous and not sharing storage, as torch.save and safetensors want."""
    tensor = tensor.contiguous()
    return tensor.clone() if tensor.untyped_storage().nbytes() != tensor.nbytes else tensor


def _tensors(rows: list[Row]) -> dict[str, torch.Tensor]:
    return {r.name: _own_storage(r.tensor) for r in rows if r.name is not None}


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


def _harness_config(source: Source, dims: Dims, target: Target) -> tuple[ModelConfig, dict[str, object]]:
    """The harness model config (and impl flags) a harness target is written with; checks it can be built."""
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
    return config, flags


def _commit(tmp: Path, dst: Path, force: bool) -> None:
    if dst.exists() and force:
        shutil.rmtree(dst) if dst.is_dir() else dst.unlink()
    os.replace(tmp, dst)


def _write_to(tmp: Path, tensors: dict[str, torch.Tensor], target: Target, dims: Dims,
              harness: tuple[ModelConfig, dict[str, object]] | None) -> None:
    if target.fmt == "rwkv-lm":
        torch.save(tensors, tmp)
    elif target.fmt == "fla":
        tmp.mkdir()
        dtype = Counter(t.dtype for t in tensors.values()).most_common(1)[0][0]
        (tmp / "config.json").write_text(json.dumps(fla_config(dims, dtype), indent=2) + "\n")
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    else:
        config, flags = harness
        save_checkpoint(tmp, Checkpoint(tensors, target.impl, config, flags))


def write(rows: list[Row], dst: Path, target: Target, dims: Dims, force: bool,
          harness: tuple[ModelConfig, dict[str, object]] | None = None) -> None:
    """Write under a temporary name next to ``dst``, then rename; nothing is left behind on failure."""
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    try:
        _write_to(tmp, _tensors(rows), target, dims, harness)
        _commit(tmp, dst, force)
    except OSError as exc:
        raise ConvertError(f"cannot write {dst} ({exc})") from None
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp)
        tmp.unlink(missing_ok=True)


# --- command line -------------------------------------------------------------------------------------------------


def detect_source_format(path: Path) -> str:
    if path.is_dir():
        if (path / "config.json").exists():
            return "fla"
        raise ConvertError(f"{path} is a directory without config.json; pass --from")
    if not path.exists():
        raise ConvertError(f"{path} does not exist")
    if path.suffix == ".safetensors":
        return "harness" if is_checkpoint(path) else "rwkv-lm"
    if path.suffix in (".pth", ".pt"):
        return "rwkv-lm"
    raise ConvertError(f"cannot tell the format of {path}; pass --from {{{','.join(FORMATS)}}}")


def detect_target_format(path: Path) -> str:
    by_suffix = {".pth": "rwkv-lm", ".pt": "rwkv-lm", ".safetensors": "harness", "": "fla"}
    if path.suffix not in by_suffix:
        raise ConvertError(f"cannot tell the format to write from {path.name}; pass --to {{{','.join(FORMATS)}}}")
    return by_suffix[path.suffix]


def _check_destination(dst: Path, force: bool) -> None:
    if not dst.parent.is_dir():
        raise ConvertError(f"the folder of {dst} does not exist")
    if dst.exists() and not force:
        raise ConvertError(f"{dst} exists; pass --force to replace it")


def convert(src: Path, dst: Path, from_fmt: str | None = None, to_fmt: str | None = None, impl: str | None = None,
            dtype: str = "keep", dry_run: bool = False, force: bool = False) -> list[str]:
    """Convert ``src`` to ``dst``; returns the lines to print. Raises :class:`ConvertError` (nothing written)."""
    from_fmt = from_fmt or detect_source_format(src)
    to_fmt = to_fmt or detect_target_format(dst)
    if impl is not None and to_fmt != "harness":
        raise ConvertError("--impl names the implementation of a harness checkpoint; the target is " + to_fmt)
    if not dry_run:
        _check_destination(dst, force)
    source = READERS[from_fmt](src)
    dims = infer_dims(source.hub, source.naming)
    check_source(source, dims)
    if to_fmt == "harness":
        impl = impl or (source.checkpoint.impl if source.checkpoint else "reference")
    target = make_target(to_fmt, impl)
    harness = _harness_config(source, dims, target) if to_fmt == "harness" else None
    rows, notes = plan(source, dims, target, DTYPES[dtype])
    via = f" (impl {impl})" if impl else ""
    lines = [f"{from_fmt} {src} -> {to_fmt}{via} {dst}: {dims.describe()}"]
    if dry_run:
        return lines + mapping_table(rows) + notes + ["dry run: nothing written"]
    write(rows, dst, target, dims, force, harness)
    written = sum(r.name is not None for r in rows)
    return lines + notes + [f"wrote {dst} ({written} tensors)"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse would print the usage block too)
        self.exit(2, f"error: {message} (see python -m harness.convert --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m harness.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("src", type=Path, help=".pth or canonical .safetensors (rwkv-lm), FLA directory, "
                                               "or harness .safetensors")
    parser.add_argument("dst", type=Path, help="output path; its suffix picks the format unless --to is given")
    parser.add_argument("--from", dest="from_fmt", choices=FORMATS, help="source format (default: detected)")
    parser.add_argument("--to", dest="to_fmt", choices=FORMATS,
                        help="target format (default: .pth rwkv-lm, .safetensors harness, no suffix fla)")
    parser.add_argument("--impl", choices=impls.names(),
                        help="implementation of a harness target (default: the source's, else reference)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="keep", help="tensor dtype (default: keep)")
    parser.add_argument("--dry-run", action="store_true", help="print the mapping table, write nothing")
    parser.add_argument("--force", action="store_true", help="replace an existing destination")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        lines = convert(args.src, args.dst, args.from_fmt, args.to_fmt, args.impl, args.dtype, args.dry_run,
                        args.force)
    except USER_ERRORS as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


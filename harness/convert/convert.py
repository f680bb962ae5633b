"""The conversion: read a source into RWKV-LM's names and layouts (the hub), check it against the model its shapes
describe, plan every target tensor (layer 0's unused ``v0/v1/v2`` dropped toward formats without them and restored
with RWKV-LM's init values toward formats that need them), then write. Everything is checked before anything is
written; any problem is a :class:`~harness.convert.ConvertError` naming the tensor or file."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from harness.convert import ConvertError
from harness.convert.readers import READERS, Source, detect_source_format
from harness.convert.shapes import Dims, expected_shapes, infer_dims, is_layer0_unused
from harness.convert.writers import (
    Target,
    check_destination,
    detect_target_format,
    harness_metadata,
    make_target,
    write,
)
from impls.base import Transform, to_native
from impls.init import value_residual_init

DTYPES: dict[str, torch.dtype | None] = {"keep": None, "bf16": torch.bfloat16, "fp32": torch.float32}
RESTORE_SEED = 0


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
    layer0_unused = [c for c in expected if is_layer0_unused(c)]
    optional = layer0_unused if not any(c in source.hub for c in layer0_unused) else []
    missing = [c for c in expected if c not in source.hub and c not in optional]
    if missing:
        raise ConvertError(f"missing tensor {source.naming.to_format(missing[0])[0]}"
                           + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))


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
    if target.has_layer0_unused and not any(is_layer0_unused(c) for c in source.hub):
        restored = _restored_layer0(dims, dtype or source.hub["blocks.0.att.w0"].dtype)
    rows, dropped = [], []
    for canonical in expected_shapes(dims):
        if is_layer0_unused(canonical) and not target.has_layer0_unused:
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


def convert(src: Path, dst: Path, from_fmt: str | None = None, to_fmt: str | None = None, impl: str | None = None,
            dtype: str = "keep", dry_run: bool = False, force: bool = False) -> list[str]:
    """Convert ``src`` to ``dst``; returns the lines to print. Raises :class:`ConvertError` (nothing written)."""
    from_fmt = from_fmt or detect_source_format(src)
    to_fmt = to_fmt or detect_target_format(dst)
    if impl is not None and to_fmt != "harness":
        raise ConvertError("--impl names the implementation of a harness checkpoint; the target is " + to_fmt)
    if not dry_run:
        check_destination(dst, force)
    source = READERS[from_fmt](src)
    dims = infer_dims(source.hub, source.naming)
    check_source(source, dims)
    if to_fmt == "harness":
        impl = impl or (source.checkpoint.impl if source.checkpoint else "reference")
    target = make_target(to_fmt, impl)
    harness = harness_metadata(source, dims, target) if to_fmt == "harness" else None
    rows, notes = plan(source, dims, target, DTYPES[dtype])
    via = f" (impl {impl})" if impl else ""
    lines = [f"{from_fmt} {src} -> {to_fmt}{via} {dst}: {dims.describe()}"]
    if dry_run:
        return lines + mapping_table(rows) + notes + ["dry run: nothing written"]
    write({r.name: r.tensor for r in rows if r.name is not None}, dst, target, dims, force, harness)
    return lines + notes + [f"wrote {dst} ({sum(r.name is not None for r in rows)} tensors)"]

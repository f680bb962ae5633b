"""Per-layer numerical parity of two implementations: ``python -m harness.bench parity impl_a=fla impl_b=rwkv_jit``.

Both implementations, and the reference implementation in fp64 as the oracle, get the same weights: RWKV-LM's
effective init (``init=shared`` through :func:`harness.init.apply_init`) plus a small seeded, bf16-representable
perturbation (:func:`perturb`), because the init leaves the output projections, ``ffn.value`` and the first LoRA
matrices at zero and those paths would otherwise carry no signal. One batch of random tokens runs forward and
backward through each model (loss: cross-entropy with L2Wrap), and for every layer the time-mix output, the block
output, the gradient reaching the time-mix input and output, and every parameter gradient (under its RWKV-LM
canonical name, so ``fla`` and ``rwkv`` line up) are compared as ``||x - y|| / ||y||`` for a vs b, a vs the
oracle and b vs the oracle. ``att_param_grads`` sums up a layer's time-mix parameter gradients, each scaled to unit
norm first.

Keys (``key=value``): impl_a, impl_b (registry names), dtype_a, dtype_b (bf16 | fp32 | fp64; default the impl's
kernel dtype, else fp32), n_layer, n_embd, head_size, vocab, T, B, seed, device (default cuda when visible, else
cpu), out. Writes ``<out>/<stem>.csv`` (tidy: one row per tensor and comparison), ``<out>/<stem>.md`` and
``<out>/<stem>.png`` (per-layer relative errors, log scale), stem = ``<impl_a>-<dtype_a>_vs_<impl_b>-<dtype_b>``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

import impls
from harness.bench.grid import with_environment
from harness.env import environment
from harness.errors import HarnessError
from harness.figures import save_figure
from harness.model.init import apply_init
from harness.model.rwkv import RWKV, ModelConfig, lm_loss
from harness.numerics import perturb, rel_err
from harness.results import claim_new_paths
from harness.tables import markdown_table
from impls.base import Implementation, to_canonical

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64}
PAIRS = (("a", "b"), ("a", "ref"), ("b", "ref"))
LAYER_QUANTITIES = ("att_out", "block_out", "grad_att_in", "grad_att_out", "att_param_grads")
PLOT_FLOOR = 1e-16  # exact agreement drawn at this height on the log axis


@dataclass(frozen=True)
class ParityConfig:
    impl_a: str = "fla"
    impl_b: str = "rwkv_jit"
    dtype_a: str = ""
    dtype_b: str = ""
    n_layer: int = 4
    n_embd: int = 256
    head_size: int = 64
    vocab: int = 1000
    T: int = 128
    B: int = 2
    seed: int = 0
    device: str = ""
    out: str = "results/parity"


# --- weights and capture ------------------------------------------------------------------------------------


def shared_weights(model: RWKV, seed: int) -> dict[str, torch.Tensor]:
    """``init=shared`` under ``seed``, perturbed under ``seed + 1``, loaded into ``model``; the canonical tensors."""
    state = perturb(apply_init(model, "shared", seed), seed + 1)
    model.load_canonical_state_dict(state)
    return state


class _Tap(nn.Module):
    """Stands in for a block's time-mix during one capture: keeps its input and output with their gradients.

    A wrapper rather than hooks, so that TorchScript-compiled time-mixes (impl=rwkv_jit) are tapped as well."""

    def __init__(self, inner: nn.Module, layer: int, store: dict[str, torch.Tensor]):
        super().__init__()
        self.inner, self.layer, self.store = inner, layer, store

    def forward(self, x: torch.Tensor, v_first: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x.retain_grad()
        out, v_first = self.inner(x, v_first)
        out.retain_grad()
        self.store[f"att_in.{self.layer}"], self.store[f"att_out.{self.layer}"] = x, out
        return out, v_first


def capture(model: RWKV, idx: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """One forward and backward; fp64 CPU copies of the logits, per-layer time-mix outputs (``att_out.<i>``), block
    outputs (``block_out.<i>``), gradients at each time-mix's input and output (``grad_att_in.<i>``,
    ``grad_att_out.<i>``) and every parameter gradient under its canonical name (``grad.<name>``)."""
    store: dict[str, torch.Tensor] = {}
    handles = []
    for i, block in enumerate(model.blocks):
        block.att = _Tap(block.att, i, store)
        handles.append(block.register_forward_hook(
            lambda _m, _in, out, i=i: store.__setitem__(f"block_out.{i}", out[0])))
    try:
        logits = model(idx)
        lm_loss(logits.to(torch.promote_types(logits.dtype, torch.float32)), targets).backward()
    finally:
        for block in model.blocks:
            block.att = block.att.inner
        for handle in handles:
            handle.remove()
    result = {"logits": logits.detach()}
    for i in range(len(model.blocks)):
        result |= {f"att_out.{i}": store[f"att_out.{i}"].detach(), f"block_out.{i}": store[f"block_out.{i}"].detach(),
                   f"grad_att_in.{i}": store[f"att_in.{i}"].grad, f"grad_att_out.{i}": store[f"att_out.{i}"].grad}
    for name, p in model.named_parameters():
        if p.grad is not None:  # the reference's layer-0 v0/v1/v2 take no part
            canonical = model.canonical_name(name)
            result["grad." + canonical] = to_canonical(p.grad, model.native_name(canonical)[1])
    return {name: t.detach().double().cpu() for name, t in result.items()}


def per_layer_grad_errors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], n_layer: int) -> list[float]:
    """Relative error of all of a layer's time-mix parameter gradients together, each tensor scaled to unit norm."""
    errors = []
    for i in range(n_layer):
        names = [n for n in got if n.startswith(f"grad.blocks.{i}.att.") and n in want]
        errors.append(rel_err(torch.cat([got[n].flatten() / want[n].norm() for n in names]),
                              torch.cat([want[n].flatten() / want[n].norm() for n in names])))
    return errors


# --- comparison ---------------------------------------------------------------------------------------------


def describe(name: str) -> tuple[str, int | None, str]:
    """A capture key -> (quantity, layer or None, tensor name)."""
    if name.startswith("grad."):
        tensor = name[len("grad."):]
        match = re.match(r"blocks\.(\d+)\.", tensor)
        return "param_grad", int(match.group(1)) if match else None, tensor
    quantity, _, layer = name.partition(".")
    return quantity, int(layer) if layer else None, name


def compare(runs: dict[str, dict[str, torch.Tensor]], n_layer: int) -> pd.DataFrame:
    """Tidy table: quantity, layer, tensor, pair ('a_vs_b', ...), rel_err, for the tensors both runs of a pair hold."""
    rows = []
    for x, y in PAIRS:
        got, want = runs[x], runs[y]
        for name in (n for n in want if n in got):
            quantity, layer, tensor = describe(name)
            rows.append({"quantity": quantity, "layer": layer, "tensor": tensor, "pair": f"{x}_vs_{y}",
                         "rel_err": rel_err(got[name], want[name])})
        for layer, error in enumerate(per_layer_grad_errors(got, want, n_layer)):
            rows.append({"quantity": "att_param_grads", "layer": layer, "tensor": f"blocks.{layer}.att.*",
                         "pair": f"{x}_vs_{y}", "rel_err": error})
    frame = pd.DataFrame(rows)
    frame["layer"] = frame["layer"].astype("Int64")
    return frame


# --- running ------------------------------------------------------------------------------------------------


def resolve_device(requested: str) -> str:
    if not requested:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise HarnessError("device=cuda but no CUDA GPU is visible; use device=cpu (with impls that run on the CPU)")
    return requested


def resolve_dtype(impl: Implementation, requested: str) -> str:
    if not requested:
        return {torch.bfloat16: "bf16", None: "fp32"}.get(impl.kernel_dtype, "fp32")
    if requested not in DTYPES:
        raise HarnessError(f"unknown dtype {requested!r}; choose one of: {', '.join(DTYPES)}")
    if impl.kernel_dtype is not None and DTYPES[requested] != impl.kernel_dtype:
        raise HarnessError(f"impl={impl.name} runs its kernels in {impl.kernel_dtype} only, not {requested}")
    return requested


@dataclass(frozen=True)
class Arm:
    role: str
    impl: Implementation
    dtype: str

    @property
    def label(self) -> str:
        return f"{self.impl.name} {self.dtype}"


def arms(cfg: ParityConfig, device: str) -> list[Arm]:
    """a, b and the fp64 reference oracle, checked against the device."""
    out = []
    for role, name, dtype in (("a", cfg.impl_a, cfg.dtype_a), ("b", cfg.impl_b, cfg.dtype_b),
                              ("ref", "reference", "fp64")):
        impl = impls.get(name)
        impl.check_device(device)
        out.append(Arm(role, impl, resolve_dtype(impl, dtype)))
    return out


def run_parity(cfg: ParityConfig) -> tuple[pd.DataFrame, list[Arm]]:
    """Build the three models on shared weights, capture each, compare; the tidy table and the arms."""
    device = resolve_device(cfg.device)
    selected = arms(cfg, device)
    model_cfg = ModelConfig(n_layer=cfg.n_layer, n_embd=cfg.n_embd, head_size=cfg.head_size,
                            vocab_size=cfg.vocab, ctx_len=cfg.T)
    state = shared_weights(RWKV(impls.get("reference"), model_cfg), cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    idx, targets = (torch.randint(0, cfg.vocab, (cfg.B, cfg.T), generator=g).to(device) for _ in range(2))
    runs = {}
    for arm in selected:
        model = RWKV(arm.impl, model_cfg)
        model.load_canonical_state_dict(state)
        runs[arm.role] = capture(model.to(device=device, dtype=DTYPES[arm.dtype]), idx, targets)
        del model
    return compare(runs, cfg.n_layer), selected


def with_context(table: pd.DataFrame, cfg: ParityConfig, selected: list[Arm], device: str) -> pd.DataFrame:
    """The tidy table with who was compared, on what, and the environment, as columns."""
    by_role = {arm.role: arm for arm in selected}
    env = with_environment({}, environment())
    pair_labels = {f"{x}_vs_{y}": (by_role[x].label, by_role[y].label) for x, y in PAIRS}
    return table.assign(
        x=[pair_labels[p][0] for p in table["pair"]], y=[pair_labels[p][1] for p in table["pair"]],
        n_layer=cfg.n_layer, n_embd=cfg.n_embd, head_size=cfg.head_size, vocab=cfg.vocab, T=cfg.T, B=cfg.B,
        seed=cfg.seed, device=device,
        **{k: env[k] for k in ("gpu", "torch", "triton", "fla", "git_commit", "git_dirty")})


# --- outputs ------------------------------------------------------------------------------------------------


def _wide(table: pd.DataFrame, quantities: tuple[str, ...]) -> pd.DataFrame:
    part = table[table["quantity"].isin(quantities)]
    wide = part.pivot_table(index=["layer", "quantity", "tensor"], columns="pair", values="rel_err",
                            aggfunc="first", dropna=False).reset_index()
    return wide.dropna(subset=[c for c in wide.columns if c.endswith(("_vs_b", "_vs_ref"))], how="all")


def markdown(table: pd.DataFrame, selected: list[Arm]) -> str:
    """Per-layer summary, then every parameter gradient, as markdown tables."""
    first = table.iloc[0]

    def render(frame: pd.DataFrame, columns: list[str]) -> str:
        return markdown_table(frame[columns].map(_cell).rename(columns=lambda c: c.replace("_vs_", " vs ")))

    pairs = [f"{x}_vs_{y}" for x, y in PAIRS]
    layers = _wide(table, LAYER_QUANTITIES).sort_values(["layer", "quantity"])
    params = _wide(table, ("param_grad",))
    model = _wide(table, ("logits",))
    return "\n\n".join([
        f"# Parity: {roles_legend(selected)}",
        f"L{first['n_layer']}-D{first['n_embd']} head {first['head_size']}, vocab {first['vocab']}, "
        f"B={first['B']} T={first['T']}, seed {first['seed']}, device {first['gpu'] or first['device']}, "
        f"torch {first['torch']}, commit {str(first['git_commit'])[:8]}. Weights: init=shared plus a seeded "
        "bf16 perturbation (so zero-initialised matrices carry signal). Cells: ||x - y|| / ||y||.",
        "## Per layer",
        render(layers, ["layer", "quantity", *pairs]),
        "## Logits",
        render(model, pairs),
        "## Parameter gradients (canonical RWKV-LM names)",
        render(params, ["tensor", *pairs]),
    ]) + "\n"


def roles_legend(selected: list[Arm]) -> str:
    """'a = fla bf16, b = rwkv_jit bf16, ref = reference fp64 (oracle)'."""
    return ", ".join(f"{arm.role} = {arm.label}" for arm in selected) + " (oracle)"


def _cell(value: object) -> str:
    if value is None or value is pd.NA or (isinstance(value, float) and np.isnan(value)):
        return "–"
    return f"{value:.2e}" if isinstance(value, float) else str(value)


def plot(table: pd.DataFrame, selected: list[Arm], path: Path) -> None:
    """One panel per layer quantity: grouped bars per layer, one bar per pair, log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(LAYER_QUANTITIES), figsize=(3.6 * len(LAYER_QUANTITIES), 3.4), sharey=True)
    width = 0.8 / len(PAIRS)
    for ax, quantity in zip(axes, LAYER_QUANTITIES, strict=True):
        part = table[table["quantity"] == quantity]
        for j, (x, y) in enumerate(PAIRS):
            bars = part[part["pair"] == f"{x}_vs_{y}"].sort_values("layer")
            ax.bar(bars["layer"].to_numpy(dtype=float) + (j - 1) * width, bars["rel_err"].clip(lower=PLOT_FLOOR),
                   width, label=f"{x} vs {y}", color=plt.get_cmap("tab10")(j))
        ax.set_yscale("log")
        ax.set_title(quantity, fontsize=9)
        ax.set_xlabel("layer")
        ax.set_xticks(sorted(part["layer"].dropna().unique()))
        ax.grid(alpha=0.3, axis="y", which="both")
    axes[0].set_ylabel(f"||x - y|| / ||y|| (floor {PLOT_FLOOR:g})")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=len(PAIRS), fontsize=8)
    fig.suptitle(f"Per-layer parity, {roles_legend(selected)}", fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_figure(fig, path)
    plt.close(fig)


def write_outputs(table: pd.DataFrame, selected: list[Arm], out_dir: Path) -> list[Path]:
    """``<stem>.csv``, ``<stem>.md``, ``<stem>.png`` under ``out_dir`` (an earlier report of the same pair is kept: this
    one takes ``<stem>-2``, ...); returns their paths."""
    by_role = {arm.role: arm for arm in selected}
    stem = f"{by_role['a'].impl.name}-{by_role['a'].dtype}_vs_{by_role['b'].impl.name}-{by_role['b'].dtype}"
    paths = claim_new_paths(out_dir, stem, ("csv", "md", "png"))
    table.to_csv(paths[0], index=False, lineterminator="\n")
    paths[1].write_text(markdown(table, selected))
    plot(table, selected, paths[2])
    return paths

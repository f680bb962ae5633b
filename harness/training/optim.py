"""Optimizer parameter groups and RWKV-LM's learning-rate schedule (spec §5.2-5.3).

Groups are assigned by parameter *role*, found through each implementation's canonical (RWKV-LM) names, so
every implementation gets the same recipe: 2x lr and no weight decay for the decay bias ``w0``; weight decay only
on the embedding, head, r/k/v/o and FFN matrices; everything else 1x without decay.
``grouping="by_name"`` instead applies RWKV-LM's name rules to each implementation's own names, which is what the
published RWKV-vs-FLA comparison did (under FLA names w0 loses its 2x lr and the LoRA matrices gain weight decay).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal

import torch

from harness.model.rwkv import RWKV

Grouping = Literal["by_role", "by_name"]
GROUP_LR_SCALE = {"lr2x": 2.0, "decay": 1.0, "plain": 1.0}

_DECAYED = re.compile(r"^(emb\.weight|head\.weight|blocks\.\d+\.att\.(receptance|key|value|output)\.weight"
                      r"|blocks\.\d+\.ffn\.(key|value)\.weight)$")


def role_of(canonical_name: str) -> str:
    """Optimizer role of a parameter from its RWKV-LM name: 'lr2x', 'decay' or 'plain'."""
    if re.fullmatch(r"blocks\.\d+\.att\.w0", canonical_name):
        return "lr2x"
    if _DECAYED.match(canonical_name):
        return "decay"
    return "plain"


def rwkv_lm_name_rule(name: str, param: torch.Tensor) -> str:
    """RWKV-LM's configure_optimizers rule, applied to whatever the parameter is called."""
    if "att.w0" in name:
        return "lr2x"
    if len(param.squeeze().shape) >= 2 and ".weight" in name:
        return "decay"
    return "plain"


def param_groups(model: RWKV, weight_decay: float, grouping: Grouping = "by_role") -> list[dict]:
    """Param groups with ``name``, ``my_lr_scale``, ``weight_decay`` and the parameter names they hold."""
    if grouping not in ("by_role", "by_name"):
        raise ValueError(f"optim.grouping must be by_role or by_name, got {grouping!r}")
    members: dict[str, list[tuple[str, torch.nn.Parameter]]] = {g: [] for g in GROUP_LR_SCALE}
    for name, param in sorted(model.named_parameters()):
        if grouping == "by_role":
            group = role_of(model.canonical_name(name))
        else:
            group = rwkv_lm_name_rule(name, param)
        if group == "decay" and weight_decay <= 0:
            group = "plain"
        members[group].append((name, param))
    return [
        {"name": group, "params": [p for _, p in entries], "param_names": [n for n, _ in entries],
         "my_lr_scale": GROUP_LR_SCALE[group], "weight_decay": weight_decay if group == "decay" else 0.0}
        for group, entries in members.items() if entries
    ]


def describe_groups(groups: list[dict], model: RWKV) -> dict[str, dict]:
    """JSON-friendly summary for run.json: per group its lr scale, weight decay and canonical members."""
    return {
        g["name"]: {"lr_scale": g["my_lr_scale"], "weight_decay": g["weight_decay"],
                    "tensors": len(g["params"]), "numel": sum(p.numel() for p in g["params"]),
                    "canonical_names": [model.canonical_name(n) for n in g["param_names"]]}
        for g in groups
    }


@dataclass(frozen=True)
class LRSchedule:
    """Warm-up from 1% over ``warmup_steps``, then cosine by tokens from lr_init to lr_final at ``exit_tokens``."""

    lr_init: float
    lr_final: float
    warmup_steps: int
    tokens_per_step: int
    exit_tokens: int

    def __call__(self, step: int) -> float:
        w, tps = self.warmup_steps, self.tokens_per_step
        denominator = self.exit_tokens - w * tps
        progress = 1.0 if denominator <= 0 else (step * tps - w * tps) / denominator
        progress = min(max(progress, 0.0), 1.0)
        ratio = self.lr_final / self.lr_init
        lr = self.lr_init * ((0.5 + ratio / 2) + (0.5 - ratio / 2) * math.cos(math.pi * progress))
        if step < w:
            lr *= 0.01 + 0.99 * step / w
        return lr


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("my_lr_scale", 1.0)

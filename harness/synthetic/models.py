"""The models of the comparison, each matched to the RWKV model's parameter count (within 10%, tests/test_synthetic.py):

* ``rwkv``: :class:`harness.model.rwkv.RWKV` with ``impls.get("reference")`` (the pure-PyTorch time-mix; its WKV is
  the sequential loop with an analytic backward), initialised as RWKV-LM does (:func:`harness.model.init.apply_init`,
  ``shared``, drawn from the run's seed); L2 D32 head size 16 at vocab 64 is 46,400 parameters, the RWKV-7 shape
  closest to the article's "~50K" that :class:`~harness.model.rwkv.ModelConfig` allows (n_embd a multiple of 32,
  at least 2 layers; 3 layers are 67,488);
* ``transformer``: :class:`harness.model.baselines.CausalTransformer` (pre-LN GPT blocks, rotary positions, SDPA,
  tanh-GELU MLP), same depth, width, head size and vocabulary, MLP width from
  :func:`~harness.model.baselines.matched_mlp_width` (256: 45,376 parameters), as the decoding benchmark builds it;
* ``lstm``: :class:`harness.model.baselines.LSTMLM` (``nn.LSTM``) with one layer, its width matched to the
  parameters (:func:`matched_lstm_width`: 68, 46,240 parameters): the usual LSTM language model;
* ``lstm_deep``: the decoding benchmark's LSTM, RWKV's width with the depth matched
  (:func:`~harness.model.baselines.matched_lstm_layers`: 5 layers of 32, 46,336 parameters). Five stacked layers of
  32 without residuals hardly train in 50 epochs at lr 1e-3 (results/synthetic-article3/summary.md), which is why
  ``lstm`` is the LSTM of the comparison and this one an extra row.

The baselines keep PyTorch's constructor init, drawn after ``torch.manual_seed(seed)``. Their modules are used as
they are: the forward passes the decoding benchmark wraps (``CausalTransformer.forward``, ``LSTMLM.forward``) are the
ordinary parallel training forwards."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

import impls
from harness.errors import HarnessError
from harness.model.baselines import LSTMLM, CausalTransformer, lstm_params, matched_lstm_layers, matched_mlp_width
from harness.model.init import apply_init
from harness.model.rwkv import RWKV, ModelConfig, count_parameters

MODELS = ("rwkv", "transformer", "lstm", "lstm_deep")
COMPARED = MODELS[:3]  # the article's three


@dataclass(frozen=True)
class Shape:
    n_layer: int
    n_embd: int
    head_size: int
    vocab: int
    ctx_len: int

    def rwkv_config(self) -> ModelConfig:
        """The RWKV shape; one line for one :class:`ModelConfig` refuses."""
        if min(self.n_embd, self.head_size, self.vocab) < 1:
            raise HarnessError("n_embd, head_size and vocab must be at least 1")
        try:
            return ModelConfig(n_layer=self.n_layer, n_embd=self.n_embd, head_size=self.head_size,
                               vocab_size=self.vocab, ctx_len=self.ctx_len)
        except ValueError as exc:
            raise HarnessError(str(exc)) from None


def rwkv_parameters(shape: Shape) -> int:
    """Parameters of the RWKV model of ``shape``: the target the baselines are matched to."""
    return count_parameters(RWKV(impls.get("reference"), shape.rwkv_config()))


def matched_lstm_width(target: int, vocab: int, layers: int = 1) -> int:
    """The width of an ``layers``-layer :class:`LSTMLM` whose parameters come closest to ``target``."""
    return min(range(1, 4097), key=lambda width: abs(lstm_params(vocab, layers, width) - target))


def build(name: str, shape: Shape, seed: int) -> nn.Module:
    """Model ``name`` of ``shape``, in fp32, its initial weights drawn from ``seed``."""
    if name not in MODELS:
        raise HarnessError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    target = rwkv_parameters(shape)
    torch.manual_seed(seed)
    if name == "rwkv":
        model = RWKV(impls.get("reference"), shape.rwkv_config())
        apply_init(model, "shared", seed)
        return model
    if name == "transformer":
        width = matched_mlp_width(target, shape.vocab, shape.n_layer, shape.n_embd)
        return CausalTransformer(shape.vocab, shape.n_layer, shape.n_embd, shape.head_size, width)
    if name == "lstm":
        return LSTMLM(shape.vocab, 1, matched_lstm_width(target, shape.vocab))
    return LSTMLM(shape.vocab, matched_lstm_layers(target, shape.vocab, shape.n_embd), shape.n_embd)


def logits(model: nn.Module, idx: torch.Tensor) -> torch.Tensor:
    """Logits (B, T, V) at every position, whichever of the three models (the LSTM also returns its state)."""
    out = model(idx)
    return out[0] if isinstance(out, tuple) else out


def describe(model: nn.Module) -> dict[str, object]:
    """What run records keep of a model: its class, parameter count and the size its matching chose."""
    info: dict[str, object] = {"class": type(model).__name__, "params": count_parameters(model)}
    if isinstance(model, CausalTransformer):
        info |= {"layers": len(model.blocks), "mlp_width": model.blocks[0].fc.out_features}
    elif isinstance(model, LSTMLM):
        info |= {"layers": model.lstm.num_layers, "hidden": model.lstm.hidden_size}
    elif isinstance(model, RWKV):
        info |= {"layers": model.cfg.n_layer, "n_embd": model.cfg.n_embd, "head_size": model.cfg.head_size}
    return info

"""harness.parity: the reference in fp32 against itself in fp64 (CPU), the CLI's outputs and errors; on a GPU,
fla against rwkv_jit with the fp64 oracle."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
from helpers import assert_one_line_user_error, perturb

import impls
from harness.bench import parity
from harness.bench.cli import main as bench_main
from harness.model.init import rwkv_lm_state_dict
from harness.model.rwkv import RWKV, ModelConfig
from impls.base import LAYER0_UNUSED

SMALL = dict(n_layer=3, n_embd=64, head_size=32, vocab=97, T=16, B=2, device="cpu")


def test_reference_fp32_matches_fp64_at_every_layer_and_gradient() -> None:
    cfg = parity.ParityConfig(impl_a="reference", impl_b="reference", dtype_a="fp32", dtype_b="fp64", **SMALL)
    table, arms = parity.run_parity(cfg)
    assert [arm.label for arm in arms] == ["reference fp32", "reference fp64", "reference fp64"]
    a_vs_b = table[table["pair"] == "a_vs_b"]
    assert (a_vs_b["rel_err"] < 1e-5).all(), a_vs_b.nlargest(3, "rel_err")
    assert (a_vs_b["rel_err"] > 0).all()  # fp32 really ran in fp32
    assert (table[table["pair"] == "b_vs_ref"]["rel_err"] == 0).all()
    for quantity in parity.LAYER_QUANTITIES:
        assert set(a_vs_b[a_vs_b["quantity"] == quantity]["layer"]) == {0, 1, 2}, quantity
    model = RWKV(impls.get("reference"), ModelConfig(n_layer=3, n_embd=64, head_size=32, vocab_size=97))
    used = set(model.canonical_state_dict()) - {f"blocks.0.att.{name}" for name in LAYER0_UNUSED}
    assert set(a_vs_b[a_vs_b["quantity"] == "param_grad"]["tensor"]) == used
    assert set(table["pair"]) == {"a_vs_b", "a_vs_ref", "b_vs_ref"} and "logits" in set(table["quantity"])


def test_perturbation_gives_every_matrix_signal_in_bf16() -> None:
    state = rwkv_lm_state_dict(2, 64, 32, 97, seed=0)
    perturbed = perturb(state, seed=1)
    assert torch.count_nonzero(state["blocks.1.att.output.weight"]) == 0
    for name, tensor in perturbed.items():
        assert torch.count_nonzero(tensor) > 0, name
        assert torch.equal(tensor, tensor.bfloat16().float()), name
    assert torch.equal(perturb(state, seed=1)["head.weight"], perturbed["head.weight"])


def test_cli_writes_csv_markdown_and_figure(tmp_path: Path, capsys) -> None:
    words = ["impl_a=reference", "impl_b=reference", "dtype_b=fp64", "n_layer=2", "n_embd=64", "head_size=32",
             "vocab=50", "T=8", "B=1", "device=cpu", f"out={tmp_path}"]
    bench_main(["parity", *words])
    stem = tmp_path / "reference-fp32_vs_reference-fp64"
    frame = pd.read_csv(stem.with_suffix(".csv"))
    assert {"quantity", "layer", "tensor", "pair", "rel_err", "x", "y", "T", "B", "device", "torch",
            "git_commit"} <= set(frame.columns)
    assert set(frame[frame["pair"] == "a_vs_b"]["x"]) == {"reference fp32"}
    markdown = stem.with_suffix(".md").read_text()
    assert markdown.startswith("# Parity: a = reference fp32, b = reference fp64, ref = reference fp64 (oracle)")
    assert "| layer | quantity | a vs b | a vs ref | b vs ref |" in markdown and "blocks.1.att.w0" in markdown
    figure = stem.with_suffix(".png").read_bytes()
    assert figure.startswith(b"\x89PNG")
    assert "## Per layer" in capsys.readouterr().out
    bench_main(["parity", *words])  # a second report never replaces the first
    again = tmp_path / "reference-fp32_vs_reference-fp64-2"
    assert stem.with_suffix(".png").read_bytes() == figure
    assert again.with_suffix(".png").read_bytes() == figure  # fixed metadata, deterministic on the CPU
    assert again.with_suffix(".csv").exists() and again.with_suffix(".md").exists()


@pytest.mark.parametrize(("words", "message"), [
    (["impl_a=rwkv", "impl_b=reference", "device=cpu"], "impl 'rwkv' needs a CUDA GPU and runs here on cpu"),
    (["impl_a=reference", "impl_b=reference", "dtype_a=fp16", "device=cpu"], "unknown dtype 'fp16'"),
    (["impl_a=nope", "impl_b=reference", "device=cpu"], "unknown impl 'nope'"),
])
def test_user_errors_are_one_line(words: list[str], message: str, tmp_path: Path, capsys) -> None:
    assert_one_line_user_error(lambda: bench_main(["parity", *words, f"out={tmp_path}"]), message, capsys)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_cuda_device_without_gpu_is_a_user_error(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit):
        bench_main(["parity", "impl_a=reference", "impl_b=reference", "device=cuda", f"out={tmp_path}"])
    assert "no CUDA GPU is visible" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.filterwarnings("ignore:According to Bo")
def test_fla_and_rwkv_jit_agree_with_the_oracle_on_gpu(tmp_path: Path) -> None:
    """bf16 ports of one function: per-layer errors are bf16-rounding sized (~1e-2), not O(1) as a formula or
    name-mapping mistake would be."""
    pytest.importorskip("fla.layers")
    cfg = parity.ParityConfig(impl_a="fla", impl_b="rwkv_jit", n_layer=2, n_embd=256, T=64, B=2, device="cuda",
                              out=str(tmp_path))
    table, arms = parity.run_parity(cfg)
    print(parity.markdown(parity.with_context(table, cfg, arms, "cuda"), arms).split("\n## Parameter")[0])
    layers = table[table["quantity"].isin(parity.LAYER_QUANTITIES)]
    assert set(layers["layer"]) == {0, 1}
    # results/parity/fla_vs_reference_h100.log: up to ~6e-2 against an fp32 oracle (layer-0 parameter gradients)
    bounds = layers["pair"].map({"a_vs_ref": 0.1, "b_vs_ref": 0.1, "a_vs_b": 0.2})
    assert (layers["rel_err"] < bounds).all(), layers[layers["rel_err"] >= bounds]
    params = table[table["quantity"] == "param_grad"]
    assert set(params[params["pair"] == "a_vs_b"]["tensor"]) >= {"blocks.1.att.w0", "blocks.0.att.key.weight"}

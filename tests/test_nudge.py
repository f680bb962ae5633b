"""The init's one-ulp nudge (``init.nudge_ulp``, :class:`harness.model.init.Nudge`): exactly K elements one ulp up in
the dtype the parameter trains in, the same elements for the same seed, recorded in run.json and named in the run
id, and a curve key of the report (a nudged twin is never a seed of its unnudged arm)."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import FLA, assert_process_user_error, needs_fla, run_module
from report_runs import write_run

import impls
from harness.errors import HarnessError
from harness.model.init import Nudge, apply_init, nudge_weights, training_dtype
from harness.model.rwkv import RWKV, ModelConfig
from harness.report.arms import form_arms
from harness.report.load import load_runs

pytestmark = pytest.mark.filterwarnings("ignore:According to Bo")

SMALL_MODEL = ModelConfig(n_layer=2, n_embd=64, head_size=32, vocab_size=300)


def shared_model(impl: str = "reference", seed: int = 3) -> RWKV:
    model = RWKV(impls.get(impl) if impl != "fla" else FLA, SMALL_MODEL)
    apply_init(model, "shared", seed)
    return model


def canonical_copy(model: RWKV) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in model.canonical_state_dict().items()}  # not views of the model


def nudged_elements(before: torch.Tensor, after: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The flat indices where ``after`` differs from ``before`` as stored in ``dtype``, after checking that each such
    element is exactly one ulp above its value there."""
    old, new = before.reshape(-1).to(dtype), after.reshape(-1).to(dtype)
    moved = torch.nonzero(old != new).flatten()
    assert torch.equal(new[moved], torch.nextafter(old[moved], torch.full_like(old[moved], torch.inf)))
    return moved


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_nudge_moves_exactly_k_elements_one_ulp_in_the_training_dtype(dtype: torch.dtype) -> None:
    model = shared_model()
    before = canonical_copy(model)
    record = nudge_weights(model, Nudge(elements=5, parameter="head.weight", seed=7), dtype)
    after = model.canonical_state_dict()
    moved = nudged_elements(before["head.weight"], after["head.weight"], dtype)
    assert len(moved) == 5 and moved.tolist() == record["indices"]
    assert record["dtype"] == str(dtype).removeprefix("torch.")
    assert all(torch.equal(after[name], before[name]) for name in before if name != "head.weight")


def test_the_same_seed_nudges_the_same_elements_and_another_seed_others() -> None:
    def indices(seed: int) -> list[int]:
        return nudge_weights(shared_model(), Nudge(8, "blocks.1.ffn.key.weight", seed), torch.bfloat16)["indices"]

    assert indices(0) == indices(0)
    assert indices(0) != indices(1)


@needs_fla
def test_a_transposed_parameter_is_nudged_at_the_same_canonical_elements_in_every_impl() -> None:
    nudge = Nudge(6, "blocks.1.att.w1", seed=2)  # FLA stores w1 transposed (w_lora.lora.0.weight)
    moved = {}
    for impl in ("reference", "fla"):
        model = shared_model(impl)
        before = canonical_copy(model)["blocks.1.att.w1"]
        nudge_weights(model, nudge, torch.bfloat16)
        moved[impl] = nudged_elements(before, model.canonical_state_dict()["blocks.1.att.w1"], torch.bfloat16)
    assert len(moved["fla"]) == 6 and torch.equal(moved["fla"], moved["reference"])


@pytest.mark.parametrize("nudge,dtype,message", [
    (Nudge(1, "head.bias"), torch.float32, "init.nudge_param=head.bias is no parameter"),
    (Nudge(1, "blocks.0.att.nonsense"), torch.float32, "is no parameter"),
    (Nudge(64 * 300 + 1, "head.weight"), torch.float32, "exceeds the 19200 elements"),
    (Nudge(1, "head.weight"), torch.float64, "cannot be written into the torch.float32 parameter"),
])
def test_a_nudge_the_model_cannot_take_is_one_line(nudge: Nudge, dtype: torch.dtype, message: str) -> None:
    with pytest.raises(HarnessError, match=message):
        nudge_weights(shared_model(), nudge, dtype)


@pytest.mark.parametrize("precision,strategy,dtype", [
    ("bf16-true", "single_device", torch.bfloat16), ("bf16-mixed", "deepspeed_stage_2", torch.bfloat16),
    ("bf16-mixed", "single_device", torch.float32), ("16-true", "auto", torch.float16),
    ("32-true", "auto", torch.float32), ("64-true", "auto", torch.float64),
])
def test_the_nudge_is_one_ulp_of_the_dtype_the_weights_train_in(precision: str, strategy: str,
                                                                 dtype: torch.dtype) -> None:
    assert training_dtype(precision, strategy) == dtype


@pytest.mark.slow
def test_a_nudged_run_lives_beside_its_twin_on_the_same_init_and_records_its_nudge(tmp_path) -> None:
    results = tmp_path / "results"
    args = [f"results_dir={results}", "impl=reference", "model=tiny", "model.n_embd=64", "model.head_size=32",
            "model.ctx_len=32", "bsz=2", "trainer.max_steps=3", "trainer.ckpt_every=0", "trainer.num_workers=0"]
    for nudge in ([], ["init.nudge_ulp=3", "init.nudge_seed=5"]):
        proc = run_module("harness.run", *args, *nudge)
        assert proc.returncode == 0, proc.stderr
    experiment = results / "tiny-sample"
    plain = json.loads((experiment / "reference-shared-bsz2-seed0" / "run.json").read_text())["init"]
    nudged = json.loads((experiment / "reference-shared-nudge3s5-bsz2-seed0" / "run.json").read_text())["init"]
    assert "nudge" not in plain and nudged["sha256"] == plain["sha256"]  # one shared init file, loaded unnudged
    assert nudged["nudge"]["parameter"] == "head.weight" and nudged["nudge"]["dtype"] == "float32"
    assert len(nudged["nudge"]["indices"]) == 3 and nudged["nudge"]["seed"] == 5


def test_a_negative_nudge_is_one_line(tmp_path) -> None:
    proc = run_module("harness.run", f"results_dir={tmp_path}", "impl=reference", "model=tiny", "init.nudge_ulp=-1")
    assert_process_user_error(proc, "init.nudge_ulp must be zero or more, got -1")


def test_a_nudged_run_is_its_own_arm_not_a_seed_of_the_plain_one(tmp_path) -> None:
    write_run(tmp_path, "reference-shared-bsz4-seed0")
    write_run(tmp_path, "reference-shared-nudge4s0-bsz4-seed0", loss_shift=0.01, timestamp="2026-01-02T00:00:00+00:00",
              init__nudge_ulp=4, init__nudge_param="head.weight", init__nudge_seed=0)
    arms = form_arms(load_runs(tmp_path))
    assert arms.left_out.empty and not arms.warnings
    nudges = arms.steps.drop_duplicates("run_id").set_index("run_id")["nudge"]
    assert nudges.to_dict() == {"reference-shared-bsz4-seed0": "none",
                                "reference-shared-nudge4s0-bsz4-seed0": "4 ulp of head.weight, seed 0"}

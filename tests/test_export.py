"""Trained weights leave the harness: a run keeps its final checkpoint, and ``python -m harness.convert`` exports a
run directory (or its checkpoint: Lightning's file on a CPU, DeepSpeed's directory on GPUs) to RWKV-LM ``.pth``, an
FLA directory and a harness ``.safetensors``; RWKV-LM files as Lightning / DeepSpeed save them convert too."""

import json
import shutil
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from helpers import assert_process_user_error, assert_user_error, needs_fla, run_module
from safetensors.torch import load_file

import impls
from harness.convert.cli import main
from harness.model.checkpoint import load_checkpoint, load_model_state
from harness.model.init import rwkv_lm_state_dict
from harness.model.rwkv import RWKV, ModelConfig
from impls.base import LAYER0_UNUSED

STEPS = 3
LAYER0_UNUSED_NAMES = {f"blocks.0.att.{n}" for n in LAYER0_UNUSED}

pytestmark = pytest.mark.filterwarnings("ignore:According to Bo")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """The README's quick start, 3 steps: ckpt_every (200) does not divide max_steps."""
    results = tmp_path_factory.mktemp("results")
    proc = run_module("harness.run", "impl=reference", "model=tiny", "trainer=cpu", f"trainer.max_steps={STEPS}",
                      f"results_dir={results}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return results / "tiny-sample" / "reference-shared-bsz4-seed0"


def lightning_checkpoint(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / f"step-{STEPS}.ckpt", map_location="cpu", weights_only=True)


def trained_state(run_dir: Path) -> dict[str, torch.Tensor]:
    """The trained model's own parameters, read straight from Lightning's checkpoint (LitRWKV holds it as model)."""
    return {k.removeprefix("model."): v for k, v in lightning_checkpoint(run_dir)["state_dict"].items()}


def model_config(run_dir: Path) -> ModelConfig:
    model = json.loads((run_dir / "run.json").read_text())["config"]["model"]
    return ModelConfig(**{k: v for k, v in model.items() if k != "name"})


def convert(*args: object) -> int:
    return main([str(a) for a in args])


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], skip: set[str] = frozenset()) -> None:
    assert set(a) - skip == set(b) - skip
    for name in set(a) - skip:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


def logits(model: RWKV) -> torch.Tensor:
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model.eval()(tokens)


def reference_model(cfg: ModelConfig) -> RWKV:
    return RWKV(impls.get("reference"), cfg)


def assert_refused(code: int, capsys, fragment: str) -> None:
    captured = capsys.readouterr()
    assert captured.out == ""
    assert_user_error(code, captured.err, fragment)


def test_a_completed_run_keeps_its_final_weights(run_dir):
    record = json.loads((run_dir / "checkpoints" / "last.json").read_text())
    assert record == {"step": STEPS, "path": f"step-{STEPS}.ckpt"}
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["last.json", f"step-{STEPS}.ckpt"]
    assert lightning_checkpoint(run_dir)["global_step"] == STEPS
    last_row = (run_dir / "steps.csv").read_text().splitlines()[-1].split(",")
    assert float(last_row[-1]) > 0, "the final write is timed apart, on the last step's row"


def test_run_exports_to_rwkv_lm_fla_and_harness_with_the_trained_weights(run_dir, tmp_path, capsys):
    assert convert(run_dir, tmp_path / "out.pth", "--to", "rwkv-lm") == 0
    assert convert(run_dir, tmp_path / "out_dir", "--to", "fla") == 0
    assert convert(run_dir, tmp_path / "out.safetensors", "--to", "harness") == 0
    out = capsys.readouterr().out
    assert f"read step-{STEPS}.ckpt of run {run_dir.name} (impl reference, Lightning checkpoint, float32)" in out

    trained = trained_state(run_dir)
    exported = load_checkpoint(tmp_path / "out.safetensors")
    assert (exported.impl, exported.config, exported.extra) == ("reference", model_config(run_dir), {"step": STEPS})
    assert_same(exported.state, trained)

    the_trained_model = reference_model(model_config(run_dir))
    the_trained_model.load_state_dict(trained, strict=True)
    from_harness = reference_model(model_config(run_dir))
    load_model_state(from_harness, tmp_path / "out.safetensors")
    from_pth = reference_model(model_config(run_dir))
    from_pth.load_canonical_state_dict(torch.load(tmp_path / "out.pth", weights_only=True))
    expected = logits(the_trained_model)
    assert torch.equal(logits(from_harness), expected)
    assert torch.equal(logits(from_pth), expected)

    assert (tmp_path / "out_dir" / "config.json").is_file()
    assert convert(tmp_path / "out_dir", tmp_path / "back.pth") == 0
    assert_same(torch.load(tmp_path / "back.pth", weights_only=True),
                torch.load(tmp_path / "out.pth", weights_only=True), skip=LAYER0_UNUSED_NAMES)


def test_the_checkpoint_path_exports_like_its_run(run_dir, tmp_path):
    checkpoint = run_dir / "checkpoints" / f"step-{STEPS}.ckpt"
    for name in ("via-run.pth", "via-ckpt.pth"):
        assert convert(run_dir if name == "via-run.pth" else checkpoint, tmp_path / name) == 0
    assert_same(torch.load(tmp_path / "via-run.pth", weights_only=True),
                torch.load(tmp_path / "via-ckpt.pth", weights_only=True))
    assert convert(checkpoint, tmp_path / "out.safetensors") == 0
    assert_same(load_checkpoint(tmp_path / "out.safetensors").state, trained_state(run_dir))


@needs_fla
def test_the_fla_export_loads_with_from_pretrained(run_dir, tmp_path):
    from fla.models import RWKV7ForCausalLM

    assert convert(run_dir, tmp_path / "out_dir", "--to", "fla") == 0
    model = RWKV7ForCausalLM.from_pretrained(tmp_path / "out_dir")
    written = load_file(str(tmp_path / "out_dir" / "model.safetensors"))
    assert_same(model.state_dict(), written)
    trained = trained_state(run_dir)
    assert torch.equal(written["model.layers.1.attn.w_lora.lora.0.weight"], trained["blocks.1.att.w1"].t())
    assert torch.equal(written["lm_head.weight"], trained["head.weight"])


def test_an_fla_run_exports_through_fla_names_without_fla(run_dir, tmp_path):
    """run.json names the impl whose parameter names the checkpoint holds; fla's name map needs no fla import."""
    assert convert(run_dir, tmp_path / "reference.pth") == 0
    assert convert(tmp_path / "reference.pth", tmp_path / "fla.safetensors", "--impl", "fla") == 0
    fla_state = load_checkpoint(tmp_path / "fla.safetensors").state
    assert "blocks.1.att.w_lora.lora.0.weight" in fla_state
    fla_run = tmp_path / "fla-run"
    (fla_run / "checkpoints").mkdir(parents=True)
    record = json.loads((run_dir / "run.json").read_text())
    record["config"]["impl"] = {"name": "fla", "fuse_norm": False}
    record["impl"] = {"name": "fla", "flags": {"fuse_norm": False}}
    (fla_run / "run.json").write_text(json.dumps(record))
    torch.save({**lightning_checkpoint(run_dir), "state_dict": {f"model.{k}": v for k, v in fla_state.items()}},
               fla_run / "checkpoints" / f"step-{STEPS}.ckpt")
    shutil.copy(run_dir / "checkpoints" / "last.json", fla_run / "checkpoints" / "last.json")
    assert convert(fla_run, tmp_path / "out.pth") == 0
    assert_same(torch.load(tmp_path / "out.pth", weights_only=True),
                torch.load(tmp_path / "reference.pth", weights_only=True), skip=LAYER0_UNUSED_NAMES)
    assert convert(fla_run, tmp_path / "out.safetensors") == 0
    exported = load_checkpoint(tmp_path / "out.safetensors")
    assert (exported.impl, exported.impl_flags) == ("fla", {"fuse_norm": False})
    assert_same(exported.state, fla_state)


# --- DeepSpeed: Lightning's DeepSpeedStrategy on GPUs saves step-N.ckpt/ as a directory ----------------------------


def write_deepspeed_checkpoint(lightning: dict, dst: Path, prefix: str, dtype: torch.dtype) -> None:
    """The layout DeepSpeed 0.19 writes for Lightning 2.6 under ZeRO-2 (built here: DeepSpeed trains on CUDA only).

    ``DeepSpeedStrategy.save_checkpoint`` drops state_dict and optimizer_states from Lightning's checkpoint and passes
    the rest as client_state to ``DeepSpeedEngine.save_checkpoint(dst, tag="checkpoint")``: ``_save_checkpoint``
    writes ``_common_checkpoint_state`` (module = the LightningModule's state dict in the engine's dtype) updated by
    client_state to ``checkpoint/mp_rank_00_model_states.pt``; ``_save_zero_checkpoint`` writes the optimizer shard
    ``checkpoint/[bf16_]zero_pp_rank_0_mp_rank_00_optim_states.pt`` and copies zero_to_fp32.py / zero_to_torch.py;
    ``save_checkpoint`` writes the tag into ``latest``."""
    weights = lightning["state_dict"].items()
    module = OrderedDict((f"{prefix}{k.removeprefix('model.')}", v.to(dtype)) for k, v in weights)
    bf16 = dtype == torch.bfloat16
    ds_config = {"zero_optimization": {"stage": 2, "contiguous_gradients": True, "overlap_comm": False},
                 "bf16": {"enabled": bf16}, "train_micro_batch_size_per_gpu": 4, "gradient_clipping": 1.0,
                 "zero_allow_untested_optimizer": True, "timers": {"throughput": {"enabled": False}}}
    client_state = {k: v for k, v in lightning.items() if k not in ("state_dict", "optimizer_states")}
    model_states = dict(
        module=module, buffer_names=[], optimizer=None,
        param_shapes=[OrderedDict((k, v.shape) for k, v in module.items())],
        frozen_param_shapes=OrderedDict(), shared_params={}, frozen_param_fragments=OrderedDict(),
        lr_scheduler=None, data_sampler=None, random_ltd=None, skipped_steps=0, global_steps=STEPS,
        global_samples=STEPS * 4, dp_world_size=1, mp_world_size=1,
        checkpoint_parallel_dimensions={"pp_degree": 1, "tp_degree": 1}, ds_config=ds_config, ds_version="0.19.8",
        **client_state)
    flat = torch.cat([v.float().flatten() for v in module.values()])
    optim_states = dict(optimizer_state_dict={"loss_scaler": None, "dynamic_loss_scale": False, "overflow": False,
                                              "clip_grad": 1.0, "base_optimizer_state": {},
                                              "single_partition_of_fp32_groups": [flat], "zero_stage": 2,
                                              "group_paddings": [0], "partition_count": [1], "ds_version": "0.19.8"},
                        ds_config=ds_config, ds_version="0.19.8")
    (dst / "checkpoint").mkdir(parents=True)
    torch.save(model_states, dst / "checkpoint" / "mp_rank_00_model_states.pt")
    torch.save(optim_states, dst / "checkpoint" / f"{'bf16_' if bf16 else ''}zero_pp_rank_0_mp_rank_00_optim_states.pt")
    (dst / "latest").write_text("checkpoint")
    for script in ("zero_to_fp32.py", "zero_to_torch.py"):
        (dst / script).write_text("# DeepSpeed's recovery script\n")


def deepspeed_run(run_dir: Path, dst: Path, prefix: str, dtype: torch.dtype) -> Path:
    """A copy of the run whose checkpoint is DeepSpeed's directory instead of Lightning's file."""
    (dst / "checkpoints").mkdir(parents=True)
    shutil.copy(run_dir / "run.json", dst / "run.json")
    shutil.copy(run_dir / "checkpoints" / "last.json", dst / "checkpoints" / "last.json")
    write_deepspeed_checkpoint(lightning_checkpoint(run_dir), dst / "checkpoints" / f"step-{STEPS}.ckpt", prefix,
                               dtype)
    return dst


@pytest.mark.parametrize("prefix", ["model.", "_forward_module.model."])  # lightning >= 2.1, and before
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_deepspeed_checkpoint_directory_exports(run_dir, tmp_path, capsys, prefix, dtype):
    ds_run = deepspeed_run(run_dir, tmp_path / "ds-run", prefix, dtype)
    trained = {k: v.to(dtype) for k, v in trained_state(run_dir).items()}
    assert convert(ds_run, tmp_path / "out.safetensors") == 0
    assert "DeepSpeed checkpoint (checkpoint/mp_rank_00_model_states.pt)" in capsys.readouterr().out
    assert_same(load_checkpoint(tmp_path / "out.safetensors").state, trained)
    assert convert(ds_run / "checkpoints" / f"step-{STEPS}.ckpt", tmp_path / "out.pth") == 0
    from_pth = reference_model(model_config(run_dir)).to(dtype)
    from_pth.load_canonical_state_dict(torch.load(tmp_path / "out.pth", weights_only=True))
    assert_same(from_pth.state_dict(), trained)
    assert convert(ds_run, tmp_path / "out_dir", "--to", "fla") == 0
    assert {t.dtype for t in load_file(str(tmp_path / "out_dir" / "model.safetensors")).values()} == {dtype}


def test_zero3_checkpoint_is_refused_in_one_line(run_dir, tmp_path, capsys):
    ds_run = deepspeed_run(run_dir, tmp_path / "ds-run", "model.", torch.bfloat16)
    tag = ds_run / "checkpoints" / f"step-{STEPS}.ckpt" / "checkpoint"
    (tag / "mp_rank_00_model_states.pt").rename(tag / "zero_pp_rank_0_mp_rank_00_model_states.pt")
    assert_refused(convert(ds_run, tmp_path / "out.pth"), capsys, "ZeRO-3 checkpoint")
    assert not (tmp_path / "out.pth").exists()


# --- RWKV-LM weights as Lightning / DeepSpeed save them ------------------------------------------------------------


def rwkv_lm_weights() -> dict[str, torch.Tensor]:
    return rwkv_lm_state_dict(2, 128, 64, 1000, seed=1)


def prefixed(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in state.items()}


@pytest.mark.parametrize("layout", [
    lambda s: prefixed(s, "model."),
    lambda s: prefixed(s, "_forward_module."),
    lambda s: {"epoch": 0, "global_step": 10, "state_dict": prefixed(s, "model."), "optimizer_states": [{}],
               "loops": {"fit_loop": {}}, "callbacks": {}, "lr_schedulers": []},
    lambda s: {"module": prefixed(s, "module."), "buffer_names": [], "global_steps": 10, "ds_version": "0.19.8"},
    lambda s: {"module": prefixed(s, "_forward_module.model."), "optimizer": None, "param_shapes": None},
], ids=["model.", "_forward_module.", "lightning", "deepspeed-module.", "deepspeed-lightning-2.0"])
def test_nested_and_prefixed_rwkv_lm_files_convert(tmp_path, layout):
    state = rwkv_lm_weights()
    torch.save(layout(state), tmp_path / "in.ckpt")
    assert convert(tmp_path / "in.ckpt", tmp_path / "out.pth") == 0
    assert_same(torch.load(tmp_path / "out.pth", weights_only=True), state)


def test_an_rwkv_lm_deepspeed_directory_converts(tmp_path):
    state = rwkv_lm_weights()
    write_deepspeed_checkpoint({"state_dict": prefixed(state, "model."), "epoch": 0}, tmp_path / "rwkv.ckpt", "",
                               torch.float32)
    assert convert(tmp_path / "rwkv.ckpt", tmp_path / "out.pth") == 0
    assert_same(torch.load(tmp_path / "out.pth", weights_only=True), state)


class NotATensor:
    pass


@pytest.mark.parametrize("payload, fragment", [
    ({"model_state": {"emb.weight": torch.zeros(2)}, "optimizer_states": [], "epoch": 1},
     "found a dict with keys model_state, optimizer_states, epoch and no tensors at the top"),
    ({"state_dict": {"epoch": 3}, "optimizer_states": []}, "found a dict with keys epoch and no tensors at the top "
                                                           "under state_dict"),
    ({"emb.weight": torch.zeros(2), "step": 3}, "found a dict with tensors and 1 other entries (step)"),
    ([torch.zeros(2)], "found a list"),
    ({"emb.weight": NotATensor()}, "holds a test_export.NotATensor object, which torch's safe loader"),
], ids=["unknown-nesting", "empty-state-dict", "mixed", "list", "unsafe-object"])
def test_unknown_layouts_are_refused_in_one_line_and_exit_2(tmp_path, capsys, payload, fragment):
    torch.save(payload, tmp_path / "in.pth")
    assert_refused(convert(tmp_path / "in.pth", tmp_path / "out.pth"), capsys, fragment)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.pth"]


def test_the_cli_refuses_an_unknown_layout_without_a_traceback(tmp_path):
    torch.save({"weights": {"emb.weight": torch.zeros(2)}, "epoch": 1}, tmp_path / "in.ckpt")
    proc = run_module("harness.convert", tmp_path / "in.ckpt", tmp_path / "out_dir", "--to", "fla")
    assert_process_user_error(proc, f"{tmp_path / 'in.ckpt'} holds no name -> tensor state dict (looked at the top "
                                    "and under state_dict or module): found a dict with keys weights, epoch and no "
                                    "tensors at the top")
    assert proc.stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.ckpt"]


def test_a_run_without_a_checkpoint_is_refused_in_one_line(run_dir, tmp_path, capsys):
    shutil.copy(run_dir / "run.json", tmp_path / "run.json")
    assert_refused(convert(tmp_path, tmp_path / "out.pth"), capsys,
                   "has no complete checkpoint (no checkpoints/last.json)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json"]

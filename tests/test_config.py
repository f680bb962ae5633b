"""One config system for every command line (harness/config.py): Hydra configs under conf/, overrides checked
before anything runs (a misspelled key, a value of the wrong type, a bad list element or group option is one
``error:`` line, exit code 2, nothing written), the benchmarks' older list syntax and the typed dataclasses."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import assert_one_line_user_error, assert_process_user_error, run_module

from harness.bench import decoding, parity, step, wkv_op
from harness.bench.cli import bench_config, main
from harness.config import CONF_DIR, check_overrides, compose_config
from harness.errors import HarnessError
from harness.run import check_command_line

BENCH_CONFIGS = [("step", step.StepConfig), ("kernels", wkv_op.KernelBenchConfig),
                 ("inference", decoding.InferenceConfig), ("parity", parity.ParityConfig)]


@pytest.mark.parametrize(("name", "cls"), BENCH_CONFIGS)
def test_bench_yaml_defaults_are_the_dataclass_defaults(name: str, cls: type) -> None:
    assert bench_config(name, [], cls) == cls()


def test_quick_kernels_config_narrows_the_grid_only() -> None:
    quick = bench_config("kernels_quick", [], wkv_op.KernelBenchConfig)
    full = wkv_op.KernelBenchConfig()
    assert (quick.T, quick.B, quick.H, quick.acc_T, quick.name) == ((256, 1024), (2,), (4,), 1024, "kernels_quick")
    assert (quick.kernels, quick.modes, quick.N, quick.device) == (full.kernels, full.modes, full.N, full.device)


@pytest.mark.parametrize("words", [["T=256,1024", "kernels=reference"], ["T=[256,1024]", "kernels=[reference]"]])
def test_lists_take_the_plain_and_the_hydra_syntax(words: list[str]) -> None:
    cfg = bench_config("kernels", words, wkv_op.KernelBenchConfig)
    assert cfg.T == (256, 1024) and cfg.kernels == ("reference",)


def test_valid_overrides_reach_the_dataclass_in_its_types() -> None:
    cfg = bench_config("kernels", ["max_call_s=1", "budget_s=2.5", "resume=true", "N=32", "name=2024", "B=4"],
                       wkv_op.KernelBenchConfig)
    assert cfg.max_call_s == 1.0 and isinstance(cfg.max_call_s, float) and cfg.budget_s == 2.5
    assert cfg.resume is True and cfg.N == 32 and cfg.name == "2024" and cfg.B == (4,)
    assert bench_config("kernels", ["resume=false"], wkv_op.KernelBenchConfig).resume is False
    inference = bench_config("inference", ["lengths=8,16", "models=rwkv", "dtype=fp32"], decoding.InferenceConfig)
    assert (inference.lengths, inference.models, inference.dtype) == ((8, 16), ("rwkv",), "fp32")
    assert bench_config("parity", ["dtype_a=", "device=cpu"], parity.ParityConfig).dtype_a == ""


def test_an_empty_mapping_takes_new_keys_with_a_plus(capsys: pytest.CaptureFixture) -> None:
    words = ["impl=rwkv_lm", "+impl_options.path=rwkv/train_temp", "+impl_options.jit=true", "+impl_options.kernel=''"]
    cfg = bench_config("step", words, step.StepConfig)
    assert cfg.impl_options == {"path": "rwkv/train_temp", "jit": True, "kernel": ""}
    assert_one_line_user_error(lambda: main(["step", "impl_options.jit=true"]),
                               "impl_options is empty; add its keys with +: +impl_options.jit=true", capsys)


# (command, misspelled key, mistyped value, bad list element or a scalar key given several values): each
# with the fragment its one-line error names.
BENCH_ERRORS = [
    ("step", "batchsize=3", "unknown key 'batchsize'"),
    ("step", "bsz=1.5", "bsz expects an int, got 1.5"),
    ("step", "bsz=1,2", "'bsz=1,2' gives several values"),
    ("step", "lr=fast", "lr expects a number, got 'fast'"),
    ("kernels", "kernel=cuda", "did you mean kernels?"),
    ("kernels", "resume=maybe", "resume expects a bool (true or false), got 'maybe'"),
    ("kernels", "T=256,abc", "T expects a list of ints, got 'abc'"),
    ("kernels", "T=[256,", "cannot parse 'T=[256,'"),
    ("inference", "lenghts=8", "did you mean lengths?"),
    ("inference", "graphs=yes", "graphs expects an int, got 'yes'"),
    ("inference", "batches=[1,x]", "batches expects a list of ints, got 'x'"),
    ("parity", "impla=fla", "unknown key 'impla'"),
    ("parity", "T=abc", "T expects an int, got 'abc'"),
    ("parity", "n_layer=[2,3]", "n_layer expects an int, got [2, 3]"),
    ("parity", "+extra=1", "none can be added"),
]


@pytest.mark.parametrize(("command", "word", "message"), BENCH_ERRORS)
def test_bench_overrides_are_checked_in_one_line(command: str, word: str, message: str, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    assert_one_line_user_error(lambda: main([command, "device=cpu", word, f"out={out}"]), message, capsys)
    assert not out.exists()


def test_quick_kernels_overrides_are_checked(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert_one_line_user_error(lambda: main(["kernels", "--quick", "H=4,x", f"out={tmp_path}/out"]),
                               "H expects a list of ints, got 'x'", capsys)


@pytest.mark.parametrize(("command", "word", "message"), [
    ("step", "n_layer=1", "n_layer must be at least 2"),
    ("step", "n_layer=0", "n_layer must be at least 2"),
    ("step", "bsz=-3", "bsz must be at least 1, got -3"),
    ("step", "n_embd=100", "n_embd 100 must be a multiple of 32 and of head_size 64"),
    ("step", "head_size=0", "head_size must be at least 1"),
    ("parity", "B=0", "B must be at least 1"),
    ("inference", "n_embd=96", "n_embd 96 must be a multiple of 32 and of head_size 64"),
])
def test_model_shapes_that_cannot_be_built_are_one_line(command: str, word: str, message: str, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    assert_one_line_user_error(lambda: main([command, "device=cpu", word, f"out={out}"]), message, capsys)
    assert not out.exists()


# --- harness.run -------------------------------------------------------------------------------------------------


def test_run_overrides_are_checked_against_the_selected_groups() -> None:
    check_overrides("config", ["impl=fla", "impl.fuse_norm=true", "model=tiny", "optim.betas=[0.9,0.95]",
                               "optim.exit_tokens=1000", "optim.lr_init=1", "trainer.precision=16"])
    with pytest.raises(HarnessError, match="unknown key 'impl.fuse_norm'"):
        check_overrides("config", ["impl=reference", "impl.fuse_norm=true"])
    with pytest.raises(HarnessError, match="unknown key 'impl.fuse_norm'"):  # every combination of a sweep
        check_overrides("config", ["impl=fla,reference", "impl.fuse_norm=true"], multirun=True)


def test_run_sweeps_are_checked_value_by_value(tmp_path: Path) -> None:
    check_command_line(["-m", "impl=reference", "model=tiny", "init=shared,native", "trainer.max_steps=10,20",
                        "seed=range(2)", f"results_dir={tmp_path}"])  # each job planned too: a model that fits
    with pytest.raises(HarnessError, match="gives several values"):
        check_command_line(["impl=reference", "init=shared,native"])  # a sweep needs -m
    with pytest.raises(HarnessError, match="unknown init 'nope'"):
        check_command_line(["-m", "init=shared,nope"])
    with pytest.raises(HarnessError, match="trainer.max_steps expects an int, got 'abc'"):
        check_command_line(["-m", "trainer.max_steps=10,abc"])


@pytest.mark.parametrize(("args", "message"), [
    (["trainer.max_step=10"], "unknown key 'trainer.max_step'; did you mean trainer.max_steps?"),
    (["model.ctx_len=abc"], "model.ctx_len expects an int, got 'abc'"),
    (["optim.betas=[0.9,abc]"], "optim.betas expects a list of numbers, got 'abc'"),
    (["-m", "impl=reference", "init=shared,native", "overwrite=maybe"], "overwrite expects a bool"),
])
def test_run_bad_overrides_are_one_line_and_write_nothing(args: list[str], message: str, tmp_path: Path) -> None:
    results = tmp_path / "results"
    flags = [arg for arg in args if arg.startswith("-")]  # Hydra takes its flags before the overrides
    overrides = [arg for arg in args if not arg.startswith("-")]
    proc = run_module("harness.run", *flags, f"results_dir={results}", *overrides, timeout=120)
    assert_process_user_error(proc, message)
    assert not results.exists()


def test_bench_configs_are_no_groups_of_the_training_config() -> None:
    """The step benchmark's ``impl`` key would read as the ``impl`` config group if conf/ were its search path."""
    assert (CONF_DIR / "impl").is_dir() and (CONF_DIR / "bench" / "step.yaml").is_file()
    assert bench_config("step", ["impl=fla"], step.StepConfig).impl == "fla"


@pytest.mark.parametrize("overrides, experiment", [
    ([], "L12-D768-sample"),
    (["data.path=data/mine"], "L12-D768-mine"),
    (["data.path=/somewhere/else/mine.bin"], "L12-D768-mine"),
    (["model=tiny", "data.path=data/mine"], "tiny-mine"),
    (["data=corpus"], "L12-D768-corpus"),
    (["data.path=data/mine", "data.name=ours"], "L12-D768-ours"),
])
def test_a_run_on_own_data_is_named_after_its_path(overrides, experiment):
    """Not ``sample``: a run on data.path=data/mine would otherwise share the quick start's experiment folder."""
    assert compose_config("config", overrides).experiment == experiment

"""impl=rwkv_lm: a user's own RWKV-LM checkout through the harness, on CPUs against the fixture checkout
tests/fixtures/rwkv_lm_checkout (a pure-PyTorch stand-in with RWKV-LM's interface, written from the spec apart from the
harness, no CUDA; tests/test_golden.py holds it, through the adapter, against RWKV-LM's own values).

What needs the GPU (HEAD's and dc6c3ec's kernels, their parallel build) runs in scripts/device/step_grid.sh."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import REPO, assert_process_user_error, run_module

import impls
from harness.bench import step
from harness.model.rwkv import RWKV, ModelConfig, lm_loss
from impls import rwkv_lm

FIXTURE = REPO / "tests" / "fixtures" / "rwkv_lm_checkout" / "RWKV-v7" / "train_temp"
MODEL = ModelConfig(n_layer=2, n_embd=64, head_size=32, vocab_size=100, ctx_len=16)
TINY = ["model=tiny", "model.n_embd=64", "model.head_size=32", "model.ctx_len=32", "bsz=2", "trainer=cpu"]
DOUBLED_LOSS = """
_own_loss = l2wrap_cross_entropy


def l2wrap_cross_entropy(logits, targets):
    return 2 * _own_loss(logits, targets)
"""


def fixture_impl(**options) -> impls.Implementation:
    return impls.get("rwkv_lm", **{"path": str(FIXTURE), "head_size": MODEL.head_size, **options})


def checkout_module(impl: impls.Implementation):
    return sys.modules[type(RWKV(impl, MODEL).blocks[0].att).__module__]


def copy_checkout(tmp_path: Path, extra_source: str = "") -> Path:
    """The fixture checkout copied into tmp_path, with ``extra_source`` appended to its src/model.py."""
    folder = tmp_path / "RWKV-LM" / "RWKV-v7" / "train_temp"
    shutil.copytree(FIXTURE, folder)
    model_py = folder / "src" / "model.py"
    model_py.write_text(model_py.read_text() + extra_source)
    return folder


def training_losses(results: Path, run_id: str, *args: str) -> list[float]:
    """Train with ``args`` into ``results``; the per-step losses of the run, which must be named ``run_id``."""
    proc = run_module("harness.run", f"results_dir={results}", *TINY, *args, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (steps,) = results.glob(f"*/{run_id}/steps.csv")
    return [float(line.split(",")[2]) for line in steps.read_text().strip().splitlines()[1:]]


# --- training through python -m harness.run -----------------------------------------------------------------------


@pytest.mark.slow
def test_the_checkout_trains_like_reference_from_the_shared_init_and_with_its_own_loss(tmp_path):
    results = tmp_path / "results"
    reference = training_losses(results, "reference-shared-bsz2-seed0", "impl=reference", "trainer.max_steps=2")
    checkout = training_losses(results, "rwkv_lm-shared-bsz2-seed0", "impl=rwkv_lm",
                               f"impl.path={FIXTURE.relative_to(REPO)}", "trainer.max_steps=2")
    assert checkout == pytest.approx(reference, rel=1e-6, abs=1e-6)  # same math, same init file, same batches
    (run_json,) = results.glob("*/rwkv_lm-shared-bsz2-seed0/run.json")
    impl = json.loads(run_json.read_text())["impl"]
    assert impl["flags"]["path"] == str(FIXTURE) and impl["flags"]["loss"] == "l2wrap_cross_entropy"
    assert impl["flags"]["kernel"] == "@rwkv3" and impl["flags"]["jit"] is True

    # the trainer minimises the checkout's loss: a checkout whose loss is twice the cross-entropy logs twice it
    doubled = copy_checkout(tmp_path, DOUBLED_LOSS)
    (first,) = training_losses(results, "rwkv_lm-doubled-shared-bsz2-seed0", "impl=rwkv_lm", f"impl.path={doubled}",
                               "impl.label=doubled", "trainer.max_steps=1")
    assert first == pytest.approx(2 * reference[0], rel=1e-6)


@pytest.mark.parametrize("args, message", [
    (["impl=rwkv_lm"], "impl=rwkv_lm needs the checkout: impl.path="),
    (["impl=rwkv_lm", "impl.path=tests"], "has no src/model.py"),
])
def test_a_checkout_that_is_not_there_is_one_line_and_exit_2(tmp_path, args, message):
    results = tmp_path / "results"
    proc = run_module("harness.run", f"results_dir={results}", *TINY, *args, timeout=300)
    assert_process_user_error(proc, message)
    assert not results.exists()


# --- what the checkout lacks: one line each ------------------------------------------------------------------------


CPU = "HARNESS_CPU_FIXTURE = True\n"
TMIX = "class RWKV_Tmix_x070:\n    pass\n"
CMIX = "class RWKV_CMix_x070:\n    pass\n"


@pytest.mark.parametrize("source, cuda_dir, message", [
    (CPU + TMIX + CMIX, False, "has no cuda/ folder"),
    ("def broken(:\n", True, "does not parse as Python"),
    (CPU + CMIX, True, "defines no class RWKV_Tmix_x070"),
    (CPU + TMIX, True, "defines no class RWKV_CMix_x070"),
    (CPU + "class RWKV_Tmix_x060:\n    pass\n" + CMIX, True, "defines RWKV_Tmix_x060, not RWKV_Tmix_x070"),
    (CPU + TMIX + CMIX + "import module_the_checkout_needs\n", True,
     "needs the Python module 'module_the_checkout_needs'"),
    (CPU + TMIX + CMIX + "raise RuntimeError('Error building extension wkv\\nninja: build stopped')\n", True,
     "failed: RuntimeError at model.py line 6: raise RuntimeError("),
    (CPU + "HEAD_SIZE = 32\nassert HEAD_SIZE == 64\n" + TMIX + CMIX, True,
     "failed: AssertionError at model.py line 3: assert HEAD_SIZE == 64"),
    (CPU + CMIX + "class RWKV_Tmix_x070(__import__('torch').nn.Module):\n    def __init__(self, args, layer_id):\n"
     "        super().__init__()\n", True, "does not hold RWKV-LM's parameters: missing ['a0', 'a1',"),
])
def test_a_checkout_lacking_what_the_adapter_needs_is_one_line(tmp_path, source, cuda_dir, message):
    folder = tmp_path / "train_temp"
    (folder / "src").mkdir(parents=True)
    (folder / "src" / "model.py").write_text(source)
    if cuda_dir:
        (folder / "cuda").mkdir()
    with pytest.raises(impls.ImplementationError) as info:
        RWKV(impls.get("rwkv_lm", path=str(folder), head_size=MODEL.head_size), MODEL)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_the_repository_root_is_pointed_to_its_train_temp(tmp_path):
    root = copy_checkout(tmp_path).parents[1]
    with pytest.raises(impls.ImplementationError, match=r"did you mean impl.path=.*RWKV-v7/train_temp\?"):
        impls.get("rwkv_lm", path=str(root))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_a_real_checkout_needs_a_gpu_before_anything_is_built(tmp_path):
    folder = copy_checkout(tmp_path)
    model_py = folder / "src" / "model.py"
    model_py.write_text(model_py.read_text().replace(rwkv_lm.CPU_FIXTURE_MARKER + " = True", "", 1))
    with pytest.raises(impls.ImplementationError, match="needs a CUDA GPU; none is available"):
        impls.get("rwkv_lm", path=str(folder))


# --- importing the checkout -------------------------------------------------------------------------------------------


def test_the_import_sees_the_options_and_the_checkout_as_cwd_then_both_are_restored(monkeypatch):
    monkeypatch.setenv("RWKV_KERNEL", "what the user had")
    monkeypatch.delenv("RWKV_JIT_ON", raising=False)
    cwd = os.getcwd()
    module = checkout_module(fixture_impl(kernel="", jit=False))
    assert (module.MY_TESTING, module.KERNEL, module.JIT_ON, module.HEAD_SIZE, module.HEAD_L2WRAP_CE_CHUNK) == \
        ("x070", "", "0", MODEL.head_size, 0)
    assert module.IMPORT_CWD == str(FIXTURE) and module.CUDA_FILES == ["README.md"]
    assert os.getcwd() == cwd
    assert os.environ["RWKV_KERNEL"] == "what the user had" and "RWKV_JIT_ON" not in os.environ


def test_one_module_per_path_kernel_and_jit():
    same = [checkout_module(fixture_impl(kernel="@rwkv3", jit=True)) for _ in range(2)]
    assert same[0] is same[1]
    others = {checkout_module(fixture_impl(kernel="", jit=True)), checkout_module(fixture_impl(jit=False))}
    assert len(others | {same[0]}) == 3


def test_the_model_holds_the_checkouts_modules_under_canonical_names():
    """What the checkout computes is held against RWKV-LM's own values in tests/test_golden.py."""
    impl = fixture_impl(label="mine")
    model, reference = RWKV(impl, MODEL), RWKV(impls.get("reference"), MODEL)
    module = sys.modules[type(model.blocks[1].att).__module__]
    assert isinstance(model.blocks[1].att, module.RWKV_Tmix_x070)
    assert isinstance(model.blocks[1].ffn, module.RWKV_CMix_x070)
    assert {name: t.shape for name, t in model.canonical_state_dict().items()} == \
        {name: t.shape for name, t in reference.canonical_state_dict().items()}
    assert impl.name == "rwkv_lm-mine" and impl.needs_cuda is False and impl.loss is module.l2wrap_cross_entropy


def test_the_git_commit_of_a_checkout_is_recorded_only_where_git_tracks_it(tmp_path):
    folder = copy_checkout(tmp_path)
    assert (fixture_impl(path=str(folder)).flags["git_commit"], fixture_impl(path=str(folder)).flags["git_dirty"]) \
        == (None, None)

    def git(*args: str) -> str:
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(folder.parents[1]),
                               *args], check=True, capture_output=True, text=True).stdout.strip()

    git("init", "-q")
    assert fixture_impl(path=str(folder)).flags["git_commit"] is None  # in a work tree, but not tracked by it
    git("add", ".")
    git("commit", "-q", "-m", "checkout")
    flags = fixture_impl(path=str(folder)).flags
    assert (flags["git_commit"], flags["git_dirty"]) == (git("rev-parse", "HEAD"), False)
    (folder / "src" / "model.py").write_text((folder / "src" / "model.py").read_text() + "\n# edited\n")
    assert fixture_impl(path=str(folder)).flags["git_dirty"] is True


# --- the loss hook ----------------------------------------------------------------------------------------------------


def test_lm_loss_computes_the_checkouts_loss_when_it_has_one():
    impl = fixture_impl()
    logits = torch.randn(2, 8, MODEL.vocab_size).to(torch.bfloat16)
    targets = torch.randint(0, MODEL.vocab_size, (2, 8))
    assert lm_loss(logits, targets).dtype == torch.bfloat16  # the harness's: cross-entropy of the bf16 logits
    own = lm_loss(logits, targets, impl)
    assert own.dtype == torch.float32  # the checkout's, as HEAD's fused kernel: an fp32 loss
    assert own == F.cross_entropy(logits.float().reshape(-1, MODEL.vocab_size), targets.reshape(-1))

    def logit_grad(loss_of, scale: float) -> torch.Tensor:
        x = logits.float().requires_grad_()
        (scale * loss_of(x)).backward()
        return x.grad

    harness = logit_grad(lambda x: lm_loss(x, targets), 1.0)
    torch.testing.assert_close(logit_grad(lambda x: lm_loss(x, targets, impl), 1.0), harness)
    # the fused loss scales its L2Wrap term by the incoming gradient, as HEAD's kernel does
    torch.testing.assert_close(logit_grad(lambda x: lm_loss(x, targets, impl), 3.0), 3 * harness)


def test_the_step_bench_builds_the_checkout_and_trains_on_its_loss(tmp_path):
    folder = copy_checkout(tmp_path, DOUBLED_LOSS)
    cfg = step.StepConfig(impl="rwkv_lm", impl_options={"path": str(folder), "head_size": 32, "label": "doubled"},
                          bsz=2, ctx=16, n_layer=2, n_embd=64, head_size=32, vocab=100, device="cpu")
    bench = step.build(cfg)
    assert bench.model.impl.name == "rwkv_lm-doubled"
    with torch.no_grad():
        logits = bench.model(bench.idx).float()
        expected = 2 * F.cross_entropy(logits.reshape(-1, cfg.vocab), bench.targets.reshape(-1))
    assert bench.train_step() == expected


# --- the load() calls, read from the source; building ahead -----------------------------------------------------------


SYNTHETIC_MODEL_PY = '''
import os, torch
from torch.utils.cpp_extension import load
import torch.utils.cpp_extension as cpp_ext

HEAD_SIZE = int(os.environ["RWKV_HEAD_SIZE"])
CHUNK_LEN = 16
flags = ["-res-usage", f"-D_N_={HEAD_SIZE}", f"-D_CHUNK_LEN_={CHUNK_LEN}", "-Xptxas -O3"]
if "@rwkv3" in os.environ["RWKV_KERNEL"]:
    load(name="wkv_v3", sources=["cuda/v3.cu", "cuda/v3.cpp"], is_python_module=False, extra_cuda_cflags=flags)
else:
    load(name="wkv", sources=["cuda/wkv.cu", "cuda/wkv.cpp"], is_python_module=False, extra_cuda_cflags=flags)
OPS = load(name="ops", sources=["cuda/ops.cu"], extra_cflags=["-O3"],
           extra_cuda_cflags=flags + [f"-DHEADS={HEAD_SIZE * 2:04d}", f"-DMODE={os.environ.get('RWKV_JIT_ON')!r}"])
if int(os.environ["RWKV_HEAD_L2WRAP_CE_CHUNK"]) > 0:
    load(name="chunked", sources=["cuda/chunked.cu"])
if torch.cuda.is_available():
    load(name="runtime_branch", sources=["cuda/r.cu"])
def later():
    load(name="inside_a_function", sources=["cuda/f.cu"])
cpp_ext.load("positional", ["cuda/p.cu"], extra_cuda_cflags=[f"-DVERSION={torch.__version__}"])
cpp_ext.load("aliased", ["cuda/a.cu"], verbose=True)
'''


@pytest.mark.parametrize("kernel, first", [("@rwkv3", "wkv_v3"), ("", "wkv")])
def test_load_calls_are_read_from_the_source_with_their_flags(kernel, first):
    environ = rwkv_lm.module_environment(kernel, jit=True, head_size=64)
    calls = rwkv_lm.load_calls(ast.parse(SYNTHETIC_MODEL_PY), environ)
    assert [call.name for call in calls] == [first, "ops", "aliased"]  # a runtime value leaves its call out
    flags = ["-res-usage", "-D_N_=64", "-D_CHUNK_LEN_=16", "-Xptxas -O3"]
    assert calls[0].kwargs == {"name": first, "sources": [f"cuda/{first.replace('wkv_', '')}.cu",
                                                          f"cuda/{first.replace('wkv_', '')}.cpp"],
                               "is_python_module": False, "extra_cuda_cflags": flags}
    assert calls[1].kwargs["extra_cuda_cflags"] == flags + ["-DHEADS=0128", "-DMODE='1'"]
    assert calls[2].args == ("aliased", ["cuda/a.cu"]) and calls[2].kwargs == {"verbose": True}


def test_a_chunked_head_loss_adds_its_extension():
    environ = {**rwkv_lm.module_environment("", jit=True, head_size=64), "RWKV_HEAD_L2WRAP_CE_CHUNK": "4096"}
    names = [call.name for call in rwkv_lm.load_calls(ast.parse(SYNTHETIC_MODEL_PY), environ)]
    assert names == ["wkv", "ops", "chunked", "aliased"]


def test_building_ahead_reports_a_failed_build_instead_of_raising(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "extensions"))
    monkeypatch.chdir(tmp_path)
    calls = [rwkv_lm.LoadCall((), {"name": "absent_sources", "sources": ["cuda/absent.cpp"],
                                   "is_python_module": False})]
    (failure,) = rwkv_lm.build_ahead(calls)
    assert failure.startswith("absent_sources: FileNotFoundError") and "cuda/absent.cpp" in failure


def test_stale_torch_build_locks_are_removed(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "extensions"))
    own_folder = tmp_path / "own_build_dir"
    calls = [rwkv_lm.LoadCall((), {"name": "left_locked", "sources": []}),
             rwkv_lm.LoadCall(("in_own_folder", []), {"build_directory": str(own_folder)})]
    locks = [tmp_path / "extensions" / "left_locked" / "lock", own_folder / "lock"]
    for lock in locks:
        lock.parent.mkdir(parents=True)
        lock.touch()
    rwkv_lm.remove_stale_locks(calls)
    assert not any(lock.exists() for lock in locks)
    assert capsys.readouterr().err.count("left by an interrupted build") == 2

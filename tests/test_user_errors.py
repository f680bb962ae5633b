"""Bad inputs a user meets before training starts, each one ``error:`` line with exit code 2 and nothing written:
token ids outside the model's vocabulary, a results directory that cannot be written, a run too big for the
memory; and a quiet trainer: none of Lightning's chatter around the harness's own lines, a readable speed."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import REPO, assert_process_user_error

import impls
from harness.data import binidx
from harness.data.binidx import BinIdx, DataError, check_token_ids, token_range, write_binidx
from harness.errors import HarnessError
from harness.model.rwkv import RWKV, ModelConfig, count_parameters
from harness.tables import format_throughput
from harness.training.memory import (
    BLOCK_SAVED_VALUES,
    available_memory,
    estimate_training_memory,
    parameter_count,
)

# A very small model so that the subprocess runs stay fast on 2 cores.
SMALL = ["impl=reference", "model=tiny", "model.n_embd=64", "model.head_size=32", "model.ctx_len=32", "bsz=2"]
PEAK_RSS = ("import resource, runpy, sys\n"
            "sys.argv = ['harness.run', *sys.argv[1:]]\n"
            "try:\n"
            "    runpy.run_module('harness.run', run_name='__main__')\n"
            "finally:\n"
            "    print('peak_rss_kib', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n")


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """Each test's token-range cache in its own folder (subprocesses inherit it)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache"


def harness_run(*args: str, timeout: float = 300, script: str | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", script] if script else [sys.executable, "-m", "harness.run"]
    return subprocess.run([*command, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)


def assert_refused(proc: subprocess.CompletedProcess, message: str, results: Path) -> None:
    assert_process_user_error(proc, message)
    assert not results.exists() or not any(results.rglob("*")), f"a refused run wrote {list(results.rglob('*'))}"


def data_with_one_bad_id(prefix: Path, vocab: int, bad_at: int, tokens: int = 200_000) -> None:
    ids = np.random.default_rng(0).integers(0, vocab, tokens).astype(np.uint16)
    ids[bad_at] = vocab + 17
    write_binidx(prefix, np.array_split(ids, 9))


# --- token ids against the vocabulary ------------------------------------------------------------------------------


def test_one_scattered_token_id_beyond_the_vocabulary_is_refused(tmp_path):
    """One bad id deep in the file, which a short run may never sample (on a GPU: a device-side assert mid-run)."""
    data_with_one_bad_id(tmp_path / "scattered", vocab=1000, bad_at=123_457)
    results = tmp_path / "results"
    proc = harness_run(*SMALL, "model.vocab_size=1000", f"data.path={tmp_path / 'scattered'}",
                       "trainer.max_steps=2", f"results_dir={results}")
    assert_refused(proc, "token id 1017 at token 123457", results)
    assert "model.vocab_size" in proc.stderr


def test_the_bundled_sample_is_refused_by_a_smaller_vocabulary(tmp_path):
    results = tmp_path / "results"
    proc = harness_run(*SMALL, "model.vocab_size=1000", "trainer.max_steps=2", f"results_dir={results}")
    assert_refused(proc, "outside the model's vocabulary 0..999", results)


# --- the pinned corpus ---------------------------------------------------------------------------------------------


def plan_for(*overrides: str):
    from hydra import compose, initialize_config_dir

    from harness.training.plan import plan_run

    with initialize_config_dir(version_base=None, config_dir=str(REPO / "conf")):
        return plan_run(compose("config", overrides=list(overrides)))


def test_a_corpus_other_than_the_pinned_one_is_refused_and_sha256_null_lets_it_through(tmp_path):
    prefix = tmp_path / "corpus"
    write_binidx(prefix, np.array_split(np.random.default_rng(0).integers(0, 1000, 200_000).astype(np.uint16), 9))
    results = tmp_path / "results"
    other = [*SMALL, "data=corpus", f"data.path={prefix}", f"results_dir={results}"]
    proc = harness_run(*other, "trainer.max_steps=2")
    assert_refused(proc, "not the 149870477292... that conf/data/corpus.yaml pins", results)
    assert "data.sha256=null" in proc.stderr
    digest = hashlib.sha256(prefix.with_suffix(".bin").read_bytes()).hexdigest()
    assert plan_for(*other, "data.sha256=null").data_sha256 == digest
    assert plan_for(*other, f"data.sha256={digest}").data_sha256 == digest


def build_corpus_module():
    spec = importlib.util.spec_from_file_location("build_corpus", REPO / "scripts" / "build_corpus.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def write_prefix(prefix: Path, content: bytes) -> None:
    for suffix in (".bin", ".idx", ".manifest.json"):
        Path(f"{prefix}{suffix}").write_bytes(content + suffix.encode())


def test_the_corpus_build_replaces_no_different_corpus_and_installs_only_the_pinned_one(tmp_path):
    build_corpus = build_corpus_module()
    built, out = tmp_path / "corpus.building-1", tmp_path / "corpus"
    write_prefix(built, b"new")
    write_prefix(out, b"old")
    digest = hashlib.sha256(b"new.bin").hexdigest()
    with pytest.raises(HarnessError, match="not the pinned 000000000000"):
        build_corpus.install(built, out, pinned="0" * 64)
    with pytest.raises(HarnessError, match="exists and differs from this build; nothing was replaced"):
        build_corpus.install(built, out, pinned=digest)
    assert Path(f"{out}.bin").read_bytes() == b"old.bin" and Path(f"{built}.bin").exists()
    write_prefix(out, b"new")  # an identical corpus is replaced by the same bytes and a fresh manifest
    build_corpus.install(built, out, pinned=digest)
    assert Path(f"{out}.bin").read_bytes() == b"new.bin" and not Path(f"{built}.bin").exists()


def test_the_corpus_build_takes_a_pinned_deb_from_a_folder_and_refuses_another(tmp_path):
    build_corpus = build_corpus_module()
    (tmp_path / "doc_1.0_all.deb").write_bytes(b"other build")
    (tmp_path / "doc_1.0-1_all.deb").write_bytes(b"pinned build")
    pin = build_corpus.Pin("1.0-1", hashlib.sha256(b"pinned build").hexdigest())
    assert build_corpus.local_deb("doc", pin, tmp_path) == tmp_path / "doc_1.0-1_all.deb"
    with pytest.raises(HarnessError, match="pins for doc 1.0-1"):
        build_corpus.check_deb(tmp_path / "doc_1.0_all.deb", "doc", pin)


def test_the_lock_pins_every_package_the_corpus_build_reads():
    build_corpus = build_corpus_module()
    assert sorted(build_corpus.read_pins()) == sorted(source.package for source in build_corpus.SOURCES)
    assert len(build_corpus.pinned_corpus_sha256()) == 64


def test_token_range_is_scanned_once_per_file(tmp_path, monkeypatch):
    data_with_one_bad_id(tmp_path / "d", vocab=1000, bad_at=5)
    assert token_range(BinIdx(tmp_path / "d")) == (0, 1017)

    def no_rescan(tokens):
        raise AssertionError("the .bin was scanned again")

    monkeypatch.setattr(binidx, "_scan_range", no_rescan)
    assert token_range(BinIdx(tmp_path / "d")) == (0, 1017)  # a new BinIdx, as the next run opens it
    monkeypatch.undo()
    write_binidx(tmp_path / "d", [np.arange(50, dtype=np.uint16)])  # rewritten: the cached range no longer holds
    assert token_range(BinIdx(tmp_path / "d")) == (0, 49)


def test_token_range_without_a_writable_cache(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    data_with_one_bad_id(tmp_path / "d", vocab=1000, bad_at=5)
    with pytest.raises(DataError, match="token id 1017 at token 5"):
        check_token_ids(BinIdx(tmp_path / "d"), 1000)
    check_token_ids(BinIdx(tmp_path / "d"), 1018)


def test_negative_token_ids_are_refused(tmp_path):
    write_binidx(tmp_path / "signed", [np.array([3, 4, -2, 5], dtype=np.int16)], dtype=np.int16)
    with pytest.raises(DataError, match=r"token id -2 at token 2, .*ids span -2\.\.5\); use data tokenized for this "
                                        r"vocabulary$"):
        check_token_ids(BinIdx(tmp_path / "signed"), 65536)


def test_a_corpus_sized_scan_takes_about_a_second(tmp_path):
    ids = np.random.default_rng(0).integers(0, 65536, 25_000_000).astype(np.uint16)
    ids[-1] = 65535
    write_binidx(tmp_path / "corpus", [ids])
    start = time.perf_counter()
    assert token_range(BinIdx(tmp_path / "corpus")) == (0, 65535)
    assert time.perf_counter() - start < 5, "25M tokens should scan in about a second"


def test_an_index_pointing_outside_the_bin_is_refused(tmp_path):
    write_binidx(tmp_path / "d", [np.arange(100, dtype=np.uint16), np.arange(10, dtype=np.uint16)])
    raw = bytearray((tmp_path / "d.idx").read_bytes())
    first_pointer = binidx._HEADER.size + 4 * 2
    raw[first_pointer:first_pointer + 8] = np.array([10_000], dtype="<i8").tobytes()  # document 0 beyond the end
    (tmp_path / "d.idx").write_bytes(bytes(raw))
    with pytest.raises(DataError, match="truncated"):
        BinIdx(tmp_path / "d")


# --- a results directory that cannot be written ---------------------------------------------------------------------


def test_results_dir_under_a_file_is_refused(tmp_path):
    """Fails for root too: no folder can be made under a regular file."""
    blocker = tmp_path / "results-file"
    blocker.write_text("keep me\n")
    proc = harness_run(*SMALL, "trainer.max_steps=2", f"results_dir={blocker / 'x'}")
    assert_process_user_error(proc, f"{blocker} is not a directory")
    assert blocker.read_text() == "keep me\n"


def test_read_only_results_dir_is_refused(tmp_path):
    results = tmp_path / "read-only"
    results.mkdir()
    results.chmod(0o500)
    try:
        try:
            (results / "probe").write_text("")
        except PermissionError:
            pass
        else:
            pytest.skip("this user writes into a 0o500 folder (root): see test_results_dir_under_a_file_is_refused")
        proc = harness_run(*SMALL, "trainer.max_steps=2", f"results_dir={results}")
        assert_process_user_error(proc, f"cannot write in {results}")
        assert not list(results.iterdir())
    finally:
        results.chmod(0o700)


# --- memory -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [dict(n_layer=2, n_embd=128),
                                   dict(n_layer=3, n_embd=64, head_size=32, vocab_size=1000),
                                   dict(n_layer=4, n_embd=256, vocab_size=5000)])
def test_parameter_count_from_shapes_matches_the_model(shape):
    cfg = ModelConfig(**shape)
    assert parameter_count(cfg) == count_parameters(RWKV(impls.get("reference"), cfg))


def saved_for_backward_bytes(block: torch.nn.Module, x: torch.Tensor, v_first: torch.Tensor) -> int:
    """Bytes of the activations one block's forward saves for its backward (its parameters not counted)."""
    parameters = {p.untyped_storage().data_ptr() for p in block.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        block(x, v_first)
    return sum(storages.values())


@pytest.mark.parametrize("n_embd, head_size", [(128, 64), (128, 32), (256, 64)])
def test_activation_estimate_matches_what_a_block_saves(n_embd, head_size):
    cfg = ModelConfig(n_layer=2, n_embd=n_embd, head_size=head_size, vocab_size=1000, ctx_len=64)
    model = RWKV(impls.get("reference"), cfg)
    bsz = 2
    x = torch.randn(bsz, cfg.ctx_len, n_embd, requires_grad=True)
    measured = saved_for_backward_bytes(model.blocks[1], x, torch.randn_like(x))
    values = bsz * cfg.ctx_len * n_embd
    assert measured == pytest.approx(BLOCK_SAVED_VALUES * 4 * values, rel=0.05)  # the WKV op saves no state
    # the reference's backward rebuilds one layer's per-step states (head_size x head_size per head, fp32) on top
    estimate = estimate_training_memory(cfg, bsz, "reference", "32-true", "cpu").activations
    assert estimate == pytest.approx(cfg.n_layer * measured + values * head_size * 4, rel=0.05)


@pytest.mark.slow
def test_estimate_is_within_a_factor_two_of_a_tiny_runs_peak_rss(tmp_path):
    args = ["impl=reference", "model=tiny", "bsz=8", "trainer=cpu", "trainer.max_steps=3", "trainer.num_workers=0",
            "trainer.progress_every=0", f"results_dir={tmp_path / 'results'}"]
    proc = harness_run(*args, script=PEAK_RSS, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    peak = int(re.search(r"peak_rss_kib (\d+)", proc.stderr)[1]) * 1024
    cfg = ModelConfig(n_layer=2, n_embd=128, head_size=64, vocab_size=65536, ctx_len=128)
    estimate = estimate_training_memory(cfg, 8, "reference", "32-true", "cpu")
    assert estimate.total - estimate.process > estimate.process, "the run's own terms must dominate the process'"
    assert 0.5 < peak / estimate.total < 2, (peak, estimate)


def test_gpu_estimate_is_within_a_factor_two_of_the_recorded_step_peaks():
    """The step benchmark's GPU peaks (bf16 model and optimizer, torch.cuda.max_memory_allocated) on H100/H200."""
    rows = pd.read_csv(REPO / "results" / "bench" / "step.csv").dropna(subset=["peak_mem_gib"])
    rows = rows[rows["accel"] == "eager"]  # the estimate is the eager step's (a fused loss keeps no logits)
    assert len(rows) >= 4
    for row in rows.itertuples():
        cfg = ModelConfig(n_layer=row.n_layer, n_embd=row.n_embd, vocab_size=row.vocab, ctx_len=row.ctx)
        estimate = estimate_training_memory(cfg, row.bsz, row.impl, "bf16-true", "gpu").total
        assert 0.5 < row.peak_mem_gib * 2**30 / estimate < 2, row


def test_a_run_too_big_for_the_memory_is_one_line(tmp_path):
    results = tmp_path / "results"
    proc = harness_run("impl=reference", "model=tiny", "bsz=100000", "trainer=cpu", f"results_dir={results}")
    assert_refused(proc, "this run needs about", results)
    line = proc.stderr.strip()
    assert re.search(r"needs about [\d.]+ GB of memory \(weights and optimizer [\d.]+ GB, activations [\d.]+ GB, "
                     r"logits [\d.]+ GB, process 0\.5 GB\) and [\d.]+ GB is available \(MemAvailable", line), line
    for hint in ("model=tiny", "smaller bsz", "trainer.grad_cp=true", "trainer.memory_check=false"):
        assert hint in line


def test_the_bare_command_on_a_cpu_is_refused_in_one_line(tmp_path):
    cfg = ModelConfig(n_layer=12, n_embd=768)  # conf/model/L12-D768.yaml at the default bsz 48
    needed = estimate_training_memory(cfg, 48, "reference", "32-true", "cpu").total
    if torch.cuda.is_available() or available_memory("cpu")[0] >= needed:
        pytest.skip("this machine has a GPU or the memory for the published model on its CPU")
    results = tmp_path / "results"
    proc = harness_run(f"results_dir={results}")
    assert_refused(proc, f"needs about {needed / 1e9:.1f} GB of memory", results)


def test_memory_check_false_lets_a_big_run_through_planning(tmp_path):
    from hydra import compose, initialize_config_dir

    from harness.errors import HarnessError
    from harness.training.plan import plan_run

    overrides = ["impl=reference", "model=tiny", "bsz=100000", "trainer=cpu", f"results_dir={tmp_path / 'r'}"]
    with initialize_config_dir(version_base=None, config_dir=str(REPO / "conf")):
        checked = compose("config", overrides=overrides)
        unchecked = compose("config", overrides=[*overrides, "trainer.memory_check=false"])
    with pytest.raises(HarnessError, match="trainer.memory_check=false"):
        plan_run(checked)
    assert plan_run(unchecked).micro_bsz == 100000
    assert not (tmp_path / "r").exists()


def test_two_cpu_processes_need_twice_the_memory():
    from harness.errors import HarnessError
    from harness.training.memory import check_fits

    estimate = estimate_training_memory(ModelConfig(n_layer=2, n_embd=128), 4, "reference", "32-true", "cpu")
    check_fits(estimate, 2, (2 * estimate.total, "test"))
    with pytest.raises(HarnessError, match=r"2 processes of [\d.]+ GB"):
        check_fits(estimate, 2, (2 * estimate.total - 1, "test"))


# --- a quiet trainer ------------------------------------------------------------------------------------------------

LIGHTNING_CHATTER = ("GPU available", "TPU available", "HPU available", "Tip:", "litlogger", "litmodels",
                     "deprecated", "weights_only", "`Trainer.fit` stopped", "LeafSpec", "Epoch 0/-2")


def test_a_quick_run_prints_the_harness_lines_only(tmp_path):
    results = tmp_path / "results"
    proc = harness_run(*SMALL, "trainer.max_steps=4", "trainer.timing_warmup_steps=1", f"results_dir={results}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    output = proc.stdout + proc.stderr
    assert not [line for line in output.splitlines() if any(noise in line for noise in LIGHTNING_CHATTER)], output
    assert proc.stderr.strip() == "", proc.stderr
    done = re.search(r"done: 4 steps, ([\d.]+) (kt/s|tokens/s) over 3 timed steps", proc.stdout)
    assert done and float(done[1]) > 0, proc.stdout
    summary = json.loads(next(results.rglob("run.json")).read_text())["throughput"]
    assert done[0].endswith(f"{format_throughput(summary['kt_per_s'])} over 3 timed steps")


@pytest.mark.parametrize("kt_per_s, shown", [(0.0123, "12.3 tokens/s"), (0.5, "500 tokens/s"), (1.0, "1.00 kt/s"),
                                             (12.345, "12.3 kt/s"), (151.88, "152 kt/s"), (1234.5, "1234 kt/s")])
def test_speed_keeps_three_significant_digits(kt_per_s, shown):
    assert format_throughput(kt_per_s) == shown


# --- one set-up for the README and CI -------------------------------------------------------------------------------


def installed_extras(text: str) -> list[str]:
    return re.findall(r'pip install (?:-q )?-e "\.\[([\w,-]+)\]"', text)


@pytest.mark.parametrize("readme, heading", [("README.md", "## Set-up"), ("README.zh-CN.md", "## 安装")])
def test_readme_set_up_installs_and_runs_what_ci_does(readme, heading):
    text = (REPO / readme).read_text()
    set_up = text[text.index(heading):].split("```bash", 1)[1].split("```")[0]
    ci = (REPO / ".ci" / "run").read_text()
    assert installed_extras(set_up) == installed_extras(ci) == ["test"]
    assert "python -m pytest" in set_up and re.search(r"^python -m pytest\b", ci, re.M)


def test_the_docs_give_the_memory_the_bare_command_is_refused_with(tmp_path, monkeypatch):
    """The training page's figure (docs/training.md, which the README links) for a bare ``python -m harness.run`` on a
    CPU is the one its refusal prints."""
    from harness.config import compose_config
    from harness.training import plan

    monkeypatch.setattr(plan, "available_memory", lambda accelerator, index=0: (1, "test"))
    cfg = compose_config("config", ["trainer.accelerator=cpu", f"results_dir={tmp_path}"])
    with pytest.raises(HarnessError, match="needs about") as refusal:
        plan.plan_run(cfg)
    printed = re.search(r"needs about ([\d.]+ GB) of memory", str(refusal.value))[1]
    readme = re.search(r"a bare `python -m harness.run` \(the published\s+L12-D768 model at bsz 48\) needs\s+about "
                       r"([\d.]+ GB) on a CPU", (REPO / "docs" / "training.md").read_text())
    assert readme and readme[1] == printed, (readme and readme[1], printed)

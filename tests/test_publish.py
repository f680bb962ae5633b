"""Publishing: a user's benchmark rows and training runs land beside the published ones and never rewrite them.

Each test works on a copy of the committed results (results/bench, the top-level figures, results/, the READMEs, as
committed at HEAD: never the user's own results/ or figures/, which a quick start or a report run changes):
the benchmarks append CPU rows to the committed CSVs and draw them into files of their own, and every committed row
and every published table and figure stays byte-identical; the report refreshes the READMEs only with --readme and
keeps the published tables' numbers when a user's CPU run is there."""

from __future__ import annotations

import csv
import io
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from harness.bench import decoding, step, wkv_op
from harness.bench.cli import main as bench_main

pytestmark = pytest.mark.filterwarnings("ignore:According to Bo")

REPO = Path(__file__).resolve().parents[1]
KERNELS_DERIVED = ("results/bench/kernels.md", "figures/kernels.png")
INFERENCE_DERIVED = tuple(f"figures/inference_{name}.png" for name in ("latency", "memory", "prefill"))
TINY_KERNELS = ["kernels=reference", "T=16", "B=1", "H=2", "N=16", "device=cpu"]  # as tests/test_bench_kernels.py
TINY_INFERENCE = ["device=cpu", "dtype=fp32", "impls=reference", "n_layer=2", "n_embd=64", "head_size=32", "vocab=97",
                  "lengths=8", "batches=1", "decode_warmup=1", "decode_tokens=2", "prefill_reps=1"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def committed(root: Path, *paths: str) -> Path:
    """``paths`` as committed at HEAD, extracted under ``root`` (``git archive``)."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", "HEAD", *paths], capture_output=True)
    if archive.returncode != 0:
        pytest.skip(f"needs the repository's git history: {archive.stderr.decode().strip()}")
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(root, filter="data")
    return root


@pytest.fixture
def published(tmp_path: Path) -> Path:
    """A folder with results/bench and the figures as committed."""
    return committed(tmp_path, "results/bench", "figures")


def snapshot(root: Path, names: tuple[str, ...]) -> dict[str, bytes]:
    return {name: (root / name).read_bytes() for name in names}


def appended_rows(path: Path, before: bytes, fields: tuple[str, ...]) -> list[dict[str, str]]:
    """The rows after the committed bytes ``before``, which the file must still start with."""
    after = path.read_bytes()
    assert after.startswith(before), f"{path}: a committed row was rewritten"
    return list(csv.DictReader(io.StringIO(after[len(before):].decode()), fieldnames=fields))


def test_a_cpu_kernel_grid_lands_beside_the_published_h200_grid(published: Path) -> None:
    bench, figures = published / "results" / "bench", published / "figures"
    committed = (bench / "kernels.csv").read_bytes()
    derived = snapshot(published, KERNELS_DERIVED)
    run = ["kernels", *TINY_KERNELS, f"out={bench}", f"figures={figures}"]
    bench_main(run)
    rows = appended_rows(bench / "kernels.csv", committed, wkv_op.FIELDS)
    assert [(r["kernel"], r["mode"], r["T"], r["device"], r["status"]) for r in rows] == [
        ("reference", "fwd", "16", "cpu", "ok"), ("reference", "fwdbwd", "16", "cpu", "ok")]
    assert snapshot(published, KERNELS_DERIVED) == derived  # the H200 table and figure are not touched
    table = (bench / "kernels-cpu-n16.md").read_text()  # the CPU series: its device and the N that differs
    assert "N=16, cpu" in table and "| fwdbwd | 1 | 2 | reference |" in table and "NVIDIA H200" not in table
    assert (figures / "kernels-cpu-n16.png").read_bytes().startswith(PNG_MAGIC)
    with_user_rows = (bench / "kernels.csv").read_bytes()
    bench_main(["kernels", "--plot-only", f"out={bench}", f"figures={figures}"])  # every series from its own rows
    assert snapshot(published, KERNELS_DERIVED) == derived
    bench_main([*run, "resume=true"])  # the CPU rows of this set-up are reused, not measured again
    assert (bench / "kernels.csv").read_bytes() == with_user_rows


def test_a_cpu_decoding_grid_and_op_count_land_beside_the_published_ones(published: Path) -> None:
    bench, figures = published / "results" / "bench", published / "figures"
    committed = {name: (bench / name).read_bytes() for name in ("inference.csv", "inference_ops.csv")}
    derived = snapshot(published, INFERENCE_DERIVED)
    bench_main(["inference", *TINY_INFERENCE, f"out={bench}", f"figures={figures}"])
    rows = appended_rows(bench / "inference.csv", committed["inference.csv"], decoding.FIELDS)
    assert {(r["model"], r["size"], r["dtype"], r["device"], r["status"]) for r in rows} == {
        (model, "L2-D64", "fp32", "cpu", "ok") for model in ("rwkv", "transformer", "lstm")}
    assert snapshot(published, INFERENCE_DERIVED) == derived
    for name in ("latency", "memory", "prefill"):
        assert (figures / f"inference-cpu-l2-d64-fp32_{name}.png").read_bytes().startswith(PNG_MAGIC)
    bench_main(["inference", "--plot-only", f"out={bench}", f"figures={figures}"])
    assert snapshot(published, INFERENCE_DERIVED) == derived
    bench_main(["inference", "--count-ops", *TINY_INFERENCE, f"out={bench}"])
    ops = appended_rows(bench / "inference_ops.csv", committed["inference_ops.csv"], decoding.OPS_FIELDS)
    assert [(r["model"], r["layers"]) for r in ops] == [("rwkv", "2"), ("transformer", "2"), ("lstm", "4")]


def test_a_cpu_step_row_is_appended_to_the_published_step_log(published: Path) -> None:
    bench = published / "results" / "bench"
    committed = (bench / "step.csv").read_bytes()
    bench_main(["step", "device=cpu", "impl=reference", "n_layer=2", "n_embd=64", "head_size=32", "vocab=97",
                "ctx=16", "bsz=2", "warmup=1", "steps=1", f"out={bench}"])
    [row] = appended_rows(bench / "step.csv", committed, step.FIELDS)
    assert (row["impl"], row["bsz"], row["ctx"]) == ("reference", "2", "16") and float(row["kt_per_s"]) > 0


def test_a_csv_of_other_columns_is_a_one_line_error_and_stays_as_it_was(tmp_path: Path, capsys) -> None:
    foreign = tmp_path / "kernels.csv"
    foreign.write_text("kernel,median_ms\ncuda,1.0\n")
    with pytest.raises(SystemExit) as info:
        bench_main(["kernels", *TINY_KERNELS, f"out={tmp_path}", f"figures={tmp_path}"])
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and err.count("\n") == 0 and "has other columns" in err
    assert foreign.read_text() == "kernel,median_ms\ncuda,1.0\n" and not (tmp_path / "kernels.md").exists()


def test_a_row_cut_short_stays_and_the_next_row_starts_a_line_of_its_own(tmp_path: Path) -> None:
    from harness.bench.grid import BenchCsv

    path = tmp_path / "log.csv"
    path.write_bytes(b"a,b\n1,2\n3")  # the last row of a run that died while writing it
    BenchCsv(path, ("a", "b")).append({"a": 5, "b": 6})
    assert path.read_bytes() == b"a,b\n1,2\n3\n5,6\n"


# --- the report -------------------------------------------------------------------------------------------------


def report(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harness.report", "--results", "results", "--figures", "figures",
                           *args], cwd=cwd, capture_output=True, text=True, timeout=600,
                          env={"PYTHONPATH": str(REPO), "PATH": "", "MPLBACKEND": "Agg"})


def headline_block(readme: str) -> str:
    return readme.split("<!-- headline:start -->\n", 1)[1].split("<!-- headline:end -->", 1)[0]


def test_a_users_cpu_run_reaches_the_readmes_only_with_readme(tmp_path: Path) -> None:
    readmes = ("README.md", "README.zh-CN.md")
    committed(tmp_path, "results", *readmes)
    published_summary = (tmp_path / "results" / "summary.md").read_text()
    cpu_run = tmp_path / "results" / "cpu-main-job" / "reference-shared-bsz4-seed0"
    shutil.copytree(cpu_run, tmp_path / "results" / "my-cpu-exp" / "reference-shared-bsz4-seed0")
    # the hardest case: a user's short CPU run filed under the published H200 study
    shutil.copytree(cpu_run, tmp_path / "results" / "study-fair-bsz48" / "reference-shared-bsz4-seed0")
    before = snapshot(tmp_path, readmes)
    proc = report(tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert snapshot(tmp_path, readmes) == before  # no flag: the READMEs are not touched
    summary = (tmp_path / "results" / "summary.md").read_text()
    missing = [line for line in published_summary.splitlines() if line not in summary.splitlines()]
    assert not missing, f"published lines changed by a user's CPU run: {missing}"
    assert "| my-cpu-exp | reference | shared | 4 |" in summary
    assert "| study-fair-bsz48 | reference | shared | 4 |" in summary
    proc = report(tmp_path, "--readme")
    assert proc.returncode == 0, proc.stderr
    for name in readmes:  # the first screen answers from the published runs: a user's CPU run changes nothing there
        assert (tmp_path / name).read_bytes() == before[name]


def test_the_report_on_the_published_results_reproduces_the_published_summary(tmp_path: Path) -> None:
    published_summary = (committed(tmp_path, "results") / "results" / "summary.md").read_bytes()
    proc = report(tmp_path)
    assert proc.returncode == 0 and not proc.stderr.strip(), proc.stderr
    assert (tmp_path / "results" / "summary.md").read_bytes() == published_summary

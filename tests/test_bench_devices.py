"""Every benchmark given an implementation its device cannot run says so in one line, exit 2, through its command
line (no traceback wall from deep inside a kernel), and the step benchmark and parity say it in the trainer's own
words: one check, :meth:`impls.base.Implementation.check_device`. The device is named (``device=cpu``), so these
hold on a GPU machine too."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import assert_process_user_error, needs_fla, run_module

import impls

NEEDS_CUDA = "needs a CUDA GPU and runs here on cpu; on a CPU use impl=reference"


@pytest.mark.parametrize(("args", "message"), [
    (["step", "device=cpu"], f"impl 'rwkv' {NEEDS_CUDA}"),  # the default impl: once a 107-line traceback
    (["step", "device=cpu", "impl=rwkv_jit"], f"impl 'rwkv_jit' {NEEDS_CUDA}"),
    pytest.param(["step", "device=cpu", "impl=fla"], f"impl 'fla' {NEEDS_CUDA}", marks=needs_fla),
    (["step", "device=cpu", "impl=rwkv", "--profile"], f"impl 'rwkv' {NEEDS_CUDA}"),
    pytest.param(["parity", "device=cpu"], f"impl 'fla' {NEEDS_CUDA}", marks=needs_fla),
    (["parity", "device=cpu", "impl_a=reference"], f"impl 'rwkv_jit' {NEEDS_CUDA}"),
    (["kernels", "device=cpu"], "kernels cuda, fla_chunk, fla_recurrent need device=cuda"),
    (["kernels", "device=cpu", "--quick", "kernels=cuda"], "kernels cuda need device=cuda"),
    pytest.param(["inference", "device=cpu"], "RWKV impl rwkv needs a CUDA GPU", marks=needs_fla),
    (["inference", "device=cpu", "impls=reference,rwkv"], "RWKV impl rwkv needs a CUDA GPU"),
], ids=lambda value: " ".join(value) if isinstance(value, list) else None)
def test_a_benchmark_given_an_impl_its_device_cannot_run_is_one_line(tmp_path: Path, args: list[str],
                                                                      message: str) -> None:
    proc = run_module("harness.bench", *args, f"out={tmp_path}", timeout=300)
    assert_process_user_error(proc, message)
    assert not any(tmp_path.iterdir()), "nothing is written before the refusal"


def test_the_trainer_refuses_with_the_same_check(tmp_path: Path) -> None:
    proc = run_module("harness.run", "impl=rwkv", "trainer=cpu", f"results_dir={tmp_path}", timeout=300)
    assert_process_user_error(proc, f"impl 'rwkv' {NEEDS_CUDA}")


def test_the_check_reads_the_device_not_the_machine() -> None:
    rwkv = impls.get("rwkv")
    rwkv.check_device("cuda:1")  # builds nothing: the device is checked, not used
    with pytest.raises(impls.ImplementationError, match=f"impl 'rwkv' {NEEDS_CUDA}"):
        rwkv.check_device("cpu")
    impls.get("reference").check_device("cpu")

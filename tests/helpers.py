"""What the tests share: relative errors and :func:`assert_close` (naming every output and gradient outside its
tolerance), the seeded weight perturbation and realistic WKV inputs (from :mod:`harness.numerics`, so tests measure
as the benchmarks do), the checks that a command-line entry point reports a user error in one line, and the guard
for tests that need flash-linear-attention. GPU tests carry ``@pytest.mark.gpu``, which conftest.py skips without
CUDA."""

from __future__ import annotations

import math
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest
import torch

import impls
from harness.errors import USER_ERROR_EXIT
from harness.numerics import perturb, realistic_wkv_inputs, rel_err

__all__ = ["FLA", "REPO", "assert_close", "assert_one_line_user_error", "assert_process_user_error",
           "assert_user_error", "needs_fla", "perturb", "realistic_wkv_inputs", "rel_err", "relative_errors",
           "run_module"]

REPO = Path(__file__).resolve().parents[1]

# --- numerics -----------------------------------------------------------------------------------------------------


def relative_errors(got: Mapping[str, torch.Tensor], want: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """:func:`rel_err` of each tensor of ``got`` against the tensor of the same name and shape in ``want``."""
    only_got, only_want = sorted(set(got) - set(want)), sorted(set(want) - set(got))
    assert not only_got and not only_want, f"only in got: {only_got}; only in want: {only_want}"
    shapes = {name: (tuple(got[name].shape), tuple(want[name].shape)) for name in want
              if got[name].shape != want[name].shape}
    assert not shapes, f"shapes differ (got, want): {shapes}"
    return {name: rel_err(got[name], want[name]) for name in want}


def assert_close(got: Mapping[str, torch.Tensor], want: Mapping[str, torch.Tensor], tol: float,
                 label: str = "") -> dict[str, float]:
    """Every tensor of ``got`` within relative error ``tol`` of ``want``; the failure lists each output or gradient
    beyond it (NaN included) with its error, worst first. Returns the errors."""
    errors = relative_errors(got, want)
    beyond = {name: error for name, error in errors.items() if not error <= tol}  # NaN is beyond every tolerance
    worst_first = sorted(beyond, key=lambda name: (not math.isnan(beyond[name]), -beyond[name]))
    assert not beyond, f"{label + ': ' if label else ''}{len(beyond)} of {len(errors)} tensors beyond relative " \
                       f"error {tol:g}: " + ", ".join(f"{name} {beyond[name]:.2e}" for name in worst_first)
    return errors


# --- command-line user errors ---------------------------------------------------------------------------------------


def assert_user_error(code: object, stderr: str, message: str) -> None:
    """A user error as every CLI reports it: exit code 2 and one ``error: ...`` line on stderr naming ``message``."""
    lines = stderr.strip().splitlines()
    assert code == USER_ERROR_EXIT and len(lines) == 1, f"exit code {code}, stderr:\n{stderr}"
    assert lines[0].startswith("error: ") and message in lines[0], lines[0]


def assert_one_line_user_error(call: Callable[[], object], message: str, capsys: pytest.CaptureFixture) -> None:
    """``call()``, a CLI's ``main``, exits with a one-line user error naming ``message``."""
    with pytest.raises(SystemExit) as info:
        call()
    assert_user_error(info.value.code, capsys.readouterr().err, message)


def run_module(module: str, *args: object, timeout: float = 600) -> subprocess.CompletedProcess:
    """``python -m <module> <args>`` from the repository root, its output captured as text."""
    return subprocess.run([sys.executable, "-m", module, *(str(a) for a in args)], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def assert_process_user_error(proc: subprocess.CompletedProcess, message: str) -> None:
    """A ``python -m`` run that ended in a one-line user error naming ``message``, without a traceback."""
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    assert_user_error(proc.returncode, proc.stderr, message)


# --- optional implementations ---------------------------------------------------------------------------------------

try:
    FLA = impls.get("fla")  # constructs on a CPU with triton installed; its forward needs a GPU
except impls.ImplementationError:
    FLA = None

needs_fla = pytest.mark.skipif(FLA is None, reason="impl=fla not importable (needs flash-linear-attention 0.6, "
                                                   "fla-core, triton: pip install -e '.[gpu]')")

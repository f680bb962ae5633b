"""CPU-side checks of the CUDA build: the kernels compile with plain nvcc, and the build lock never hangs."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch

from impls.wkv7_cuda import NVCC_FLAGS, SOURCES, BuildLockError, arch_flags, build_directory, build_lock

NVCC = shutil.which("nvcc")


@pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH; the .cu compile check needs the CUDA toolkit")
def test_kernels_compile_with_plain_nvcc_for_sm80_and_sm90(tmp_path: Path) -> None:
    cu = next(path for path in SOURCES if path.suffix == ".cu")
    command = [NVCC, "-c", str(cu), "-o", str(tmp_path / "wkv7.o"), *NVCC_FLAGS,
               *arch_flags((8, 0)), *arch_flags((9, 0)), "-res-usage"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr
    usage = [line for line in (result.stdout + result.stderr).splitlines() if "registers" in line]
    print("\n".join(usage))
    assert len(usage) == 8  # {forward, backward} x head sizes {32, 64} x {sm_80, sm_90}


def test_arch_flags_name_one_real_architecture() -> None:
    assert arch_flags((9, 0)) == ["-gencode=arch=compute_90,code=sm_90"]


def test_build_directory_is_per_user_torch_cuda_and_arch(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    directory = build_directory((9, 0))
    assert directory.is_relative_to(tmp_path / ".cache" / "rwkv-harness" / "torch_extensions")
    assert "sm90" in str(directory) and torch.__version__ in str(directory)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "elsewhere"))
    assert build_directory((8, 0)).is_relative_to(tmp_path / "elsewhere")


def test_stale_torch_lock_fails_at_once_naming_the_file(tmp_path: Path) -> None:
    lock = tmp_path / "lock"
    lock.touch()
    an_hour_ago = time.time() - 3600
    os.utime(lock, (an_hour_ago, an_hour_ago))
    start = time.monotonic()
    with pytest.raises(BuildLockError, match=re.escape(str(lock))) as failure, build_lock(tmp_path, timeout_s=60):
        pass
    assert time.monotonic() - start < 5
    assert "\n" not in str(failure.value) and "delete" in str(failure.value)


def test_torch_lock_that_persists_past_the_timeout_fails(tmp_path: Path) -> None:
    (tmp_path / "lock").touch()
    with pytest.raises(BuildLockError, match="stale build lock"), build_lock(tmp_path, timeout_s=0.5):
        pass


def test_torch_lock_released_in_time_is_waited_for(tmp_path: Path) -> None:
    lock = tmp_path / "lock"
    lock.touch()
    threading.Timer(0.3, lock.unlink).start()
    with build_lock(tmp_path, timeout_s=10):
        assert not lock.exists()


def test_concurrent_builders_take_turns(tmp_path: Path) -> None:
    events: list[str] = []

    def builder(name: str) -> None:
        with build_lock(tmp_path, timeout_s=10):
            events.append(f"{name} in")
            time.sleep(0.3)
            events.append(f"{name} out")

    threads = [threading.Thread(target=builder, args=(name,)) for name in "ab"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert events in (["a in", "a out", "b in", "b out"], ["b in", "b out", "a in", "a out"])


def test_waiting_builder_gives_up_after_the_timeout(tmp_path: Path) -> None:
    holding, release = threading.Event(), threading.Event()

    def holder() -> None:
        with build_lock(tmp_path, timeout_s=10):
            holding.set()
            release.wait(10)

    thread = threading.Thread(target=holder)
    thread.start()
    try:
        assert holding.wait(5)
        with pytest.raises(BuildLockError, match=re.escape(str(tmp_path))), build_lock(tmp_path, timeout_s=0.3):
            pass
    finally:
        release.set()
        thread.join()

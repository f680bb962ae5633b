"""scripts/check_layers.py: the tree keeps its layers (impls never imports harness, no import cycles), and the check
fails, naming the import, on small trees that break either rule."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from helpers import REPO

SCRIPT = REPO / "scripts" / "check_layers.py"


def check(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), str(root)], capture_output=True, text=True, timeout=60)


def write_tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


def test_the_tree_keeps_its_layers() -> None:
    proc = check(REPO)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("ok: ") and proc.stderr == ""


def test_a_function_level_import_of_harness_from_impls_fails(tmp_path: Path) -> None:
    root = write_tree(tmp_path, {"impls/__init__.py": "", "impls/kernel.py": """\
        import torch


        def load():
            import harness.errors
            return harness.errors
        """, "harness/__init__.py": "", "harness/errors.py": "import impls.kernel\n"})
    proc = check(root)
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [
        "impls -> harness: impls.kernel imports harness.errors (impls/kernel.py:5)",
        "cycle: harness.errors -> impls.kernel -> harness.errors (harness/errors.py:1, impls/kernel.py:5)"]


def test_a_cycle_through_a_relative_import_fails_and_names_each_import(tmp_path: Path) -> None:
    root = write_tree(tmp_path, {"impls/__init__.py": "", "harness/__init__.py": "", "harness/bench/__init__.py": "",
                                 "harness/bench/a.py": "from harness.bench import b\n",
                                 "harness/bench/b.py": "import os\n\n\ndef late():\n    from .c import thing\n",
                                 "harness/bench/c.py": "if True:\n    from ..bench.a import x\n"})
    proc = check(root)
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [
        "cycle: harness.bench.a -> harness.bench.b -> harness.bench.c -> harness.bench.a "
        "(harness/bench/a.py:1, harness/bench/b.py:5, harness/bench/c.py:2)"]


def test_from_package_import_name_points_at_the_package(tmp_path: Path) -> None:
    """``from harness import NAME`` loads harness/__init__.py; ``from harness import module`` loads the module."""
    files = {"impls/__init__.py": "", "harness/__init__.py": "from harness.config import DEFAULTS\n",
             "harness/config.py": "from harness import VERSION\n"}
    proc = check(write_tree(tmp_path, files))
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == ["cycle: harness -> harness.config -> harness (harness/__init__.py:1, "
                                        "harness/config.py:1)"]
    (tmp_path / "harness" / "config.py").write_text("from harness import numerics\n")
    (tmp_path / "harness" / "numerics.py").write_text("")
    proc = check(tmp_path)
    assert proc.returncode == 0, proc.stderr

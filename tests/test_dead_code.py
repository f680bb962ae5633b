"""No dead module-level names: every constant or binding at the top level of a harness or impls module is read
somewhere (in its module, another module, a test or a script), so none lingers after the code that used it goes
(``wkv7_cuda._wkv7_clampw_op``, ``tokenizer.VOCAB_SIZE`` once did)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from helpers import REPO

PACKAGES = ("harness", "impls")
READERS = (*PACKAGES, "tests", "scripts")


def module_level_names(tree: ast.Module) -> list[str]:
    names = []
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) \
            else []
        names += [target.id for target in targets if isinstance(target, ast.Name) and target.id != "__all__"]
    return names


def test_every_module_level_name_is_read_somewhere() -> None:
    sources = {path: path.read_text() for folder in READERS for path in (REPO / folder).rglob("*.py")
               if path != Path(__file__)}  # this file names the dead ones of the past
    unread = []
    for path, source in sources.items():
        if path.relative_to(REPO).parts[0] not in PACKAGES:
            continue
        for name in module_level_names(ast.parse(source)):
            word = re.compile(rf"\b{re.escape(name)}\b")
            if sum(len(word.findall(text)) for text in sources.values()) == 1:  # its own binding only
                unread.append(f"{path.relative_to(REPO)}: {name}")
    assert not unread, f"bound but never read: {', '.join(unread)}"

"""Shared pytest set-up: tests marked ``gpu`` (the marker is declared in pyproject.toml) are skipped where no CUDA
device is visible. Shared helpers live in tests/helpers.py."""

from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

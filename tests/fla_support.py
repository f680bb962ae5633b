"""Shared guard for tests that need flash-linear-attention importable (it constructs on a CPU with triton)."""

import pytest

import impls

try:
    FLA = impls.get("fla")
except impls.ImplementationError:
    FLA = None

needs_fla = pytest.mark.skipif(FLA is None, reason="impl=fla not importable (needs flash-linear-attention 0.6, "
                                                   "fla-core, triton: pip install -e '.[gpu]')")

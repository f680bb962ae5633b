"""Registry of time-mix implementations, selected with ``impl=<name>``.

Implementation modules are imported lazily so that a missing optional dependency (CUDA toolchain,
flash-linear-attention, triton) only matters when that implementation is asked for.
"""

from __future__ import annotations

import importlib

from impls.base import Implementation, ImplementationError

# impl name -> (module, attribute holding the Implementation, what to install if the import fails); an empty
# attribute: the implementation only exists for given options (make_implementation; rwkv_lm needs a path)
_REGISTRY: dict[str, tuple[str, str, str]] = {
    "reference": ("impls.reference", "REFERENCE", "pip install -e ."),
    "rwkv": ("impls.rwkv", "RWKV_EAGER", "pip install -e .  (and a CUDA toolchain)"),
    "rwkv_jit": ("impls.rwkv", "RWKV_JIT", "pip install -e .  (and a CUDA toolchain)"),
    "fla": ("impls.fla", "FLA", "pip install -e '.[gpu]'  (flash-linear-attention, fla-core, triton)"),
    "rwkv_lm": ("impls.rwkv_lm", "", "pip install -e .  (and a CUDA toolchain for your checkout's kernels)"),
}


__all__ = ["Implementation", "ImplementationError", "get", "names"]


def names() -> list[str]:
    return list(_REGISTRY)


def get(name: str, **options: object) -> Implementation:
    """Look up an implementation by its ``impl=`` name.

    ``options`` (e.g. ``fuse_norm`` for fla) go to the module's ``make_implementation`` factory."""
    if name not in _REGISTRY:
        raise ImplementationError(f"unknown impl {name!r}; choose one of: {', '.join(_REGISTRY)}")
    module_name, attribute, install_hint = _REGISTRY[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] in {"impls"}:
            raise
        raise ImplementationError(
            f"impl {name!r} needs the Python module {exc.name!r}, which is not installed; "
            f"install it with: {install_hint}"
        ) from None
    if options or not attribute:
        factory = getattr(module, "make_implementation", None)
        if factory is None:
            raise ImplementationError(f"impl {name!r} takes no options, got {', '.join(options)}")
        return factory(**options)
    return getattr(module, attribute)

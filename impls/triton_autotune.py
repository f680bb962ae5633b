"""Triton autotune choices kept between machines, and compiled in parallel where they must be made.

FLA's first training step on a cold GPU spends about 7 minutes autotuning: for every kernel and tuning key, Triton
compiles each candidate config one after another, then times them. Two remedies, both leaving the *choice* to Triton:

* **Replay** (``RWKV_AUTOTUNE=replay``, the default on CUDA): the choices Triton's autotuner made on this GPU model,
  with these Triton and FLA versions, are kept in ``results/autotune/<gpu>-fla<v>-triton<v>.json`` (written when the
  process exits). When a kernel meets a tuning key the file holds, the recorded config becomes its only candidate,
  provided it is one of the kernel's own; anything not in the file autotunes as usual.
* **Parallel compile** (on every autotune that still runs): the candidates are compiled on a thread pool (Triton's
  ``AsyncCompileMode``; its compiler releases the GIL) before Triton times them one by one, as it always does.

``RWKV_AUTOTUNE=record`` times everything afresh and still writes the file; ``off`` leaves Triton untouched.
What was recorded and replayed goes into each result's environment (:func:`status`).
"""

from __future__ import annotations

import atexit
import fcntl
import gc
import inspect
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from impls.base import ImplementationError

DEFAULT_DIR = Path(__file__).resolve().parent.parent / "results" / "autotune"
MODES = ("replay", "record", "off")
COMPILE_THREADS = min(16, os.cpu_count() or 1)

_state: dict[str, Any] = {"mode": None}


def mode() -> str:
    chosen = os.environ.get("RWKV_AUTOTUNE", "replay")
    if chosen not in MODES:
        raise ImplementationError(f"RWKV_AUTOTUNE={chosen!r}; choose one of {', '.join(MODES)}")
    return chosen


def cache_file(directory: Path, gpu: str, versions: dict[str, str]) -> Path:
    """``<gpu>-fla<v>-triton<v>.json``: choices are only valid for the GPU model and versions they were made on."""
    parts = [re.sub(r"[^0-9A-Za-z.]+", "_", gpu).strip("_")] + [f"{k}{v}" for k, v in sorted(versions.items())]
    return directory / ("-".join(parts) + ".json")


def autotuners(module_prefix: str) -> dict[str, Any]:
    """Every live Triton ``Autotuner`` whose kernel is defined in a module under ``module_prefix``, by a stable name
    (``module:qualname`` of the kernel function)."""
    from triton.runtime.autotuner import Autotuner

    found: dict[str, Any] = {}
    for obj in gc.get_objects():
        if issubclass(type(obj), Autotuner):  # not isinstance: it wakes lazy module proxies
            if _base_function(obj).__module__.startswith(module_prefix):
                found[kernel_name(obj)] = obj
    return found


def _base_function(autotuner: Any) -> Any:
    fn = autotuner
    while not inspect.isfunction(fn):
        fn = fn.fn
    return fn


def config_to_json(config: Any) -> dict[str, Any]:
    return {"kwargs": dict(config.kwargs), "num_warps": config.num_warps, "num_stages": config.num_stages,
            "num_ctas": getattr(config, "num_ctas", 1), "maxnreg": getattr(config, "maxnreg", None)}


def _is_plain(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_is_plain(v) for v in value)
    return value is None or isinstance(value, (bool, int, float, str))


def snapshot(module_prefix: str) -> dict[str, list[dict[str, Any]]]:
    """The choices in every autotuner's cache now: kernel -> [{"key": [...], "config": {...}}]."""
    table: dict[str, list[dict[str, Any]]] = {}
    for name, tuner in sorted(autotuners(module_prefix).items()):
        entries = [{"key": list(key), "config": config_to_json(config)}
                   for key, config in tuner.cache.items() if _is_plain(key)]
        if entries:
            table[name] = entries
    return table


def _by_key(entries: list[dict]) -> dict[str, dict]:
    """A kernel's entries by their tuning key, serialised as the file writes it."""
    return {json.dumps(e["key"]): e for e in entries}


def merge(old: dict[str, list[dict]], new: dict[str, list[dict]]) -> dict[str, list[dict]]:
    """Union by (kernel, key); a newer choice for the same key wins."""
    merged = {name: _by_key(entries) for name, entries in old.items()}
    for name, entries in new.items():
        merged.setdefault(name, {}).update(_by_key(entries))
    return {name: [by_key[k] for k in sorted(by_key)] for name, by_key in sorted(merged.items())}


def read_table(path: Path) -> dict[str, list[dict[str, Any]]]:
    if not path.exists():
        return {}
    return json.loads(path.read_text())["kernels"]


def write_table(path: Path, new: dict[str, list[dict[str, Any]]], about: dict[str, Any]) -> None:
    """Merge ``new`` into the file under an exclusive lock (several ranks may exit at once), atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        table = merge(read_table(path), new)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({**about, "kernels": table}, indent=1, sort_keys=True) + "\n")
        tmp.replace(path)


def tuning_key(tuner: Any, kwargs: dict) -> tuple:
    """The key Triton's ``Autotuner.run`` files a choice under: the ``key=`` arguments, then every tensor's dtype."""
    named = {k: v for k, v in {**tuner.nargs, **kwargs}.items() if k in tuner.arg_names}
    return tuple([named[k] for k in tuner.keys if k in named] +
                 [str(v.dtype) for v in named.values() if hasattr(v, "dtype")])


def kernel_name(tuner: Any) -> str:
    fn = _base_function(tuner)
    return f"{fn.__module__}:{fn.__qualname__}"


def recorded_choice(tuner: Any, kwargs: dict, candidates: list) -> Any | None:
    """The recorded config for this kernel and key, if it is one of ``candidates`` (the kernel's own configs)."""
    entry = _state.get("index", {}).get(kernel_name(tuner), {}).get(json.dumps(list(tuning_key(tuner, kwargs))))
    if entry is None:
        return None
    return next((c for c in candidates if config_to_json(c) == entry), None)


def index(table: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, dict]]:
    return {name: {key: e["config"] for key, e in _by_key(entries).items()} for name, entries in table.items()}


def install_hook(replay: bool, threads: int = COMPILE_THREADS) -> bool:
    """Hook Triton's ``Autotuner.prune_configs``, which runs only when a kernel meets a new tuning key (never on the
    launch path): with ``replay``, a recorded choice among the candidates becomes the only candidate (Triton then
    times just that one); otherwise the candidates are compiled on a thread pool before Triton times them.
    False where this Triton lacks the hooks."""
    try:
        from triton.runtime._async_compile import AsyncCompileMode
        from triton.runtime.autotuner import Autotuner
    except ImportError:
        return False
    prune = getattr(Autotuner.prune_configs, "_unhooked", Autotuner.prune_configs)

    def prune_replay_or_compile(self, kwargs: dict) -> list:
        configs = prune(self, kwargs)
        if self.nargs is None or kwargs.get("warmup") is not False:  # Autotuner.warmup, not a launch
            return configs
        choice = recorded_choice(self, kwargs, configs) if replay else None
        if choice is not None:
            _state["replayed"] += 1
            return [choice]
        if len(configs) > 1:
            _compile_all(self, configs, kwargs, AsyncCompileMode, threads)
        return configs

    prune_replay_or_compile._unhooked = prune
    Autotuner.prune_configs = prune_replay_or_compile
    return True


def _compile_all(tuner: Any, configs: list, kwargs: dict, async_mode: Any, threads: int) -> None:
    args = list(tuner.nargs.values())  # Autotuner.run's positional arguments, in order
    try:
        with ThreadPoolExecutor(threads) as pool, async_mode(pool, ignore_errors=True):
            for config in configs:
                tuner.fn.run(*args, **{**kwargs, **config.all_kwargs(), "warmup": True})
    except Exception:  # a config that fails to build here fails again, and is skipped, when Triton times it
        pass


def activate(module_prefix: str, gpu: str, versions: dict[str, str], directory: Path | None = None) -> dict:
    """Replay the choices recorded for this GPU and versions (``RWKV_AUTOTUNE=replay``), compile the rest in
    parallel, and record every choice of the ``module_prefix`` kernels when the process exits. Idempotent.
    Returns :func:`status`."""
    if _state["mode"] is not None:
        return status()
    chosen = mode()
    _state.update(mode=chosen)
    if chosen == "off":
        return status()
    path = cache_file(Path(os.environ.get("RWKV_AUTOTUNE_DIR", directory or DEFAULT_DIR)), gpu, versions)
    table = read_table(path) if chosen == "replay" else {}
    _state.update(file=path.name, index=index(table), recorded=sum(map(len, table.values())), replayed=0,
                  hooked=install_hook(replay=chosen == "replay"))

    def record() -> None:
        now = snapshot(module_prefix)
        if now:
            write_table(path, now, {"gpu": gpu, "versions": versions})

    atexit.register(record)
    return status()


def status() -> dict[str, Any]:
    """For the record: the mode, the file and how many choices it held, how many were replayed so far."""
    if _state["mode"] is None:
        return {}
    return {k: v for k, v in _state.items() if k != "index"}


def activate_for_fla() -> dict:
    """:func:`activate` for FLA's kernels on the current GPU (nothing without CUDA)."""
    import torch

    if not torch.cuda.is_available():
        return {}
    import fla
    import triton

    return activate("fla", torch.cuda.get_device_name(0), {"triton": triton.__version__, "fla": fla.__version__})

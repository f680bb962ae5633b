"""Bring your own RWKV-LM: ``impl=rwkv_lm impl.path=<checkout>/RWKV-v7/train_temp`` trains a user's RWKV-LM checkout.

The harness model is built around the checkout's own ``RWKV_Tmix_x070`` and ``RWKV_CMix_x070`` modules (their
parameters carry RWKV-LM's canonical names, so the identity name map and ``init=shared`` apply), and trains with the
checkout's own loss when ``src/model.py`` defines ``l2wrap_cross_entropy(logits, targets)`` (HEAD's fused kernel;
dc6c3ec has none, so the harness's L2Wrap + cross-entropy applies, the same as its ``training_step``).

``src/model.py`` configures itself from environment variables at import and builds its CUDA kernels there, with
``torch.utils.cpp_extension.load`` on paths relative to the checkout (spec §4.2, §4.4). It is imported with those
variables set from the impl options and the checkout as working directory, both restored afterwards, under a module
name of its own per (path, kernel, jit, head size). HEAD builds eight extensions (nine with its chunked head loss),
about 9 minutes one after another: before the import, the ``load()`` calls it will make are read from its source
(:func:`load_calls`) and run on a thread pool (about 75 s), so that the import finds them built. Whatever goes wrong
there only means that the import builds them itself, in order.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import hashlib
import importlib.util
import operator
import os
import subprocess
import sys
import traceback
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType, SimpleNamespace

import torch
from torch import nn

from impls.base import CANONICAL_ATT_NAMES, Implementation, ImplementationError
from impls.wkv7_cuda import BuildLockError, build_lock, lock_timeout_s

TIME_MIX_CLASS = "RWKV_Tmix_x070"
CHANNEL_MIX_CLASS = "RWKV_CMix_x070"
LOSS_FUNCTION = "l2wrap_cross_entropy"
DEFAULT_KERNEL = "@rwkv3"  # HEAD's demo-training-run.sh default (KERNEL="@rwkv3"); dc6c3ec reads no RWKV_KERNEL
# Only the harness's own test fixture sets this (``HARNESS_CPU_FIXTURE = True`` at module level): a checkout
# without CUDA kernels, which may then run on a CPU. Every real checkout builds CUDA kernels at import.
CPU_FIXTURE_MARKER = "HARNESS_CPU_FIXTURE"
CHANNEL_MIX_NAMES = frozenset({"x_k", "key.weight", "value.weight"})
LOCK_FOLDER = "rwkv_harness_checkouts"  # under torch's extension root: the lock that serialises checkout builds


def module_environment(kernel: str, jit: bool, head_size: int) -> dict[str, str]:
    """The variables RWKV-LM's train.py sets before it imports src/model.py (x070, no chunked head loss)."""
    return {"RWKV_MY_TESTING": "x070", "RWKV_KERNEL": kernel, "RWKV_JIT_ON": "1" if jit else "0",
            "RWKV_HEAD_SIZE": str(head_size), "RWKV_HEAD_L2WRAP_CE_CHUNK": "0", "RWKV_FLOAT_MODE": "bf16"}


# --- the checkout's source --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Checkout:
    """An RWKV-LM ``RWKV-v7/train_temp`` folder whose src/model.py has what the adapter needs."""

    path: Path
    tree: ast.Module

    @property
    def model_py(self) -> Path:
        return self.path / "src" / "model.py"

    @property
    def runs_on_cpu(self) -> bool:
        return _module_level_constant(self.tree, CPU_FIXTURE_MARKER) is True


def open_checkout(path: str | os.PathLike | None) -> Checkout:
    """The checkout at ``path``, or an ImplementationError that says in one line what it lacks."""
    if path in (None, ""):
        raise ImplementationError("impl=rwkv_lm needs the checkout: impl.path=<your RWKV-LM>/RWKV-v7/train_temp "
                                  "(python -m harness.bench step: +impl_options.path=...)")
    folder = Path(path).expanduser().resolve()
    if not folder.is_dir():
        raise ImplementationError(f"impl.path {folder} is not a folder; give your RWKV-LM's RWKV-v7/train_temp")
    model_py = folder / "src" / "model.py"
    if not model_py.is_file():
        nested = folder / "RWKV-v7" / "train_temp"
        hint = f"; did you mean impl.path={nested}?" if (nested / "src" / "model.py").is_file() else \
            " (impl.path must be RWKV-LM's RWKV-v7/train_temp folder)"
        raise ImplementationError(f"{folder} has no src/model.py{hint}")
    if not (folder / "cuda").is_dir():
        raise ImplementationError(f"{folder} has no cuda/ folder (the kernels src/model.py builds at import)")
    try:
        tree = ast.parse(model_py.read_text(), filename=str(model_py))
    except (SyntaxError, UnicodeDecodeError) as exc:
        raise ImplementationError(f"{model_py} does not parse as Python: {exc}") from None
    _check_classes(model_py, tree)
    return Checkout(folder, tree)


def _check_classes(model_py: Path, tree: ast.Module) -> None:
    classes = {node.name for node in tree.body if isinstance(node, ast.ClassDef)}
    for wanted in (TIME_MIX_CLASS, CHANNEL_MIX_CLASS):
        if wanted in classes:
            continue
        kind = wanted.rsplit("_", 1)[0]  # RWKV_Tmix / RWKV_CMix
        others = sorted(name for name in classes if name.startswith(kind + "_x0"))
        if others:
            raise ImplementationError(f"{model_py} defines {', '.join(others)}, not {wanted}: another RWKV generation; "
                                      "impl=rwkv_lm takes RWKV-7 (x070), RWKV-LM's RWKV-v7/train_temp")
        raise ImplementationError(f"{model_py} defines no class {wanted}")


def _module_level_constant(tree: ast.Module, name: str) -> object:
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            return node.value.value if isinstance(node.value, ast.Constant) else None
    return None


def git_state(folder: Path) -> tuple[str | None, bool | None]:
    """(commit, dirty) of the git work tree that tracks ``folder``'s src/model.py; (None, None) when none does
    (an exported copy, or a folder merely lying inside another repository)."""
    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True, timeout=30)

    try:
        if git("ls-files", "--error-unmatch", "src/model.py").returncode != 0:
            return None, None
        commit = git("rev-parse", "HEAD")
        status = git("status", "--porcelain", "--", ".")
    except (OSError, subprocess.TimeoutExpired):
        return None, None
    if commit.returncode != 0:
        return None, None
    return commit.stdout.strip(), bool(status.stdout.strip()) if status.returncode == 0 else None


# --- the load() calls a module makes at import, read from its source ----------------------------------------------


@dataclass(frozen=True)
class LoadCall:
    """One ``torch.utils.cpp_extension.load(*args, **kwargs)`` call with its argument values."""

    args: tuple
    kwargs: Mapping[str, object]

    @property
    def name(self) -> str:
        return str(self.kwargs["name"] if "name" in self.kwargs else self.args[0])


class _Unknown(Exception):
    """A value the source alone does not determine."""


_COMPARE = {ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
            ast.Gt: operator.gt, ast.GtE: operator.ge, ast.In: lambda a, b: a in b,
            ast.NotIn: lambda a, b: a not in b, ast.Is: operator.is_, ast.IsNot: operator.is_not}
_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv,
           ast.Mod: operator.mod}
_BUILTINS = {"int": int, "str": str, "float": float, "bool": bool, "len": len}
_CONVERSIONS = {-1: str, ord("s"): str, ord("r"): repr, ord("a"): ascii}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


class _ImportTimeEvaluator:
    """Values of the simple expressions a module computes at import: constants, f-strings, lists, names bound
    before, ``os.environ`` lookups (from ``environ``), comparisons and a few builtins. Anything else is unknown."""

    def __init__(self, environ: Mapping[str, str]):
        self.environ = environ
        self.scope: dict[str, object] = {}

    def value(self, node: ast.AST) -> object:
        method = getattr(self, f"_{type(node).__name__}", None)
        if method is None:
            raise _Unknown
        return method(node)

    def _Constant(self, node: ast.Constant) -> object:
        return node.value

    def _JoinedStr(self, node: ast.JoinedStr) -> str:
        return "".join(self.value(part) for part in node.values)

    def _FormattedValue(self, node: ast.FormattedValue) -> str:
        spec = "" if node.format_spec is None else self.value(node.format_spec)
        return format(_CONVERSIONS[node.conversion](self.value(node.value)) if node.conversion != -1
                      else self.value(node.value), spec)

    def _List(self, node: ast.List) -> list:
        return [self.value(item) for item in node.elts]

    def _Tuple(self, node: ast.Tuple) -> tuple:
        return tuple(self.value(item) for item in node.elts)

    def _Name(self, node: ast.Name) -> object:
        if node.id not in self.scope:
            raise _Unknown
        return self.scope[node.id]

    def _Subscript(self, node: ast.Subscript) -> object:
        key = self.value(node.slice)
        if _dotted(node.value) == "os.environ":
            if key not in self.environ:
                raise _Unknown
            return self.environ[key]
        try:
            return self.value(node.value)[key]
        except (KeyError, IndexError, TypeError):
            raise _Unknown from None

    def _Call(self, node: ast.Call) -> object:
        if any(isinstance(arg, ast.Starred) for arg in node.args) or node.keywords:
            raise _Unknown
        args = [self.value(arg) for arg in node.args]
        function = _dotted(node.func)
        if function in ("os.environ.get", "os.getenv") and args:
            return self.environ.get(*args)
        if function in _BUILTINS and function not in self.scope:
            try:
                return _BUILTINS[function](*args)
            except (TypeError, ValueError):
                raise _Unknown from None
        raise _Unknown

    def _Compare(self, node: ast.Compare) -> bool:
        left = self.value(node.left)
        for op, comparator in zip(node.ops, node.comparators, strict=True):
            right = self.value(comparator)
            try:
                if not _COMPARE[type(op)](left, right):
                    return False
            except TypeError:
                raise _Unknown from None
            left = right
        return True

    def _BoolOp(self, node: ast.BoolOp) -> object:
        result = None
        for item in node.values:
            result = self.value(item)
            if (isinstance(node.op, ast.And) and not result) or (isinstance(node.op, ast.Or) and result):
                return result
        return result

    def _UnaryOp(self, node: ast.UnaryOp) -> object:
        operand = self.value(node.operand)
        if isinstance(node.op, ast.Not):
            return not operand
        if isinstance(node.op, ast.USub) and isinstance(operand, (int, float)):
            return -operand
        raise _Unknown

    def _BinOp(self, node: ast.BinOp) -> object:
        if type(node.op) not in _BINARY:
            raise _Unknown
        try:
            return _BINARY[type(node.op)](self.value(node.left), self.value(node.right))
        except (TypeError, ValueError, ZeroDivisionError):
            raise _Unknown from None

    def _IfExp(self, node: ast.IfExp) -> object:
        return self.value(node.body if self.value(node.test) else node.orelse)

    def assign(self, target: ast.AST, value: ast.AST) -> None:
        if isinstance(target, ast.Name):
            try:
                self.scope[target.id] = self.value(value)
            except _Unknown:
                self.scope.pop(target.id, None)
        else:
            self.forget(target)

    def forget(self, node: ast.AST) -> None:
        """Names that ``node`` binds are unknown from here on."""
        for inner in ast.walk(node):
            if isinstance(inner, ast.Name) and isinstance(inner.ctx, ast.Store):
                self.scope.pop(inner.id, None)
            elif isinstance(inner, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                self.scope.pop(inner.name, None)
            elif isinstance(inner, ast.alias):
                self.scope.pop((inner.asname or inner.name).split(".")[0], None)


def load_calls(tree: ast.Module, environ: Mapping[str, str]) -> list[LoadCall]:
    """The ``torch.utils.cpp_extension.load`` calls a module makes at import with the environment ``environ``,
    with their arguments, in order, read from its syntax tree: statements at module level (the branches of ``if``
    whose test is known, the body of ``try``), not inside functions or classes. A call whose arguments or branch
    depend on anything else (a runtime value) is left out: the import itself then builds it."""
    evaluator = _ImportTimeEvaluator(environ)
    calls: list[LoadCall] = []
    _walk(tree.body, evaluator, _load_names(tree), calls)
    return calls


def _load_names(tree: ast.Module) -> set[str]:
    """The (dotted) names under which the module can call torch.utils.cpp_extension.load, from its imports."""
    names = {"torch.utils.cpp_extension.load"}
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module == "torch.utils.cpp_extension":
            names |= {alias.asname or alias.name for alias in node.names if alias.name == "load"}
        elif isinstance(node, ast.ImportFrom) and node.module == "torch.utils":
            names |= {f"{alias.asname or alias.name}.load" for alias in node.names if alias.name == "cpp_extension"}
        elif isinstance(node, ast.Import):
            names |= {f"{alias.asname}.load" for alias in node.names
                      if alias.name == "torch.utils.cpp_extension" and alias.asname}
    return names


def _walk(statements: list[ast.stmt], evaluator: _ImportTimeEvaluator, loaders: set[str],
          calls: list[LoadCall]) -> None:
    for node in statements:
        if isinstance(node, ast.If):
            try:
                branch = node.body if evaluator.value(node.test) else node.orelse
            except _Unknown:
                evaluator.forget(node)
                continue
            _walk(branch, evaluator, loaders, calls)
        elif isinstance(node, ast.Try):
            _walk(node.body + node.orelse + node.finalbody, evaluator, loaders, calls)
            for handler in node.handlers:
                evaluator.forget(handler)
        elif isinstance(node, (ast.Expr, ast.Assign)):
            if (call := _load_call(node.value, evaluator, loaders)) is not None:
                calls.append(call)
            for target in getattr(node, "targets", ()):
                evaluator.assign(target, node.value)
        else:
            evaluator.forget(node)


def _load_call(node: ast.AST, evaluator: _ImportTimeEvaluator, loaders: set[str]) -> LoadCall | None:
    if not isinstance(node, ast.Call):
        return None
    if _dotted(node.func) not in loaders:
        return None
    try:
        if any(isinstance(arg, ast.Starred) for arg in node.args) or any(k.arg is None for k in node.keywords):
            raise _Unknown
        args = tuple(evaluator.value(arg) for arg in node.args)
        kwargs = {keyword.arg: evaluator.value(keyword.value) for keyword in node.keywords}
    except _Unknown:
        return None
    return LoadCall(args, kwargs) if args or "name" in kwargs else None


# --- building ahead of the import, then importing --------------------------------------------------------------------


def _extension_directory(name: str) -> Path:
    from torch.utils import cpp_extension

    return Path(cpp_extension._get_build_directory(name, verbose=False))


def remove_stale_locks(calls: list[LoadCall]) -> None:
    """Delete torch's ``lock`` file of each extension about to be built. Called with the checkout lock held, so no
    harness process is building them; a lock left there is from a killed build, and torch would wait on it forever
    (a plain RWKV-LM train.py building into the same folder at the same moment is the one case this misjudges: give
    it another $TORCH_EXTENSIONS_DIR)."""
    for call in calls:
        folder = Path(str(call.kwargs["build_directory"])) if call.kwargs.get("build_directory") else \
            _extension_directory(call.name)
        lock = folder / "lock"
        if lock.exists():
            lock.unlink(missing_ok=True)
            print(f"rwkv_lm: removed {lock}, left by an interrupted build", file=sys.stderr)


def build_ahead(calls: list[LoadCall]) -> list[str]:
    """Run the ``load()`` calls on a thread pool, one extension per thread (the working directory is the checkout
    already); returns one line per call that failed (the import then builds that one itself and reports it)."""
    from torch.utils import cpp_extension

    def build(call: LoadCall) -> str | None:
        try:
            cpp_extension.load(*call.args, **call.kwargs)
        except Exception as exc:  # noqa: BLE001 - any failure only means the import builds it in order
            return f"{call.name}: {type(exc).__name__}: {_first_line(exc)}"
        return None

    if not calls:
        return []
    with ThreadPoolExecutor(max_workers=len(calls), thread_name_prefix="rwkv_lm-build") as pool:
        return [failure for failure in pool.map(build, calls) if failure is not None]


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else ""


def _failure(exc: BaseException, source: Path) -> str:
    """``Type: first line`` of ``exc``, and where in ``source`` it was raised (a bare ``assert`` says nothing else)."""
    frames = [frame for frame in traceback.extract_tb(exc.__traceback__) if Path(frame.filename) == source]
    where = f" at {source.name} line {frames[-1].lineno}: {frames[-1].line}" if frames else ""
    return f"{type(exc).__name__}{where}: {_first_line(exc)}".rstrip(": ")


@contextlib.contextmanager
def inside_checkout(folder: Path, environ: Mapping[str, str]) -> Iterator[None]:
    """Working directory ``folder`` and the variables ``environ`` set, both as they were afterwards."""
    cwd, saved = os.getcwd(), {key: os.environ.get(key) for key in environ}
    os.environ.update(environ)
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(cwd)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def module_name(folder: Path, kernel: str, jit: bool, head_size: int) -> str:
    digest = hashlib.sha1(f"{folder}|{kernel}|{jit}|{head_size}".encode()).hexdigest()[:12]
    return f"rwkv_lm_checkout_{digest}"


@functools.cache
def import_checkout(folder: Path, kernel: str, jit: bool, head_size: int) -> ModuleType:
    """The checkout's src/model.py imported as RWKV-LM's train.py would (its CUDA kernels built first, at once)."""
    checkout = open_checkout(folder)
    environ = module_environment(kernel, jit, head_size)
    with inside_checkout(folder, environ):
        if checkout.runs_on_cpu:
            return _execute(checkout.model_py, module_name(folder, kernel, jit, head_size))
        calls = load_calls(checkout.tree, environ)
        try:
            with build_lock(_extension_directory(LOCK_FOLDER), lock_timeout_s(), what="RWKV-LM checkout kernels"):
                remove_stale_locks(calls)
                for failure in build_ahead(calls):
                    print(f"rwkv_lm: building ahead of the import failed ({failure}); the import builds it again",
                          file=sys.stderr)
                return _execute(checkout.model_py, module_name(folder, kernel, jit, head_size))
        except BuildLockError as exc:
            raise ImplementationError(str(exc)) from None


def _execute(model_py: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, model_py)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # TorchScript reads the source of the module's classes through sys.modules
    try:
        spec.loader.exec_module(module)
    except ModuleNotFoundError as exc:
        sys.modules.pop(name, None)
        raise ImplementationError(f"{model_py} needs the Python module {exc.name!r}, which is not installed "
                                  "(RWKV-LM's train_temp imports pytorch_lightning and deepspeed)") from None
    except Exception as exc:  # noqa: BLE001 - a build failure or any error of the user's code: one line for the user
        sys.modules.pop(name, None)
        raise ImplementationError(f"importing {model_py} failed: {_failure(exc, model_py)}") from None
    return module


# --- the implementation ------------------------------------------------------------------------------------------


def module_args(n_layer: int, n_embd: int, head_size: int) -> SimpleNamespace:
    """The ``args`` RWKV-LM's modules read: the harness model's shape (FFN width 4C, as RWKV_CMix_x070 builds)."""
    return SimpleNamespace(n_layer=n_layer, n_embd=n_embd, dim_att=n_embd, dim_ffn=4 * n_embd, head_size=head_size,
                           my_testing="x070", grad_cp=0)


def _construct(cls: type, args: SimpleNamespace, layer_id: int, names: frozenset[str]) -> nn.Module:
    """``cls(args, layer_id)`` from the checkout, holding exactly the parameters ``names``."""
    where = f"{cls.__name__}(args, layer_id={layer_id}) of the checkout"
    try:
        module = cls(args, layer_id)
    except Exception as exc:  # noqa: BLE001 - the user's code: one line, naming what the harness passed
        failure = _failure(exc, Path(sys.modules[cls.__module__].__file__))
        raise ImplementationError(f"{where} failed: {failure} (args holds {', '.join(vars(args))})") from None
    held = {name for name, _ in module.named_parameters()}
    if held != names:
        missing, extra = sorted(names - held), sorted(held - names)
        raise ImplementationError(f"{where} does not hold RWKV-LM's parameters: missing {missing or 'none'}, "
                                  f"unexpected {extra or 'none'}")
    return module


def _factories(module: ModuleType, head_size: int) -> tuple[Callable[..., nn.Module], Callable[..., nn.Module]]:
    time_mix_cls, channel_mix_cls = getattr(module, TIME_MIX_CLASS), getattr(module, CHANNEL_MIX_CLASS)

    def time_mix(layer_id: int, n_layer: int, n_embd: int, model_head_size: int) -> nn.Module:
        if model_head_size != head_size:
            raise ImplementationError(f"the checkout was imported for head size {head_size} (impl.head_size), the "
                                      f"model has {model_head_size}")
        return _construct(time_mix_cls, module_args(n_layer, n_embd, head_size), layer_id,
                          frozenset(CANONICAL_ATT_NAMES))

    def channel_mix(layer_id: int, n_layer: int, n_embd: int) -> nn.Module:
        return _construct(channel_mix_cls, module_args(n_layer, n_embd, head_size), layer_id, CHANNEL_MIX_NAMES)

    return time_mix, channel_mix


def make_implementation(path: str | None = None, kernel: str = DEFAULT_KERNEL, jit: bool = True,
                        head_size: int = 64, label: str | None = None) -> Implementation:
    """``impl=rwkv_lm``: the checkout at ``path`` (its ``RWKV-v7/train_temp``), imported with ``RWKV_KERNEL=kernel``
    and ``RWKV_JIT_ON=jit`` (HEAD runs only with JIT on, spec §4.4); ``label`` names the implementation
    ``rwkv_lm-<label>`` in run ids and benchmark rows, to tell several checkouts apart."""
    checkout = open_checkout(path)
    if not checkout.runs_on_cpu and not torch.cuda.is_available():
        raise ImplementationError("impl=rwkv_lm builds your checkout's CUDA kernels when it imports src/model.py and "
                                  "needs a CUDA GPU; none is available (on a CPU use impl=reference)")
    kernel, jit, head_size = str(kernel), bool(jit), int(head_size)
    module = import_checkout(checkout.path, kernel, jit, head_size)
    time_mix, channel_mix = _factories(module, head_size)
    loss = getattr(module, LOSS_FUNCTION, None)
    commit, dirty = git_state(checkout.path)
    return Implementation(
        name=f"rwkv_lm-{label}" if label else "rwkv_lm",
        time_mix=time_mix,
        channel_mix=channel_mix,
        needs_cuda=not checkout.runs_on_cpu,
        kernel_dtype=None if checkout.runs_on_cpu else torch.bfloat16,
        description=f"RWKV-LM checkout {checkout.path} ({commit or 'no git commit'}{', dirty' if dirty else ''}): "
                    f"its {TIME_MIX_CLASS}/{CHANNEL_MIX_CLASS}, RWKV_KERNEL={kernel!r}, TorchScript "
                    f"{'on' if jit else 'off'}, loss: {'its ' + LOSS_FUNCTION if loss else 'L2Wrap + cross-entropy'}",
        flags={"path": str(checkout.path), "git_commit": commit, "git_dirty": dirty, "kernel": kernel, "jit": jit,
               "loss": LOSS_FUNCTION if loss else "l2wrap+cross_entropy"},
        loss=loss,
    )

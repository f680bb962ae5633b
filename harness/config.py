"""Configuration of every command line: Hydra configs under ``conf/`` and their overrides, checked before anything
runs, so that a misspelled key, a value of the wrong type or an unknown group option is one ``error:`` line."""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Glob, Override, OverrideType
from hydra.errors import HydraException
from omegaconf import Container, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from harness.errors import HarnessError

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
BENCH_CONF_DIR = CONF_DIR / "bench"  # its own search path: the step benchmark's ``impl`` key is no config group

T = TypeVar("T")
_ABSENT = object()
# The type of a key's default -> what an override must give: (singular, plural) for the messages.
_EXPECTED = {bool: ("a bool (true or false)", "bools (true or false)"), int: ("an int", "ints"),
             float: ("a number", "numbers"), str: ("a string", "strings"), dict: ("a mapping", "mappings"),
             list: ("a list", "lists")}


def data_name(path: str | None) -> str:
    """The name of the data at ``path`` (``data.name`` of conf/data/sample.yaml, hence the experiment's): ``sample``
    for the bundled sample (no path), else the file's own name without .bin/.idx, so that a run on
    ``data.path=data/mine`` is the experiment ``<model>-mine``, apart from the sample's."""
    if path in (None, "", "sample"):
        return "sample"
    name = Path(str(path)).name
    return name.rsplit(".", 1)[0] if name.endswith((".bin", ".idx")) else name


OmegaConf.register_new_resolver("data_name", data_name)


def check_overrides(config_name: str, overrides: list[str], multirun: bool = False,
                    conf_dir: Path = CONF_DIR) -> None:
    """Raise a one-line HarnessError for an override that names an unknown key or group option, gives a value
    of another type than the key's default, or sweeps without ``multirun``; with it, each value of a sweep is
    checked (the keys against every combination of the group options swept)."""
    with _hydra(conf_dir):
        _check(config_name, [_parse(word) for word in overrides], multirun)


def compose_config(config_name: str, overrides: list[str], conf_dir: Path = CONF_DIR) -> DictConfig:
    """``config_name`` with checked ``overrides`` (see :func:`check_overrides`), one run. A key whose default is a
    list also takes ``key=a,b`` and ``key=a`` (the benchmarks' older syntax) for ``key=[a,b]`` and ``key=[a]``."""
    with _hydra(conf_dir):
        base = _compose(config_name, [])
        parsed = [_lists_written_plainly(base, _parse(word)) for word in overrides]
        _check(config_name, parsed, multirun=False)
        return _compose(config_name, [override.input_line for override in parsed])


def check_betas(key: str, betas: Any) -> None:
    """Adam's two betas, each in [0, 1); a one-line HarnessError naming ``key`` otherwise."""
    betas = list(betas)
    if len(betas) != 2 or not all(0 <= beta < 1 for beta in betas):
        raise HarnessError(f"{key} must be two numbers in [0, 1), got {betas}")


def dataclass_from(cls: type[T], cfg: DictConfig) -> T:
    """The (frozen) config dataclass ``cls`` holding ``cfg``: lists as tuples, an int given for a float default as a
    float and any plain value given for a string default as a string."""
    values = OmegaConf.to_container(cfg, resolve=True)
    names = [field.name for field in dataclasses.fields(cls)]
    if set(values) != set(names):
        raise HarnessError(f"the keys are {', '.join(names)}; none can be added (+key) or removed (~key)")
    defaults = cls()
    return cls(**{name: _like(getattr(defaults, name), values[name]) for name in names})


@contextlib.contextmanager
def _hydra(conf_dir: Path) -> Iterator[None]:
    with initialize_config_dir(str(conf_dir), job_name="harness", version_base="1.3"):
        yield


def _compose(config_name: str, overrides: list[str]) -> DictConfig:
    try:
        return compose(config_name, overrides)
    except (HydraException, OmegaConfBaseException) as exc:  # what the checks before let through, on one line
        raise HarnessError(str(exc)) from None


def _parse(word: str) -> Override:
    if "=" not in word and not word.startswith("~"):
        raise HarnessError(f"bad argument {word!r}; overrides are key=value")
    try:
        return OverridesParser.create().parse_override(word)
    except HydraException as exc:
        raise HarnessError(f"cannot parse {word!r} ({exc}); quote a value with special characters: "
                           "key='a value'") from None


def _lists_written_plainly(base: DictConfig, override: Override) -> Override:
    """``key=a,b`` or ``key=a`` as ``key=[a,b]`` or ``key=[a]`` where the key's default is a list."""
    if override.is_delete() or isinstance(override.value(), list):
        return override
    if not isinstance(OmegaConf.select(base, override.key_or_group, default=None), ListConfig):
        return override
    key, _, value = override.input_line.partition("=")
    return _parse(f"{key}=[{value}]")


def _check(config_name: str, overrides: list[Override], multirun: bool) -> None:
    ours = [override for override in overrides if not override.is_hydra_override()]  # Hydra checks its own
    if not multirun:
        for override in ours:
            if override.is_sweep_override():
                raise HarnessError(f"{override.input_line!r} gives several values where one is expected (a list is "
                                   "written key=[a,b]; python -m harness.run -m sweeps)")
    loader = GlobalHydra.instance().config_loader()
    groups, keys = [], []
    for override in ours:
        if options := loader.get_group_options(override.key_or_group):
            groups.append((override, options))
        else:
            keys.append(override)
    choices = [_group_choices(group, options) for group, options in groups]
    for combination in itertools.product(*choices):
        base = _compose(config_name, [_group_word(group, option)
                                      for (group, _), option in zip(groups, combination, strict=True)])
        for override in keys:
            _check_key(base, override)


def _values(override: Override) -> list[Any]:
    """What the override sets: one value, or each value of a sweep."""
    if not override.is_sweep_override():
        return [override.value()]
    if not override.is_discrete_sweep() or isinstance(override.value(), Glob):
        raise HarnessError(f"{override.input_line!r}: sweep a key over a,b or choice() or range()")
    return list(override.sweep_iterator())


def _group_choices(override: Override, options: list[str]) -> list[str | None]:
    """The options the override selects (None: the group is removed); one line for one that does not exist."""
    if override.is_delete():
        return [None]
    value = override.value()
    chosen = value.filter(options) if isinstance(value, Glob) else _values(override)
    for option in chosen:
        if option not in options:
            raise HarnessError(f"unknown {override.key_or_group} {option!r}; choose one of: {', '.join(options)}")
    return chosen


def _group_word(override: Override, option: str | None) -> str:
    prefix = {OverrideType.ADD: "+", OverrideType.FORCE_ADD: "++", OverrideType.DEL: "~"}.get(override.type, "")
    package = "" if override.package is None else f"@{override.package}"
    return f"{prefix}{override.key_or_group}{package}" + ("" if option is None else f"={option}")


def _check_key(base: DictConfig, override: Override) -> None:
    key = override.key_or_group
    default = OmegaConf.select(base, key, default=_ABSENT)
    if default is _ABSENT:
        if not (override.is_add() or override.is_force_add()):
            raise HarnessError(_unknown_key(base, override))
        return
    if override.is_add():
        raise HarnessError(f"{key} exists already; set it without the +: {override.input_line.lstrip('+')}")
    if override.is_delete():
        return
    default = OmegaConf.to_container(default) if isinstance(default, Container) else default
    for value in _values(override):
        _check_value(key, default, value)


def _check_value(key: str, default: Any, value: Any) -> None:
    """One line unless ``value`` fits the type of ``default``: a null default takes anything, an interpolation is
    left to Hydra, a list's elements must fit its first element."""
    if default is None or (isinstance(value, str) and "${" in value):
        return
    if not _fits(default, value):
        raise HarnessError(f"{key} expects {_EXPECTED[_kind(default)][0]}, got {value!r}")
    if isinstance(default, list) and default:
        for item in value:
            if not _fits(default[0], item):
                raise HarnessError(f"{key} expects a list of {_EXPECTED[_kind(default[0])][1]}, got {item!r} in it")


def _kind(default: Any) -> type:
    return next(kind for kind in _EXPECTED if isinstance(default, kind))  # bool before int: bool is an int


def _fits(default: Any, value: Any) -> bool:
    kind = _kind(default)
    if kind is str:  # a number is a fine string (trainer.precision=16, name=2024)
        return value is not None and not isinstance(value, list | dict)
    if kind is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, kind) and (kind is bool or not isinstance(value, bool))


def _unknown_key(base: DictConfig, override: Override) -> str:
    key = override.key_or_group
    parent = key.rpartition(".")[0]
    node = OmegaConf.select(base, parent) if parent else None
    if override.type is OverrideType.CHANGE and isinstance(node, DictConfig) and not node:  # an open mapping
        return f"{parent} is empty; add its keys with +: +{override.input_line}"
    known = _dotted_keys(OmegaConf.to_container(base, resolve=False))
    if close := difflib.get_close_matches(key, known, n=1):
        return f"unknown key {key!r}; did you mean {close[0]}?"
    siblings = [k for k in known if k.rpartition(".")[0] == parent] or [k for k in known if "." not in k]
    return f"unknown key {key!r}; the keys are: {', '.join(siblings)}"


def _dotted_keys(tree: dict, prefix: str = "") -> list[str]:
    keys = []
    for name, value in tree.items():
        keys.append(f"{prefix}{name}")
        if isinstance(value, dict):
            keys += _dotted_keys(value, f"{prefix}{name}.")
    return keys


def _like(default: Any, value: Any) -> Any:
    """``value`` in the dataclass's own type: a list as a tuple, an int as a float, a number as a string."""
    if isinstance(value, list):
        return tuple(_like(default[0], item) for item in value) if default else tuple(value)
    if isinstance(default, float | str) and not isinstance(value, type(default)):
        return type(default)(value)
    return value

"""One definition per setting: its default, its check and its one-line doc, on the dataclass field.

    quantile: float = setting(0.9, "a number in (0, 1), e.g. filter.quantile=0.9", lambda v: 0 < v < 1)

`check_settings(obj, prefix)` (called from the dataclass's __post_init__) raises a ValueError that names the key,
its value and what it must be; `defaults(cls)` gives the defaults as plain data, which launch/schema.py registers
with Hydra's ConfigStore so that the yaml files hold only what differs and an unknown key fails at compose time.
Every part of the project uses it (train's loop settings, the filter policies): it lives in the lowest package.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def int_at_least(lo: int) -> Callable[[Any], bool]:
    return lambda v: is_int(v) and v >= lo


def num_in(lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False) -> Callable[[Any], bool]:
    """A finite number between lo and hi (open or closed at either end)."""
    return lambda v: is_num(v) and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)


def setting(default: Any = dataclasses.MISSING, must: str = "", check: Callable[[Any], bool] | None = None,
            doc: str = "", *, factory: Callable[[], Any] | None = None) -> Any:
    """A dataclass field with its check (`check(value)` is true for a valid value; `must` says what a valid value
    is, with an example) and doc. Mutable defaults go through `factory`."""
    meta = {"must": must, "check": check, "doc": doc}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def check_settings(obj: Any, prefix: str = "") -> None:
    """ValueError naming `<prefix><field>=<value>` and what it must be, for the first field that fails its check."""
    for f in dataclasses.fields(obj):
        check = f.metadata.get("check")
        value = getattr(obj, f.name)
        if check is not None and not check(value):
            raise ValueError(f"{prefix}{f.name}={value!r} is invalid: must be {f.metadata['must']}")


def defaults(cls: type, exclude: tuple[str, ...] = ()) -> dict:
    """The fields' defaults as plain data (tuples as lists), for a Hydra config node; a field without a default
    is '???' (Hydra's mandatory value). A class that is no dataclass has none."""
    if not dataclasses.is_dataclass(cls):
        return {}
    out = {}
    for f in dataclasses.fields(cls):
        if f.name in exclude or not f.init:
            continue
        if f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        else:
            value = "???"
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def signature_defaults(fn: Callable, exclude: tuple[str, ...] = ()) -> dict:
    """A builder function's keyword defaults as plain data (tuples as lists), for a Hydra config node."""
    import inspect

    out = {}
    for name, p in inspect.signature(fn).parameters.items():
        if name in exclude or p.default is inspect.Parameter.empty:
            continue
        out[name] = list(p.default) if isinstance(p.default, tuple) else p.default
    return out


def docs(cls: type) -> dict[str, str]:
    """field -> its one-line doc."""
    return {f.name: f.metadata.get("doc", "") for f in dataclasses.fields(cls)}

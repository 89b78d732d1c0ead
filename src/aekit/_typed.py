"""Typed JSON: a dataclass built from JSON-decoded data, every field checked against its
type hint (config.json, the checkpoint's training state, estimator.json); and the numbers a
hyperparameter may be, Python's or numpy's (is_int, is_real), made plain for JSON (plain)."""

from __future__ import annotations

import dataclasses
import numbers
import reprlib
import types
import typing


def from_plain(cls, data: object, where: str):
    """``cls(**data)`` for JSON-decoded ``data``, every field checked against its type hint.

    Lists become tuples where the field is a tuple, nested dataclasses are built the same
    way; a missing, unknown or mistyped field raises ValueError naming it.
    """
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected an object of fields, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"{where}: unknown fields {reprlib.repr(unknown)}; was it made by a newer aekit?")
    missing = [name for name, f in fields.items() if name not in data
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ValueError(f"{where}: missing fields {missing}")
    hints = typing.get_type_hints(cls)
    return cls(**{name: conform(value, hints[name], f"{where}.{name}") for name, value in data.items()})


def conform(value: object, hint, where: str):
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (hint,) = [a for a in args if a is not type(None)]  # only Optional[X] is used
        return conform(value, hint, where)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis and isinstance(value, (list, tuple)):
        return tuple(conform(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
    if origin is tuple and isinstance(value, (list, tuple)) and len(value) == len(args):
        return tuple(conform(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict and isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: conform(v, args[1], f"{where}[{k!r}]") for k, v in value.items()}
    if origin is list and isinstance(value, list):
        return [conform(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(hint):
        return from_plain(hint, value, where)
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:  # an integer too large for a float
            raise ValueError(f"{where} must be a number a float can hold, got {reprlib.repr(value)}") from None
    if hint in (int, str, bool) and isinstance(value, hint) and (hint is bool or not isinstance(value, bool)):
        return value
    name = ("a list" if Ellipsis in args else f"a list of {len(args)} values") if origin is tuple \
        else getattr(hint, "__name__", str(hint))
    raise ValueError(f"{where} must be {name}, got {reprlib.repr(value)}")


def is_int(value: object) -> bool:
    """Whether ``value`` is an integer hyperparameter: a Python or numpy integer (what
    GridSearchCV hands out from ``np.arange``), not a bool (numpy's bool is no Integral)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value: object) -> bool:
    """Whether ``value`` is a real-number hyperparameter: a Python or numpy int or float, not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def plain(value):
    """``value`` with numpy numbers (also inside tuples and lists) as Python's int and float,
    which JSON can write (``json.dumps(np.int64(2))`` fails); anything else as it is."""
    if isinstance(value, (tuple, list)):
        return type(value)(plain(v) for v in value)
    if isinstance(value, numbers.Number) and not isinstance(value, (bool, int, float, complex)):
        return value.item() if callable(getattr(value, "item", None)) else value
    return value


__all__ = ["from_plain", "is_int", "is_real", "plain"]

"""The value checks every settings class uses: one wording per kind of value.

Each check raises :class:`~lib.errors.ParameterError` with the parameter's name, what it must
be and what it was (``"max_iter must be an int >= 1, got 0"``), and returns the value when it
is good. ``bool`` is never accepted as a number (``True`` is not an int here), and numbers must
be finite.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

from lib.errors import ParameterError

#: Field metadata of a settings field that changes how a stage runs but not what it computes
#: (``workers``): the manifest does not record it and a rerun does not compare it.
RUNTIME = {"runtime": True}


def is_int(value: Any) -> bool:
    """An ``int`` that is not a ``bool``."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A finite ``int`` or ``float`` that is not a ``bool``."""
    return (isinstance(value, int | float) and not isinstance(value, bool)
            and math.isfinite(value))


def check_int(value: Any, name: str, *, low: int, high: int | None = None) -> int:
    """``value`` if it is an int from ``low`` (to ``high``, when given)."""
    if is_int(value) and value >= low and (high is None or value <= high):
        return value
    bound = f">= {low}" if high is None else f"from {low} to {high}"
    raise ParameterError(f"{name} must be an int {bound}, got {value!r}")


def check_list(value: Any, name: str) -> tuple:
    """``value`` as a tuple if it is a list or tuple (a string is not a list here)."""
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        raise ParameterError(f"{name} must be a list, got {type(value).__name__} {value!r}")
    return tuple(value)


def check_ints(values: Any, name: str, *, low: int) -> tuple[int, ...]:
    """``values`` as a tuple if it is a list of ints, each ``>= low``."""
    if isinstance(values, str | bytes) or not isinstance(values, list | tuple):
        raise ParameterError(f"{name} must be a list of ints >= {low}, got {values!r}")
    return tuple(check_int(value, f"every value of {name}", low=low) for value in values)


def check_number(value: Any, name: str, *, low: float | None = None,
                 high: float | None = None, low_open: bool = False, high_open: bool = False,
                 unit: str = "") -> float:
    """``value`` if it is a finite number within the bounds given.

    Args:
        low, high: the bounds (None: unbounded on that side).
        low_open, high_open: the bound itself is excluded.
        unit: said after the bound, e.g. ``"pixel units"``.
    """
    ok = is_number(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if ok:
        return value
    if low is not None and high is not None:
        bound = (f"a number in {'(' if low_open else '['}{low:g}, "
                 f"{high:g}{')' if high_open else ']'}")
    elif low is not None:
        bound = f"a finite number {'>' if low_open else '>='} {low:g}"
    elif high is not None:
        bound = f"a finite number {'<' if high_open else '<='} {high:g}"
    else:
        bound = "a finite number"
    raise ParameterError(f"{name} must be {bound}{f' ({unit})' if unit else ''}, got {value!r}")


def check_positive(value: Any, name: str, *, unit: str = "") -> float:
    """``value`` if it is a finite number > 0."""
    return check_number(value, name, low=0, low_open=True, unit=unit)


def check_positives(values: Any, name: str, *, unit: str = "") -> tuple[float, ...]:
    """``values`` as a tuple if it is a list of finite numbers > 0."""
    return tuple(check_positive(value, f"every value of {name}", unit=unit)
                 for value in check_list(values, name))


def check_share(value: Any, name: str, *, above_zero: bool = False, example: str = "") -> float:
    """``value`` if it is a share: a number from 0 (or above 0) to 1.

    ``example`` reads the value for the user, e.g. ``"0.05 means 5 %"``.
    """
    if is_number(value) and (value > 0 if above_zero else value >= 0) and value <= 1:
        return value
    bound = "a share above 0 and at most 1" if above_zero else "a share from 0 to 1"
    raise ParameterError(
        f"{name} must be {bound}{f' ({example})' if example else ''}, got {value!r}")


def check_choice(value: Any, choices: Sequence[str], name: str) -> str:
    """``value`` if it is one of ``choices``."""
    if isinstance(value, str) and value in choices:
        return value
    raise ParameterError(
        f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def check_choices(values: Any, choices: Sequence[str], name: str) -> tuple[str, ...]:
    """``values`` as a tuple if it is a non-empty list of ``choices``, none twice."""
    chosen = check_list(values, name)
    if not chosen:
        raise ParameterError(
            f"{name} is empty; name at least one of {', '.join(map(repr, choices))}")
    for value in chosen:
        check_choice(value, choices, f"every value of {name}")
    if len(set(chosen)) != len(chosen):
        raise ParameterError(f"{name} lists a name twice: {list(chosen)}")
    return chosen


def check_bool(value: Any, name: str) -> bool:
    """``value`` if it is True or False."""
    if isinstance(value, bool):
        return value
    raise ParameterError(f"{name} must be True or False, got {value!r}")

"""One function per argument rule shared across the package (ops, layers, configs).

Each raises ValueError("{owner}: {name} ...") so the message names the caller (a function, a
layer, a config section) and the caller's own argument. This module imports nothing of the
project, so every floor may use it (ARCHITECTURE.md), the ops included.
"""

from __future__ import annotations

import numbers
from typing import Sequence

import numpy as np


def is_int(value, *, numpy_ints: bool = True) -> bool:
    """An integer that is not a bool; NumPy integers count unless `numpy_ints` is False (fields
    that must stay plain Python values, e.g. to be written as YAML)."""
    if isinstance(value, (bool, np.bool_)):
        return False
    return isinstance(value, numbers.Integral if numpy_ints else int)


def check_positive_int(owner: str, name: str, value, *, numpy_ints: bool = True) -> None:
    """`value` (the caller's argument `name`) must be an int >= 1 (see `is_int`)."""
    if not is_int(value, numpy_ints=numpy_ints) or value <= 0:
        raise ValueError(f"{owner}: {name} must be a positive int, got {value!r}")


def check_positive(owner: str, name: str, value) -> None:
    """`value` must be a number > 0 (NaN is refused too)."""
    if not value > 0:
        raise ValueError(f"{owner}: {name} must be positive, got {value!r}")


def check_choice(owner: str, name: str, value, choices: Sequence) -> None:
    """`value` must be one of `choices`."""
    if value not in choices:
        raise ValueError(f"{owner}: unknown {name} {value!r}; expected one of {tuple(choices)}")


def check_rope_dim(owner: str, name: str, dim: int) -> None:
    """RoPE rotates pairs (x_i, x_{i+d/2}): the rotated head dim `name` = `dim` must be even."""
    if dim % 2:
        raise ValueError(f"{owner}: RoPE needs an even {name}, got {dim}")

"""Values as plain JSON."""

from __future__ import annotations

import math
import os

import numpy as np


def to_plain_json(obj):
    """Plain JSON: numpy scalars and arrays as numbers and lists, non-finite floats as the strings
    'inf', '-inf', 'nan', paths as strings, tuples and sets as lists, anything else as its str()."""
    if isinstance(obj, dict):
        return {str(k): to_plain_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [to_plain_json(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, np.ndarray):
        return to_plain_json(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return str(obj)

"""What the commands share: the console, input shapes and numeric flags from the command line,
loading the model a command names, number formatting."""

from __future__ import annotations

import math
import sys
from typing import Sequence

from rich.console import Console

from sculpt.errors import OptionError, ShapeError
from sculpt.ir.model import Model

SHAPE_HELP = "fix an input's shape: NAME=1,3,224,224 (repeatable; the name may be left out for one input)"
SAMPLE_SHAPE_HELP = ("the shape of a dynamic input where random samples are drawn and the passes that need static "
                     "shapes work, without fixing it in the output model: NAME=1,3,48,320 (repeatable)")


def make_console(stderr: bool = False) -> Console:
    """A rich console on stdout (or stderr); outside a terminal 160 columns wide."""
    stream = sys.stderr if stderr else sys.stdout
    # outside a terminal (pipes, CI logs) use a wide fixed width instead of rich's 80 columns
    width = None if stream.isatty() else 160
    return Console(stderr=stderr, highlight=False, soft_wrap=False, width=width)


def parse_input_shapes(items: Sequence[str] | None, flag: str = "--input-shape") -> dict[str, list[int]]:
    """``NAME=1,3,48,320`` (or just ``1,3,48,320`` for a single-input model, keyed by '')."""
    shapes: dict[str, list[int]] = {}
    for item in items or []:
        name, sep, dims = item.rpartition("=")
        if not sep:
            name, dims = "", item
        name = name.strip()
        pieces = [d.strip() for d in dims.replace("x", ",").split(",")]
        if not dims.strip() or any(not d for d in pieces):
            raise ShapeError(f"{flag} '{item}': give the dimensions separated by commas, like x=1,3,224,224")
        try:
            shape = [int(d) for d in pieces]
        except ValueError:
            raise ShapeError(f"{flag} '{item}': dimensions must be integers, like x=1,3,224,224") from None
        if any(d <= 0 for d in shape):
            raise ShapeError(f"{flag} '{item}': dimensions must be positive integers, like x=1,3,224,224")
        if name in shapes and shapes[name] != shape:
            shown = f"input '{name}'" if name else "the input"
            raise ShapeError(f"{flag} given twice for {shown}: {shapes[name]} and {shape}")
        shapes[name] = shape
    return shapes


def check_number_flag(flag: str, value: float | None, *, positive: bool = False) -> None:
    """A numeric command-line flag must be finite and not negative (``positive``: above 0); NaN would
    fail every comparison made with it and pass silently."""
    if value is None:
        return
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise OptionError(f"{flag} must be a finite number {'> 0' if positive else '≥ 0'}, got {value}")


def resolve_input_shapes(model: Model, shapes: dict[str, list[int]], flag: str = "--input-shape") -> dict[str, list[int]]:
    """The shapes of ``parse_input_shapes`` with the unnamed one ('') given the single input's name."""
    if "" in shapes:
        names = model.input_names
        if len(names) != 1:
            raise ShapeError(f"{flag} without a name is only for single-input models; this one has "
                             f"{', '.join(names)}")
        shapes = {names[0] if k == "" else k: v for k, v in shapes.items()}
    return shapes


def load_model(path: str) -> Model:
    """The model at ``path``; declared shapes its nodes contradict are dropped (with a warning)."""
    model = Model.load(path)
    model.drop_conflicting_shapes()
    return model


def fmt_int(n: int | None) -> str:
    """1.23k, 4.56M, 7.89G; "?" for None."""
    if n is None:
        return "?"
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def fmt_bytes(n: int) -> str:
    """1.00 kB, 2.50 MB (binary units)."""
    for unit, div in (("GB", 2**30), ("MB", 2**20), ("kB", 2**10)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n} B"

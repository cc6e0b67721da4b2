"""The pass protocol: Pass, PassResult, PassContext and the registry of passes by name.

A pass is a dataclass configured through its constructor only (typed keyword options with
defaults). Calling it on a Model runs ``requires`` → ``run`` → ``ensures`` on a *copy* of the
model, so a pass that fails leaves its input untouched and never returns a half-edited model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import numbers
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterator, Literal, Mapping

from sculpt.errors import InvalidModelError, OptionError, PassError
from sculpt.ir.model import Model, check_invariants, describe_cycle


def _refuse_cyclic_input(model: Model) -> None:
    """A cycle is the input's defect, whatever pass meets it first: say so before any pass runs."""
    try:
        check_invariants(model)
    except InvalidModelError:
        cycle = describe_cycle(model)
        if cycle:
            raise InvalidModelError(cycle) from None


@dataclass
class PassContext:
    """What a pass may need beyond its options: data and shapes, set by the pipeline.

    ``calibration`` holds the samples a pass may fit to; the pipeline keeps ``held_out`` samples apart
    (``CalibrationSet.split``) and measures every error on those. A pass that reports an error of its
    own measures it on ``held_out`` when it is set; it never fits to it. ``teacher`` is the pipeline's
    input model, untouched by the passes (what ``distill`` trains the current model to reproduce)."""

    calibration: Any = None  # sculpt.ir.calibration.CalibrationSet: the fitting samples
    input_shapes: dict[str, list[int]] = field(default_factory=dict)
    seed: int = 0
    held_out: Any = None  # sculpt.ir.calibration.CalibrationSet: samples no pass fits to, or None
    teacher: Any = None  # sculpt.ir.model.Model: the pipeline's input model (before the first pass), or None
    # concrete shapes of the dynamic inputs (the calibration samples' or --sample-shape): a pass that needs
    # static shapes runs there and its result keeps the dynamic dimensions (sculpt.passes.working_shapes)
    working_shapes: dict[str, list[int]] = field(default_factory=dict)
    probe_shapes: dict[str, list[int]] | None = None  # where results are checked to still run; found once


@dataclass
class PassResult:
    model: Model
    modified: bool
    stats: dict[str, Any] = field(default_factory=dict)


class Pass:
    """Base class. Subclasses are dataclasses and set ``name``, ``exact`` and a docstring.

    - ``exact``: the pass must not change the model's outputs (checked by ``verify_each``);
      lossy passes have their error measured and reported.
    - ``requires(model, ctx)``: raise PassError naming the node when the model does not fit.
    - ``run(model, ctx)``: edit ``model`` (already a private copy) and return a PassResult.
    - ``ensures(model, ctx)``: postconditions, checked after ``run``.
    """

    name: ClassVar[str] = ""
    exact: ClassVar[bool] = True
    needs_calibration: ClassVar[bool] = False
    needs_static_shapes: ClassVar[bool] = False

    def requires(self, model: Model, ctx: PassContext) -> None:
        if self.needs_static_shapes:
            try:
                model.require_static_inputs(f"pass '{self.name}'")
            except Exception as e:
                raise PassError(self.name, f"{e} (fixes the output model's shape), or --sample-shape or "
                                           "calibration data (works at their shape, keeps the model dynamic)") from None
        if self.needs_calibration and ctx.calibration is None:
            raise PassError(self.name, "needs calibration data: give --calibration (an .npz, an image "
                                       "folder or 'random')")

    def run(self, model: Model, ctx: PassContext) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def ensures(self, model: Model, ctx: PassContext) -> None:
        return None

    def __call__(self, model: Model, ctx: PassContext | None = None, *, copy: bool = True) -> PassResult:
        ctx = ctx or PassContext()
        if not isinstance(model, Model):
            model = Model.load(model)
            copy = False
        work = model.clone() if copy else model
        _refuse_cyclic_input(work)
        if self.needs_static_shapes and ctx.working_shapes and work.dynamic_inputs():
            from sculpt.passes.working_shapes import run_at_working_shapes

            result = run_at_working_shapes(self, work, ctx)
        else:
            result = self.run_checked(work, ctx)
        if result.modified:
            # cheap structural invariants (topological order, unique names, nothing dangling): a pass
            # never hands back a half-edited graph
            try:
                check_invariants(result.model)
            except InvalidModelError as e:
                if copy:  # the input is intact: a defect it already had is the input's, not the pass's
                    try:
                        check_invariants(model)
                    except InvalidModelError as original:
                        raise InvalidModelError(f"the input model is invalid: {original}") from None
                raise PassError(self.name, f"produced an invalid model ({e})") from None
        return result

    def run_checked(self, work: Model, ctx: PassContext) -> PassResult:
        """``requires`` → ``run`` → ``ensures`` on ``work`` (edited in place)."""
        with work.indexed():  # lookups by name answer from one graph index while the pass runs
            self.requires(work, ctx)
            result = self.run(work, ctx)
            self.ensures(result.model, ctx)
        return result

    # ---------------------------------------------------------------- options
    @classmethod
    def options(cls) -> list["OptionSpec"]:
        hints = typing.get_type_hints(cls)
        # a pass's own options first, then those it inherits (the shared layer selection, say)
        declared = list(dict.fromkeys(n for k in cls.__mro__ for n in vars(k).get("__annotations__", {})))
        specs = []
        for f in sorted(dataclasses.fields(cls), key=lambda f: declared.index(f.name) if f.name in declared else 0):
            if not f.init or f.name.startswith("_"):
                continue
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
            specs.append(OptionSpec(f.name, hints.get(f.name, str), default, f.metadata.get("help", "")))
        return specs

    def config(self) -> dict[str, Any]:
        return {s.name: getattr(self, s.name) for s in self.options()}

    def describe(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{self.name}({opts})" if opts else self.name


@dataclass
class OptionSpec:
    name: str
    type: Any
    default: Any
    help: str = ""

    def type_name(self) -> str:
        return _type_name(self.type)


def option(default: Any = dataclasses.MISSING, *, help: str = "", default_factory: Any = dataclasses.MISSING):
    """A pass option: a dataclass field with a help text."""
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata={"help": help})
    return field(default=default, metadata={"help": help})


def allow_plain_initializers(model: Model) -> None:
    """Before IR version 4 every initializer had to be a graph input too. Passes that add constants
    raise such models to IR 4 (same semantics, valid for opsets up to 9) instead."""
    if model.proto.ir_version < 4:
        model.proto.ir_version = 4


# ------------------------------------------------------------------ registry
_REGISTRY: dict[str, type[Pass]] = {}


def register(cls: type[Pass]) -> type[Pass]:
    """Class decorator: register a pass under ``cls.name``."""
    if not cls.name:
        raise TypeError(f"{cls.__name__} has no name")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise TypeError(f"two passes named '{cls.name}': {_REGISTRY[cls.name].__name__} and {cls.__name__}")
    _REGISTRY[cls.name] = cls
    return cls


@contextlib.contextmanager
def registered_temporarily(*classes: type[Pass]) -> Iterator[None]:
    """Register passes for the length of a ``with`` block (for tests): inside it they are known by
    name everywhere a registered pass is (``create_pass``, pipelines, the CLI), afterwards they are
    forgotten. A name already taken, by a built-in pass too, is refused as ``register`` refuses it."""
    registered_passes()  # the built-in passes first, so that a clash with one of them is seen
    added: list[type[Pass]] = []
    try:
        for cls in classes:
            if _REGISTRY.get(cls.name) is not cls:
                register(cls)
                added.append(cls)
        yield
    finally:
        for cls in added:
            if _REGISTRY.get(cls.name) is cls:
                del _REGISTRY[cls.name]


def registered_passes() -> dict[str, type[Pass]]:
    import sculpt.passes  # noqa: F401  (registers the built-in passes)

    return dict(sorted(_REGISTRY.items()))


def get_pass_class(name: str) -> type[Pass]:
    passes = registered_passes()
    if name not in passes:
        close = [n for n in passes if name.replace("_", "-") == n]
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise OptionError(f"unknown pass '{name}'{hint}; known passes: {', '.join(passes)}")
    return passes[name]


def create_pass(name: str, options: Mapping[str, Any] | None = None) -> Pass:
    """Instantiate a registered pass, coercing option values (strings from the CLI included)."""
    cls = get_pass_class(name)
    specs = {s.name: s for s in cls.options()}
    kwargs = {}
    for key, value in (options or {}).items():
        key_norm = str(key).replace("-", "_")
        if key_norm not in specs:
            known = ", ".join(specs) or "none"
            raise OptionError(f"pass '{name}' has no option '{key}' (its options: {known})")
        if key_norm in kwargs:  # max-rounds and max_rounds: one option given twice
            raise OptionError(f"pass '{name}': option '{key_norm}' is given twice")
        kwargs[key_norm] = coerce_option(name, key_norm, specs[key_norm].type, value)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise OptionError(f"pass '{name}': {e}") from None


def parse_pass_spec(spec: str) -> tuple[str, dict[str, str]]:
    """``NAME[:KEY=VALUE,...]`` → (name, {key: value}). Values may not contain commas, except inside
    brackets (``layers=[a,b]``)."""
    name, _, rest = spec.partition(":")
    name = name.strip()
    if not name:
        raise OptionError(f"empty pass name in '{spec}'")
    options: dict[str, str] = {}
    if rest.strip():
        for item in _split_top_level(rest):
            if "=" not in item:
                raise OptionError(f"pass '{name}': option '{item}' is not KEY=VALUE")
            k, v = item.split("=", 1)
            k = k.strip()
            if k.replace("-", "_") in {o.replace("-", "_") for o in options}:
                raise OptionError(f"pass '{name}': option '{k}' is given twice")
            options[k] = v.strip()
    return name, options


def _split_top_level(text: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch in "[(":
            depth += 1
        elif ch in "])":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if cur.strip():
        parts.append(cur)
    return [p.strip() for p in parts if p.strip()]


def coerce_option(pass_name: str, key: str, typ: Any, value: Any) -> Any:
    def bad(expected: str):
        return OptionError(f"pass '{pass_name}': option '{key}' expects {expected}, got {value!r}")

    origin = typing.get_origin(typ)
    args = typing.get_args(typ)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce_option(pass_name, key, a, value)
            except OptionError as e:
                errors.append(e)
        raise bad(_type_name(typ))
    if origin is Literal:
        for a in args:
            if value == a or (isinstance(value, str) and str(a) == value):
                return a
        raise bad("one of " + ", ".join(repr(a) for a in args))
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise bad("true or false")
    if typ is int:
        if isinstance(value, bool):
            raise bad("an integer")
        try:
            if isinstance(value, str):
                return int(value, 0)
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        except (TypeError, ValueError):
            raise bad("an integer") from None
    if typ is float:
        if isinstance(value, bool):
            raise bad("a number")
        try:
            number = float(value)
        except (TypeError, ValueError, OverflowError):
            raise bad("a number") from None
        if not math.isfinite(number):
            raise bad("a finite number")
        return number
    if typ is str:
        if isinstance(value, (dict, list)):
            raise bad("a string")
        return str(value)
    if origin in (list, tuple):
        items = value
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("[") and text.endswith("]"):
                text = text[1:-1]
            items = [t.strip() for t in text.replace(";", ",").split(",") if t.strip()] if text else []
        if not isinstance(items, (list, tuple)):
            raise bad(_type_name(typ))
        elem = args[0] if args else str
        out = [coerce_option(pass_name, key, elem, v) for v in items]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, Mapping):
            raise bad("a mapping")
        kt, vt = args if args else (str, Any)
        return {coerce_option(pass_name, key, kt, k): (v if vt is Any else coerce_option(pass_name, key, vt, v))
                for k, v in value.items()}
    return value


# upper bounds of numeric options shared by several passes (beyond them a value is a mistake, and some
# would overflow: ridge · the features' energy, positions as an index, rounds as a loop count)
MAX_POSITIONS = 2**31 - 1
MAX_RIDGE = 1e6
MAX_ROUNDS = 1000
MAX_TENSOR_MB = 1e6  # a terabyte


def check_range(name: str, value: Any, low: float | None = None, high: float | None = None, *,
                low_open: bool = False, high_open: bool = False) -> None:
    """Raise ValueError naming option ``name`` unless ``value`` is a finite number within the bounds
    (NaN fails every comparison, so ``value < low`` alone would let it through)."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and (
        isinstance(value, numbers.Integral) or math.isfinite(value))
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if ok:
        return
    text = lambda v: f"{v:g}" if isinstance(v, float) else str(v)  # noqa: E731
    if low is not None and high is not None:
        want = f"in {'(' if low_open else '['}{text(low)}, {text(high)}{')' if high_open else ']'}"
    elif low is not None:
        want = f"{'>' if low_open else '≥'} {text(low)}"
    elif high is not None:
        want = f"{'<' if high_open else '≤'} {text(high)}"
    else:
        want = "a finite number"
    shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:40] + "..."
    raise ValueError(f"{name} must be {want}, got {shown}")


def _type_name(typ: Any) -> str:
    origin = typing.get_origin(typ)
    args = typing.get_args(typ)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is Literal:
        return "|".join(str(a) for a in args)
    if origin in (list, tuple):
        return f"list[{_type_name(args[0]) if args else 'str'}]"
    if origin is dict:
        return "mapping"
    if typ is type(None):
        return "none"
    return getattr(typ, "__name__", str(typ))


PassFactory = Callable[..., Pass]

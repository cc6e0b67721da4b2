"""distill: recover a compressed model by training its float weights to match the original model.

The teacher is the pipeline's input model (``PassContext.teacher``: the model before the first
pass), the data the calibration samples (no labels needed). The graph is not rebuilt: the trained
values go back into the same initializers, so node order, names and shapes stay as the compression
passes left them. The weights kept are those at the lowest error on samples held out of the
calibration data (a ``held_out_fraction`` of the fitting samples; the pipeline's own held-out
samples are never seen), measured before the first step too: the pass never returns a model worse
than its input on those samples. Training runs in PyTorch (the optional ``train`` extra).

After ``qdq`` it is quantization-aware fine-tuning: the integer weights behind each DequantizeLinear
train as their float values through the fake-quantized graph (rounding with a straight-through
gradient; scales and zero points fixed) and go back as integers into the same initializers, so the
result is the same QDQ layout onnxruntime fuses into its int8 kernels.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Literal

import numpy as np
from onnx import numpy_helper

from sculpt.errors import PassError, SculptError
from sculpt.ir.calibration import held_out_indices
from sculpt.ir.model import Model
from sculpt.passes.base import Pass, PassContext, PassResult, check_range, option, register

MAX_STEPS = 10_000_000


@register
@dataclass
class Distill(Pass):
    """Fine-tune the float weights to reproduce the pipeline's input model (knowledge distillation)."""

    name = "distill"
    exact = False
    needs_calibration = True

    steps: int = option(300, help="optimizer steps (ignored when epochs is set)")
    epochs: float = option(0.0, help="passes over the training samples; 0: use steps")
    batch_size: int = option(8, help="samples per step")
    learning_rate: float = option(1e-4, help="peak learning rate (AdamW), reached after the warm-up, then cosine to 0")
    warmup: float = option(0.05, help="linear warm-up, as a fraction of the steps")
    weight_decay: float = option(0.0, help="AdamW weight decay")
    temperature: float = option(1.0, help="temperature of the KL loss")
    loss: Literal["auto", "kl", "mse"] = option(
        "auto", help="auto: KL at the temperature for an output made by a Softmax over its last axis, MSE otherwise")
    train: list[str] = option(default_factory=lambda: ["all"], help=(
        "which float weights train: all; changed (those a pass added or changed against the teacher); "
        "or fnmatch patterns of initializer or node names"))
    hints: list[str] = option(default_factory=list, help=(
        "fnmatch patterns of intermediate tensors to match too (MSE, relative): those of the same name in both "
        "graphs, of the same shape or pruned by channel-pruning (then against the teacher's kept channels); "
        "others are skipped"))
    hint_weight: float = option(1.0, help="weight of the hint loss against the output loss")
    seed: int = option(0, help="sample order and initial state; the same seed gives the same weights")
    held_out_fraction: float = option(0.2, help="fraction of the calibration samples kept apart to pick the best "
                                                "checkpoint by")
    eval_every: int = option(0, help="steps between held-out measurements; 0: a twentieth of the steps")
    max_grad_norm: float = option(1.0, help="gradient-norm clipping; 0: none")
    threads: int = option(1, help="PyTorch threads; 0: its default. 1 by default: on a shared 2-core machine two "
                                  "OpenMP threads ran a step 50x slower than one")
    progress: bool = option(True, help="show a progress bar")

    def __post_init__(self):
        check_range("steps", self.steps, 1, MAX_STEPS)
        check_range("epochs", self.epochs, 0, 1e6)
        check_range("batch_size", self.batch_size, 1, 1 << 16)
        check_range("learning_rate", self.learning_rate, 0, 10, low_open=True)
        check_range("warmup", self.warmup, 0, 1, high_open=True)
        check_range("weight_decay", self.weight_decay, 0, 10)
        check_range("temperature", self.temperature, 0, 1e3, low_open=True)
        check_range("held_out_fraction", self.held_out_fraction, 0, 1, low_open=True, high_open=True)
        check_range("eval_every", self.eval_every, 0, MAX_STEPS)
        check_range("max_grad_norm", self.max_grad_norm, 0, 1e6)
        check_range("threads", self.threads, 0, 1024)
        check_range("hint_weight", self.hint_weight, 0, 1e6)
        if not self.train:
            raise ValueError("train must be 'all', 'changed' or fnmatch patterns, got nothing")

    def requires(self, model: Model, ctx: PassContext) -> None:
        super().requires(model, ctx)
        if getattr(ctx, "teacher", None) is None:
            raise PassError(self.name, "needs a teacher: run it in a pipeline, whose input model is the teacher")
        if len(ctx.calibration) < 2:
            raise PassError(self.name, f"needs at least 2 calibration samples (one to train on, one held out), "
                                       f"got {len(ctx.calibration)}")

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        from sculpt.training import require_torch

        require_torch(f"pass '{self.name}'")
        from sculpt.training.distillation import DistillConfig, distill
        from sculpt.training.onnx_to_torch import UnconvertibleModelError, trainable_initializers

        teacher: Model = ctx.teacher
        names = self.selected_weights(model, teacher, trainable_initializers(model))
        if not names:
            raise PassError(self.name, f"no float weight matches train={','.join(self.train)}")
        data = ctx.calibration  # read a sample at a time: a source of thousands of samples streams
        count = len(data)
        held = held_out_indices(count, max(1, min(count - 1, round(self.held_out_fraction * count))))
        held_set = set(held)
        train = data.subset([k for k in range(count) if k not in held_set], "distillation training samples")
        held_out = data.subset(held, "distillation held-out samples")
        hints, hint_channels, skipped_hints = self.hint_tensors(model, teacher, train[0])
        steps = self.steps
        if self.epochs:
            steps = max(1, int(np.ceil(self.epochs * len(train) / min(self.batch_size, len(train)))))
        config = DistillConfig(steps=steps, batch_size=self.batch_size, learning_rate=self.learning_rate,
                               warmup_steps=int(self.warmup * steps), weight_decay=self.weight_decay,
                               temperature=self.temperature, loss=self.loss, seed=self.seed + ctx.seed,
                               eval_every=self.eval_every or max(1, steps // 20), max_grad_norm=self.max_grad_norm,
                               threads=self.threads, hints=tuple(hints), hint_channels=hint_channels,
                               hint_weight=self.hint_weight)
        try:
            values, report = distill(model, teacher, train, held_out, names, config, progress=self.progress)
        except UnconvertibleModelError as e:
            raise PassError(self.name, str(e)) from None
        except SculptError as e:
            raise PassError(self.name, str(e)) from None
        stats = {"trained_weights": len(names), "steps": report.steps, "best_step": report.best_step,
                 "held_out_error_before": report.initial_error, "held_out_error_after": report.best_error,
                 "training_samples": len(train), "held_out_samples": len(held_out),
                 "losses": report.losses, "conversion_error": report.conversion_error,
                 "seconds": round(report.seconds, 1), "hints": hints, "hints_through_kept_channels": sorted(hint_channels),
                 "hints_skipped": skipped_hints,
                 "history": [[step, None if np.isnan(loss) else round(loss, 6), round(error, 6)]
                             for step, loss, error in report.history]}
        if values is None:
            return PassResult(model, False, stats)
        write_back(model, values)
        return PassResult(model, True, stats)

    def ensures(self, model: Model, ctx: PassContext) -> None:
        model.verify(full_check=True)

    def hint_tensors(self, model: Model, teacher: Model, sample) -> tuple[list[str], dict, dict[str, str]]:
        """The float tensors the ``hints`` patterns name that both graphs hold: (their names; for those
        whose channels were pruned, {name: (axis, kept indices into the teacher's channels)} from the
        kept-channel record channel-pruning leaves in the model; {skipped name: why}). Shapes are
        measured on ``sample`` (one calibration sample): ONNX shape inference leaves many of the
        original models' tensors unknown."""
        if not self.hints:
            return [], {}, {}
        from sculpt.passes.channel_pruning import kept_channels
        from sculpt.runtime import make_session

        outputs = set(model.output_names)
        teacher_produced = {o for n in teacher.graph.node for o in n.output}
        named = [o for n in model.graph.node for o in n.output
                 if o and o not in outputs and any(fnmatch.fnmatchcase(o, p) for p in self.hints)]
        skipped = {name: "not in the teacher" for name in named if name not in teacher_produced}
        named = [name for name in named if name in teacher_produced]
        if not named:
            return [], {}, skipped
        shapes, teacher_shapes = ({name: (value.dtype, list(value.shape)) for name, value in
                                   zip(named, make_session(m, extra_outputs=named).run(named, dict(sample)))}
                                  for m in (model, teacher))
        record = kept_channels(model)
        kept, channels = [], {}
        for name in named:
            (dtype, shape), (_, want) = shapes[name], teacher_shapes[name]
            if dtype not in (np.float32, np.float64):
                skipped[name] = f"not a float tensor ({dtype})"
            elif shape == want:
                kept.append(name)
            elif (why := _channel_mismatch(shape, want, record.get(name))) is None:
                kept.append(name)
                channels[name] = (record[name].axis, record[name].kept)
            else:
                skipped[name] = why
        return kept, channels, skipped

    def selected_weights(self, model: Model, teacher: Model, candidates: list[str]) -> list[str]:
        """The trainable initializers the ``train`` option picks, in graph order."""
        if self.train == ["all"]:
            return candidates
        if self.train == ["changed"]:
            original = teacher.initializer_map()
            changed = []
            for name in candidates:
                before = original.get(name)
                if before is None or list(before.dims) != list(model.initializer_map()[name].dims) or not np.array_equal(
                        numpy_helper.to_array(before), numpy_helper.to_array(model.initializer_map()[name])):
                    changed.append(name)
            return changed
        users: dict[str, list[str]] = {}
        for node in model.graph.node:
            for name in node.input:
                users.setdefault(name, []).append(node.name)
        return [name for name in candidates
                if any(fnmatch.fnmatchcase(n, p) for p in self.train for n in [name] + users.get(name, []))]


def _channel_mismatch(shape: list[int], want: list[int], record) -> str | None:
    """Why the student's ``shape`` is not the teacher's ``want`` restricted to the recorded kept
    channels, or None when it is."""
    if record is None:
        return f"shape {shape} is not the teacher's {want} and no kept-channel record names it"
    axis = record.axis
    if len(shape) != len(want) or not 0 <= axis < len(shape):
        return f"shape {shape} is not the teacher's {want}"
    if want[axis] != record.size or shape[axis] != len(record.kept) or int(record.kept.max()) >= want[axis]:
        return (f"the kept-channel record ({len(record.kept)} of {record.size} on axis {axis}) does not fit "
                f"the student's {shape} and the teacher's {want}")
    if [d for k, d in enumerate(shape) if k != axis] != [d for k, d in enumerate(want) if k != axis]:
        return f"shape {shape} differs from the teacher's {want} off the channel axis"
    return None


def write_back(model: Model, values: dict[str, np.ndarray]) -> None:
    """Trained values into the same initializers (same name, element type, shape and position)."""
    tensors = model.initializer_map()
    for name, value in values.items():
        tensor = tensors[name]
        original = numpy_helper.to_array(tensor)
        if value.shape != original.shape or not np.isfinite(value).all():
            raise PassError("distill", f"trained weight '{name}' has shape {list(value.shape)} or non-finite values; "
                                       "nothing is kept")
        tensor.CopyFrom(numpy_helper.from_array(value.astype(original.dtype), name))

"""Knowledge distillation on the ONNX graph: train a student graph's float weights to reproduce a
teacher's outputs on unlabeled samples (the mechanism; the ``distill`` pass holds the policy).

The teacher runs in onnxruntime on each batch as it is drawn (its outputs are the targets; nothing
is held but the batch, so the samples stream); the student runs as
a :class:`~sculpt.training.onnx_to_torch.GraphModule`, checked against onnxruntime first. AdamW,
cosine learning rate after a linear warm-up, gradient-norm clipping. The loss of every output is KL
divergence at a temperature for probability outputs (produced by a Softmax over the last axis: the
student's logits are the Softmax input) and MSE relative to the teacher's mean square otherwise.
The held-out error (the same loss on samples never trained on) is measured before the first step
and every ``eval_every`` steps; the weights at the lowest held-out error are kept, and none are
returned when training never beat the input.

Imports torch: import only after :func:`sculpt.training.require_torch`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import torch

from sculpt.errors import SculptError
from sculpt.ir.model import Model
from sculpt.training.onnx_to_torch import GraphModule, check_against_onnxruntime

LOSS_KINDS = ("auto", "kl", "mse")


@dataclass
class DistillConfig:
    steps: int = 300
    batch_size: int = 8
    learning_rate: float = 1e-4
    warmup_steps: int = 0
    weight_decay: float = 0.0
    temperature: float = 1.0
    loss: str = "auto"
    seed: int = 0
    eval_every: int = 25
    max_grad_norm: float = 1.0
    threads: int = 0  # 0: torch's default
    hints: tuple[str, ...] = ()  # intermediate tensors of the same name in both graphs: MSE on them
    # hints whose channels were pruned: {name: (axis, kept indices)}, the teacher's tensor restricted to those
    hint_channels: Mapping[str, tuple[int, np.ndarray]] = field(default_factory=dict)
    hint_weight: float = 1.0


@dataclass
class DistillReport:
    steps: int
    best_step: int  # 0: the input weights were the best (nothing is returned)
    initial_error: float
    best_error: float
    seconds: float
    conversion_error: float
    losses: dict[str, str] = field(default_factory=dict)  # output → "kl" or "mse"
    history: list[tuple[int, float, float]] = field(default_factory=list)  # (step, train loss, held-out error)


class _Objective:
    """The per-output losses, the targets made from the teacher's outputs."""

    def __init__(self, student: Model, module: GraphModule, kind: str, temperature: float,
                 hints: Sequence[str] = (), hint_weight: float = 1.0,
                 hint_channels: Mapping[str, tuple[int, np.ndarray]] | None = None):
        self.temperature = temperature
        self.kinds: dict[str, str] = {}
        self.hints = [h for h in hints if h not in module.output_names]
        self.hint_channels = dict(hint_channels or {})
        self.hint_weight = hint_weight
        module.extra_outputs.extend(self.hints)
        self.logits: dict[str, str] = {}  # output → the student tensor its KL loss reads
        producers = {o: n for n in student.graph.node for o in n.output}
        for name in module.output_names:
            node = producers.get(name)
            shape = student.static_shape(name)
            rank = len(shape) if shape is not None else None
            is_softmax = node is not None and node.op_type == "Softmax" and rank is not None and (
                _attr(node, "axis", -1 if student.opset >= 13 else 1) % max(rank, 1) == rank - 1)
            chosen = kind if kind != "auto" else ("kl" if is_softmax else "mse")
            self.kinds[name] = chosen
            if chosen == "kl" and is_softmax:
                self.logits[name] = node.input[0]
                module.extra_outputs.append(node.input[0])

    def targets(self, outputs: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
        out = {}
        for name, value in outputs.items():
            if name in self.hint_channels:  # a pruned tensor: the teacher's channels the student kept
                axis, kept = self.hint_channels[name]
                value = np.take(value, kept, axis=axis)
            t = torch.from_numpy(np.asarray(value, dtype=np.float32))
            if self.kinds.get(name) == "kl":
                logp = torch.log(t.clamp_min(1e-30)) if name in self.logits else t
                out[name] = torch.softmax(logp / self.temperature, dim=-1)
            else:
                out[name] = t
        return out

    def __call__(self, got: Mapping[str, torch.Tensor], want: Mapping[str, torch.Tensor]) -> torch.Tensor:
        total = 0.0
        for name, kind in self.kinds.items():
            target = want[name]
            if kind == "kl":
                source = got[self.logits.get(name, name)]
                logq = torch.log_softmax(source / self.temperature, dim=-1)
                kl = (target * (torch.log(target.clamp_min(1e-30)) - logq)).sum(-1)
                total = total + kl.mean() * self.temperature ** 2
            else:
                scale = target.pow(2).mean().clamp_min(1e-12)
                total = total + (got[name] - target).pow(2).mean() / scale
        total = total / max(len(self.kinds), 1)
        if self.hints:
            hint = 0.0
            for name in self.hints:
                scale = want[name].pow(2).mean().clamp_min(1e-12)
                hint = hint + (got[name] - want[name]).pow(2).mean() / scale
            total = total + self.hint_weight * hint / len(self.hints)
        return total


def _attr(node, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return a.i
    return default


def _stack(samples: Sequence[Mapping[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.stack([np.asarray(s[k]) for s in samples])) for k in samples[0]}


def distill(student: Model, teacher: Model, train: Sequence[Mapping[str, np.ndarray]],
            held_out: Sequence[Mapping[str, np.ndarray]], trainable: Sequence[str], config: DistillConfig,
            *, progress: bool = True) -> tuple[dict[str, np.ndarray] | None, DistillReport]:
    """Train ``trainable`` initializers of ``student`` towards ``teacher``'s outputs. Returns the best
    weights by held-out error ({initializer: value}), or None when no step beat the input, and the
    report. ``train`` and ``held_out`` are indexable (a CalibrationSet reads each sample when asked);
    every sample is one model input (batch axis included, as the calibration data gives it); samples
    are batched by stacking them on a new leading axis (``torch.func.vmap``)."""
    from sculpt.runtime import make_session

    start = time.perf_counter()
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    missing = [n for n in student.output_names if n not in teacher.output_names]
    if missing:
        raise SculptError(f"the student's output '{missing[0]}' is not an output of the teacher model; "
                          "distillation matches outputs by name")
    module = GraphModule(student, trainable)
    conversion_error = check_against_onnxruntime(module, student, [held_out[0], train[0]])
    objective = _Objective(student, module, config.loss, config.temperature, config.hints, config.hint_weight,
                           config.hint_channels)

    session = make_session(teacher, extra_outputs=objective.hints)
    names = module.output_names + objective.hints
    batched = torch.func.vmap(lambda feeds: module(feeds))

    def run_batch(samples):
        """The loss on ``samples``; the teacher's targets are made as the batch is (nothing is stored:
        a calibration source of thousands of samples streams through)."""
        targets = [objective.targets(dict(zip(names, session.run(names, dict(s))))) for s in samples]
        got = batched(_stack(samples))
        want = {k: torch.stack([t[k] for t in targets]) for k in targets[0]}
        return objective(got, want)

    def held_out_error() -> float:
        with torch.no_grad():
            total = 0.0
            for k in range(0, len(held_out), config.batch_size):
                chunk = [held_out[j] for j in range(k, min(k + config.batch_size, len(held_out)))]
                total += float(run_batch(chunk)) * len(chunk)
        return total / len(held_out)

    optimizer = torch.optim.AdamW(module.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    warmup = config.warmup_steps

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress_ = (step - warmup) / max(config.steps - warmup, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress_, 1.0)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    rng = np.random.default_rng(config.seed)
    order: list[int] = []

    initial = held_out_error()
    best_error, best_step, best_values = initial, 0, None
    history: list[tuple[int, float, float]] = [(0, float("nan"), initial)]
    running = None
    with _progress_bar(progress, config.steps, initial) as bar:
        for step in range(1, config.steps + 1):
            picked = []
            while len(picked) < min(config.batch_size, len(train)):
                if not order:
                    order = list(rng.permutation(len(train)))
                picked.append(int(order.pop()))
            module.train()
            loss = run_batch([train[k] for k in picked])
            if not math.isfinite(loss.item()):
                break  # a diverged run: the best weights so far stand
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(module.parameters(), config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            value = loss.item()
            running = value if running is None else 0.9 * running + 0.1 * value
            error = None
            if step % config.eval_every == 0 or step == config.steps:
                error = held_out_error()
                history.append((step, running, error))
                values = module.trained_values()
                if error < best_error and all(np.isfinite(v).all() for v in values.values()):
                    best_error, best_step, best_values = error, step, values
            bar(step, running, error, best_error)
    report = DistillReport(config.steps, best_step, initial, best_error, time.perf_counter() - start,
                           conversion_error, dict(objective.kinds), history)
    return best_values, report


class _progress_bar:
    """A rich progress bar: step, loss (running mean), held-out error (latest and best)."""

    def __init__(self, enabled: bool, steps: int, initial: float):
        self.enabled, self.steps, self.initial = enabled, steps, initial
        self.progress = None
        self.held = initial

    def __enter__(self):
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.progress = Progress(TextColumn("distill"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
                                     console=Console(stderr=True), transient=True)
            self.progress.__enter__()
            self.task = self.progress.add_task("distill", total=self.steps,
                                               info=f"held-out {self.initial:.4g}")
        return self

    def __call__(self, step: int, loss: float | None, error: float | None, best: float) -> None:
        if self.progress is None:
            return
        if error is not None:
            self.held = error
        self.progress.update(self.task, completed=step,
                             info=f"loss {loss:.4g}  held-out {self.held:.4g} (best {best:.4g})")

    def __exit__(self, *exc):
        if self.progress is not None:
            self.progress.__exit__(*exc)
        return False

"""Relax rewrite: inference-mode batch normalization with constant statistics as ``x * scale + shift``.

Canonicalization folds a BatchNormalization into the conv before it; one that follows a concat
(DenseNet's pre-activation blocks: concat -> BN -> ReLU -> conv) stays, and TVM imports it as
``nn.batch_norm``, an op of its own that returns a tuple. As a per-channel multiply and add it is
an elementwise op like any other: it fuses, and it keeps a channel-blocked layout going through it
(blocked_layout). ``scale = gamma / sqrt(var + eps)`` and ``shift = beta - mean * scale`` are
computed in float64 and rounded once, as onnxruntime folds it."""

from __future__ import annotations

import numpy as np

from sculpt.backends.tvm.kernels.relax_rewrite import constant_value, rewrite_calls, static_shape


def rewrite_batch_norm_as_affine(mod):
    """``mod`` with every inference batch_norm over axis 1 of a static 4-D float32 tensor with
    constant parameters replaced by a multiply and an add (its tuple's statistics stay constants)."""
    from tvm import relax

    def rule(call, rewriter):
        if getattr(call.op, "name", "") != "relax.nn.batch_norm" or len(call.args) != 5:
            return None
        a = call.attrs
        x = call.args[0]
        shape = static_shape(x)
        params = [constant_value(rewriter.bound(p)) for p in call.args[1:]]
        if (bool(a.training) or int(a.axis) != 1 or shape is None or len(shape) != 4
                or str(x.ty.dtype) != "float32" or any(p is None for p in params)):
            return None
        gamma, beta, mean, var = (p.numpy().astype(np.float64) for p in params)
        if not (bool(a.scale)):
            gamma = np.ones_like(gamma)
        if not (bool(a.center)):
            beta = np.zeros_like(beta)
        if any(v.shape != (shape[1],) for v in (gamma, beta, mean, var)):
            return None
        scale = gamma / np.sqrt(var + float(a.epsilon))
        shift = beta - mean * scale
        per_channel = (1, shape[1], 1, 1)
        scaled = rewriter.emit(relax.op.multiply(x, relax.const(scale.astype(np.float32).reshape(per_channel))))
        out = rewriter.emit(relax.op.add(scaled, relax.const(shift.astype(np.float32).reshape(per_channel))))
        return relax.Tuple([out, call.args[3], call.args[4]])

    rewritten = rewrite_calls(mod, rule)
    # the tuple's first item becomes the add itself, and the tuple goes
    return relax.transform.DeadCodeElimination()(relax.transform.CanonicalizeBindings()(rewritten))

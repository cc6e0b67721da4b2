"""Relax rewrite: a transposed convolution whose stride equals its kernel (the 2x upsampling of
detection heads) becomes a 1x1 convolution followed by a pixel shuffle.

TVM legalizes conv2d_transpose by dilating the input with zeros and running a direct convolution
over it, so 3/4 of its multiply-adds (stride 2) are on zeros. With stride == kernel the output
windows do not overlap: every output pixel (oh, ow) takes exactly one input pixel (oh // s, ow // s)
and one kernel tap (oh % s, ow % s). So

    y = conv2d_1x1(x, W')            W'[(co, kh, kw), ci] = W[ci, co, kh, kw]   (C_out*s*s channels)
    out = reshape(permute(reshape(y, (n, co, kh, kw, h, w)), (n, co, h, kh, w, kw)), (n, co, h*s, w*s))

The 1x1 conv runs on sculpt's GEMM kernel; the shuffle fuses with the bias and activation after it."""

from __future__ import annotations

import numpy as np

from sculpt.backends.tvm.kernels.relax_rewrite import constant_value, rewrite_calls


def _rewritable(call) -> bool:
    a = call.attrs
    weights = constant_value(call.args[1])
    if weights is None:
        return False
    k = tuple(int(d) for d in weights.shape)
    return (len(k) == 4 and int(a.groups) == 1 and str(a.data_layout) == "NCHW"
            and str(a.kernel_layout) == "IOHW" and str(a.out_layout) == "NCHW"
            and [int(s) for s in a.strides] == list(k[2:])
            and all(int(p) == 0 for p in a.padding) and all(int(d) == 1 for d in a.dilation)
            and all(int(p) == 0 for p in a.output_padding)
            and (a.out_dtype is None or str(a.out_dtype) in ("", "float32")))


def rewrite_transposed_convs(mod):
    """The module with every rewritable conv2d_transpose replaced (see the module docstring)."""
    return rewrite_calls(mod, _transposed_conv_as_pixel_shuffle)


def _transposed_conv_as_pixel_shuffle(call, rewriter):
    from tvm import relax

    if getattr(call.op, "name", "") != "relax.nn.conv2d_transpose" or not _rewritable(call):
        return None
    x, kernel = call.args
    w = constant_value(kernel).numpy()  # (ci, co, kh, kw)
    ci, co, kh, kw = w.shape
    n, _, h, wd = (int(d) for d in x.ty.shape)
    w1x1 = np.ascontiguousarray(w.transpose(1, 2, 3, 0).reshape(co * kh * kw, ci, 1, 1))
    y = rewriter.emit(relax.op.nn.conv2d(x, relax.const(w1x1), strides=1, padding=0))
    y = rewriter.emit(relax.op.reshape(y, (n, co, kh, kw, h, wd)))
    y = rewriter.emit(relax.op.permute_dims(y, [0, 1, 4, 2, 5, 3]))
    return relax.op.reshape(y, (n, co, h * kh, wd * kw))

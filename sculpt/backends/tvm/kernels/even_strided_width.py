"""Relax rewrite: a strided window op over an odd width gets one unused column of padding.

The width-vectorized kernels load a vector of outputs' inputs along the width; at stride s those
loads are strided (a gather per vector) unless the padding stage stores the input de-interleaved,
as (w % s, w // s), which needs a padded width divisible by s and a padding stage at all
(register_tile.deinterleave_strided_input). SqueezeNet's 3x3 stride-2 max pools over 111 and 55
columns have neither: they ran at 3.8x onnxruntime's time.

A column of padding on the right that no window reaches changes no output: the last window ends at
(OW - 1) * s + (k - 1) * d, left of the new column, so the output width and every value stay the
same, for max and average pooling (whatever count_include_pad says) and for convolutions. This pass
adds such columns to max/avg pools and to the convs still left as ``relax.nn.conv2d`` (depthwise and
grouped ones: the channel-blocked convs have been rewritten before) whose stride is > 1 when that
makes the padded width a multiple of the stride."""

from __future__ import annotations

from sculpt.backends.tvm.kernels.relax_rewrite import four_pads, rewrite_calls, static_shape

_POOLS = ("relax.nn.max_pool2d", "relax.nn.avg_pool2d")
_CONV = "relax.nn.conv2d"


def unused_right_columns(width: int, pad_left: int, pad_right: int, kernel: int, stride: int,
                         dilation: int = 1) -> int:
    """Columns of right padding that make the padded width a multiple of ``stride`` without any
    window reaching them (0 when none are needed or possible)."""
    padded = width + pad_left + pad_right
    span = dilation * (kernel - 1) + 1
    if stride <= 1 or padded % stride == 0 or padded < span:
        return 0
    extra = stride - padded % stride
    # the output width floor((padded - span) / stride) + 1 must not change
    if (padded + extra - span) // stride != (padded - span) // stride:
        return 0
    return extra


def rewrite_even_strided_widths(mod):
    """``mod`` with the pools and remaining convs of stride > 1 over a width the stride does not
    divide given the unused right columns that make it divide (see the module docstring)."""

    def rule(call, rewriter):
        from tvm import relax

        name = getattr(call.op, "name", "")
        if name not in _POOLS and name != _CONV:
            return None
        a = call.attrs
        layout = str(a.layout) if name in _POOLS else str(a.data_layout)
        shape, pads = static_shape(call.args[0]), four_pads(a)
        if layout != "NCHW" or shape is None or len(shape) != 4 or pads is None \
                or (name in _POOLS and bool(a.ceil_mode)):
            return None
        width = shape[3]
        stride, dilation = int(a.strides[1]), int(a.dilation[1])
        if name in _POOLS:
            kernel = int(a.pool_size[1])
        else:
            weight = static_shape(call.args[1])
            if weight is None or len(weight) != 4:
                return None
            kernel = weight[3]
        extra = unused_right_columns(width, pads[1], pads[3], kernel, stride, dilation)
        if not extra:
            return None
        padding = [pads[0], pads[1], pads[2], pads[3] + extra]
        if name == _CONV:
            return relax.op.nn.conv2d(call.args[0], call.args[1], a.strides, padding, a.dilation, a.groups,
                                      a.data_layout, a.kernel_layout, a.out_layout, a.out_dtype)
        make = relax.op.nn.max_pool2d if name == "relax.nn.max_pool2d" else relax.op.nn.avg_pool2d
        return make(call.args[0], a.pool_size, a.strides, padding, a.dilation, a.ceil_mode, a.count_include_pad,
                    a.layout, a.out_layout)

    return rewrite_calls(mod, rule)

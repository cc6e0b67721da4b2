"""Relax rewrite: a depthwise conv whose output width is no whole number of vectors computes a few
more columns and slices them off.

The depthwise kernel vectorizes along the output width. A 14- or 7-wide map (PP-LCNet's 5x5
depthwise convs at 14x14, MobileNet's last stage) is then one odd-sized vector per row, which LLVM
splits into 8 + 4 + 2 lanes. Here the conv's right padding grows so that the output is
``ceil(OW / lanes) * lanes`` wide (the extra columns read zeros or real input and are never used),
and a ``strided_slice`` takes the real columns back; FuseOps fuses the slice and the epilogue into
the kernel, which writes only the real columns. Applied when the extra columns are at most
``MAX_EXTRA_COLUMNS`` of the width."""

from __future__ import annotations

from sculpt.backends.tvm.kernels.relax_rewrite import four_pads, rewrite_calls, static_shape

MAX_EXTRA_COLUMNS = 0.25


def padded_output_width(out_width: int, lanes: int) -> int:
    """The output width to compute: whole vectors, or the width itself when that would waste more
    than ``MAX_EXTRA_COLUMNS`` (or the width already is whole vectors)."""
    whole = -(-out_width // lanes) * lanes
    if out_width < lanes or whole == out_width or whole > out_width * (1 + MAX_EXTRA_COLUMNS):
        return out_width
    return whole


def rewrite_depthwise_widths(mod, lanes: int):
    """``mod`` with every static NCHW depthwise ``relax.nn.conv2d`` of a width that is no whole number
    of ``lanes``-wide vectors computed over whole vectors and sliced back."""

    def rule(call, rewriter):
        from tvm import relax

        if getattr(call.op, "name", "") != "relax.nn.conv2d":
            return None
        a = call.attrs
        if str(a.data_layout) != "NCHW" or str(a.kernel_layout) != "OIHW" or str(a.out_layout) != "NCHW":
            return None
        x_shape, w_shape, y_shape = static_shape(call.args[0]), static_shape(call.args[1]), static_shape(call)
        pads = four_pads(a)
        groups = int(a.groups)
        if x_shape is None or w_shape is None or y_shape is None or pads is None or len(x_shape) != 4 \
                or groups == 1 or groups != x_shape[1] or w_shape[1] != 1:
            return None
        out_width = y_shape[3]
        width = padded_output_width(out_width, lanes)
        if width == out_width:
            return None
        stride = int(a.strides[1])
        padding = [pads[0], pads[1], pads[2], pads[3] + (width - out_width) * stride]
        wide = rewriter.emit(relax.op.nn.conv2d(call.args[0], call.args[1], a.strides, padding, a.dilation, groups,
                                                a.data_layout, a.kernel_layout, a.out_layout, a.out_dtype))
        return relax.op.strided_slice(wide, axes=[3], begin=[0], end=[out_width])

    return rewrite_calls(mod, rule)

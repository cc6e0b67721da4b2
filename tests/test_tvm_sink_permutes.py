"""kernels/sink_permutes: transposes moved down through layout-agnostic ops cancel in pairs, and the
function computes the same values."""

from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from tvm import relax  # noqa: E402

from sculpt.backends.tvm.kernels.sink_permutes import sink_permutes  # noqa: E402

TO_NHWC, TO_NCHW = [0, 2, 3, 1], [0, 3, 1, 2]


def _module(ops_between):
    """main(x NCHW uint8, skip NCHW uint8): stand-in "kernels" in NHWC (a negation of the transposed
    input) on each, transposed back to NCHW, ``ops_between`` applied to both, then transposed to NHWC
    for the next "kernel" and back."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 8, 6, 10), "uint8"))
    skip = relax.Var("skip", relax.TensorType((1, 8, 6, 10), "uint8"))
    with bb.function("main", [x, skip]):
        with bb.dataflow():
            nhwc = bb.emit(relax.op.permute_dims(x, TO_NHWC))
            y = bb.emit(relax.op.bitwise_not(nhwc))  # the first kernel, in NHWC
            y = bb.emit(relax.op.permute_dims(y, TO_NCHW))
            other = bb.emit(relax.op.permute_dims(bb.emit(relax.op.bitwise_not(
                bb.emit(relax.op.permute_dims(skip, TO_NHWC)))), TO_NCHW))  # another kernel's output
            y = ops_between(bb, y, other)
            z = bb.emit(relax.op.permute_dims(y, TO_NHWC))
            z = bb.emit(relax.op.bitwise_not(z))  # the second kernel, in NHWC
            out = bb.emit_output(relax.op.permute_dims(z, TO_NCHW))
        bb.emit_func_output(out)
    return bb.get()


def _qdq_add_relu_pool(bb, y, skip):
    scale, zero = relax.const(np.float32(0.05)), relax.const(np.uint8(3))
    a = bb.emit(relax.op.dequantize(y, scale, zero, axis=1))
    b = bb.emit(relax.op.dequantize(skip, scale, zero, axis=1))
    s = bb.emit(relax.op.nn.relu(relax.op.add(a, b)))
    s = bb.emit(relax.op.multiply(s, relax.const(np.float32(0.5))))
    p = bb.emit(relax.op.nn.max_pool2d(s, pool_size=[3, 3], strides=[2, 2], padding=[1, 1, 1, 1]))
    m = bb.emit(relax.op.mean(p, axis=[2, 3], keepdims=True))
    p = bb.emit(relax.op.subtract(p, relax.op.broadcast_to(m, (1, 8, 3, 5))))
    return bb.emit(relax.op.quantize(bb.emit(relax.op.concat([p, p], axis=1)), scale, zero, axis=1,
                                     out_dtype="uint8"))


def _residual_sum(bb, y, skip):
    """ONNX Sum as the importer writes it: both operands broadcast to the output shape, stacked and
    summed over the stacking axis; then a Clip (bounds as PrimValues) and a max over a stacked axis."""
    shape = (1, 8, 6, 10)
    stacked = bb.emit(relax.op.stack([bb.emit(relax.op.broadcast_to(y, shape)),
                                      bb.emit(relax.op.broadcast_to(skip, shape))], axis=0))
    total = bb.emit(relax.op.clip(bb.emit(relax.op.sum(stacked, axis=[0], keepdims=False)), 0, 200))
    return bb.emit(relax.op.max(bb.emit(relax.op.stack([total, total], axis=2)), axis=[2], keepdims=False))


def _calls_of(mod, name: str) -> list:
    found = []
    relax.analysis.post_order_visit(
        mod["main"], lambda e: found.append(e) if isinstance(e, relax.Call) and getattr(e.op, "name", "") == name else None)
    return found


def _count(mod, name: str) -> int:
    return len(_calls_of(mod, name))


def _run(mod, *arrays):
    vm = relax.VirtualMachine(tvm.compile(mod, target="llvm"), tvm.cpu())
    return vm["main"](*[tvm.runtime.tensor(a) for a in arrays]).numpy()


def _inputs():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (1, 8, 6, 10)).astype(np.uint8) for _ in range(2)]


def test_a_transpose_pair_between_two_kernels_cancels():
    mod = _module(lambda bb, y, skip: y)
    sunk = sink_permutes(mod)
    assert _count(mod, "relax.permute_dims") == 6 and _count(sunk, "relax.permute_dims") == 2  # x in, the end out
    np.testing.assert_array_equal(_run(sunk, *_inputs()), _run(mod, *_inputs()))


def test_transposes_cross_elementwise_ops_pools_means_and_concats_exactly():
    mod = _module(_qdq_add_relu_pool)
    sunk = sink_permutes(mod)
    # the pooled tensor's NHWC -> NCHW transpose cannot cross the subtraction of a broadcast mean: it stays,
    # and so does the second kernel's NCHW -> NHWC; the skip input is transposed to meet the first kernel's
    # output at the add
    assert [str(p.attrs.layout) for p in _calls_of(sunk, "relax.nn.max_pool2d")] == ["NHWC"]
    # everything between the kernels crosses: only x's and skip's transposes in and the end's out are left
    assert _count(sunk, "relax.permute_dims") == 3
    np.testing.assert_array_equal(_run(sunk, *_inputs()), _run(mod, *_inputs()))


def test_an_op_that_cannot_cross_keeps_its_transpose():
    mod = _module(lambda bb, y, skip: bb.emit(relax.op.reshape(relax.op.reshape(y, (1, 480)), (1, 8, 6, 10))))
    sunk = sink_permutes(mod)
    assert _count(sunk, "relax.permute_dims") == 4  # x in, the reshape's pair, the end out
    np.testing.assert_array_equal(_run(sunk, *_inputs()), _run(mod, *_inputs()))


def test_a_residual_sum_of_two_kernels_outputs_stays_in_their_layout():
    mod = _module(_residual_sum)
    sunk = sink_permutes(mod)
    assert _count(sunk, "relax.permute_dims") == 3  # x's and skip's in, the end out
    np.testing.assert_array_equal(_run(sunk, *_inputs()), _run(mod, *_inputs()))


def _excite_and_upsample(bb, y, skip):
    """A GELU (erf), a squeeze-and-excitation scale (a per-channel vector computed from the map, [1, C, 1, 1]), a
    per-channel affine (constants [1, C, 1, 1]), a nearest 2x upsampling and a strided slice back."""
    scale, zero = relax.const(np.float32(0.05)), relax.const(np.uint8(3))
    a = bb.emit(relax.op.dequantize(y, scale, zero, axis=1))
    gelu = bb.emit(relax.op.add(relax.op.erf(relax.op.divide(a, relax.const(np.float32(1.4142135)))),
                                relax.const(np.float32(1.0))))
    a = bb.emit(relax.op.multiply(relax.op.multiply(a, gelu), relax.const(np.float32(0.5))))  # GELU (erf)
    squeezed = bb.emit(relax.op.mean(a, axis=[2, 3], keepdims=True))
    gate = bb.emit(relax.op.nn.conv2d(squeezed, relax.const(np.full((8, 8, 1, 1), 0.01, np.float32))))  # NCHW op
    a = bb.emit(relax.op.multiply(a, bb.emit(relax.op.sigmoid(gate))))
    channel = np.arange(8, dtype=np.float32).reshape(1, 8, 1, 1)
    a = bb.emit(relax.op.add(relax.op.multiply(relax.const(channel * 0.1 + 1), a), relax.const(channel)))
    up = bb.emit(relax.op.image.resize2d(a, (12, 20), method="nearest_neighbor",
                                         coordinate_transformation_mode="asymmetric", rounding_method="floor"))
    down = bb.emit(relax.op.strided_slice(up, axes=[2, 3], begin=[0, 0], end=[12, 20], strides=[2, 2]))
    return bb.emit(relax.op.quantize(down, scale, zero, axis=1, out_dtype="uint8"))


def test_transposes_cross_gelu_a_scale_vector_per_channel_constants_and_a_resize():
    mod = _module(_excite_and_upsample)
    sunk = sink_permutes(mod)
    assert [str(r.attrs.layout) for r in _calls_of(sunk, "relax.image.resize2d")] == ["NHWC"]
    # left: x's in, the squeezed vector's into the NCHW conv, the gate's back (C elements each), the slice's
    # pair (a strided slice does not cross), the end's out
    small = [c for c in _calls_of(sunk, "relax.permute_dims") if int(np.prod([int(d) for d in c.ty.shape])) <= 8]
    assert len(small) == 2 and _count(sunk, "relax.permute_dims") == 6
    np.testing.assert_array_equal(_run(sunk, *_inputs()), _run(mod, *_inputs()))

"""Random inputs for a model, made from its declared inputs (nothing is run): the data of random
calibration sets and of the checks when no real data is given."""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import onnx

from sculpt.errors import RuntimeFailure, ShapeError
from sculpt.ir.model import Model, value_info_dims

# the type names onnxruntime gives its inputs (session.get_inputs()), the form input specs take here too
ORT_TYPE_TO_NUMPY = {
    "tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int16)": np.int16,
    "tensor(int8)": np.int8, "tensor(uint8)": np.uint8, "tensor(uint16)": np.uint16,
    "tensor(uint32)": np.uint32, "tensor(uint64)": np.uint64, "tensor(bool)": np.bool_,
}

_ONNX_TO_ORT_TYPE = {
    onnx.TensorProto.FLOAT: "tensor(float)", onnx.TensorProto.DOUBLE: "tensor(double)",
    onnx.TensorProto.FLOAT16: "tensor(float16)", onnx.TensorProto.INT64: "tensor(int64)",
    onnx.TensorProto.INT32: "tensor(int32)", onnx.TensorProto.INT16: "tensor(int16)",
    onnx.TensorProto.INT8: "tensor(int8)", onnx.TensorProto.UINT8: "tensor(uint8)",
    onnx.TensorProto.UINT16: "tensor(uint16)", onnx.TensorProto.UINT32: "tensor(uint32)",
    onnx.TensorProto.UINT64: "tensor(uint64)", onnx.TensorProto.BOOL: "tensor(bool)",
}

# random data is made for inputs up to this many elements (1 GiB of float32); a larger static input is
# almost always a broken shape (2^40 elements) and would exhaust memory before any error is shown
MAX_RANDOM_INPUT_ELEMENTS = 1 << 28


def check_random_input_size(name: str, dims: Sequence[int]) -> None:
    """ShapeError naming the input when random data of this shape would be absurdly large."""
    count = 1
    for d in dims:
        count *= int(d)
    if count > MAX_RANDOM_INPUT_ELEMENTS:
        raise ShapeError(f"input '{name}' has shape {list(dims)} ({count:.3g} elements, more than the "
                         f"{MAX_RANDOM_INPUT_ELEMENTS:.3g} sculpt makes random data for); give a realistic "
                         f"shape with --input-shape {name}=... or real data")


def input_specs(model: Model | onnx.ModelProto) -> list[tuple[str, list | None, str]]:
    """(name, shape, onnxruntime type string) of the real inputs, read from the model proto the way
    onnxruntime reports them: a dynamic dimension is a str or None; an unknown rank is None."""
    graph = model.graph
    inits = {t.name for t in graph.initializer}
    specs = []
    for vi in graph.input:
        if vi.name in inits:
            continue
        if not vi.type.HasField("tensor_type"):
            specs.append((vi.name, None, "a non-tensor type"))
            continue
        tt = vi.type.tensor_type
        shape = None
        if tt.HasField("shape"):
            shape = [d if not (isinstance(d, int) and d < 0) else None for d in value_info_dims(vi)]
        specs.append((vi.name, shape, _ONNX_TO_ORT_TYPE.get(tt.elem_type, f"tensor type {tt.elem_type}")))
    return specs


def random_inputs(model: Model, *, seed: int = 0, shapes: Mapping[str, Sequence[int]] | None = None,
                  session=None) -> dict[str, np.ndarray]:
    """Random inputs for every real input: float ~ N(0, 1), integers in [0, 4), bool coin flips.

    Dynamic dimensions must be given in ``shapes`` (or fixed in the model). The inputs are read from
    the model itself, or from ``session.get_inputs()`` when an onnxruntime session is given."""
    rng = np.random.default_rng(seed)
    feeds = {}
    shapes = dict(shapes or {})
    specs = ([(i.name, i.shape, i.type) for i in session.get_inputs()] if session is not None
             else input_specs(model))
    for name, model_shape, type_name in specs:
        dtype = ORT_TYPE_TO_NUMPY.get(type_name)
        if dtype is None:
            raise RuntimeFailure(f"input '{name}': cannot make random data of type {type_name}")
        shape = shapes.get(name, model_shape)
        if shape is None:
            raise ShapeError(f"input '{name}' has no shape in the model; give its shape "
                             f"(--input-shape {name}=...)")
        dims = []
        for i, d in enumerate(shape):
            if isinstance(d, (bool, np.bool_)) or not isinstance(d, (int, np.integer)) or d < 0:
                raise ShapeError(f"input '{name}' has a dynamic dimension {i}; give its shape "
                                 f"(--input-shape {name}=...)")
            dims.append(int(d))
        check_random_input_size(name, dims)
        if np.issubdtype(dtype, np.floating):
            feeds[name] = rng.standard_normal(dims).astype(dtype)
        elif dtype is np.bool_:
            feeds[name] = rng.integers(0, 2, dims).astype(np.bool_)
        else:
            feeds[name] = rng.integers(0, 4, dims).astype(dtype)
    return feeds

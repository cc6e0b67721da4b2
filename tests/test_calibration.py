"""Tests of calibration data (sculpt.ir.calibration): sources, preprocessing, checks, activation capture."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from PIL import Image

from sculpt.errors import CalibrationError
from sculpt.ir.calibration import CalibrationSet, ImagePreprocessing
from sculpt.runtime import iter_activations
from sculpt.ir.model import Model
from sculpt.models import PPOCR_SHAPES, ppocr_model

CLS = PPOCR_SHAPES["cls"]  # [1, 3, 48, 192]


def write_png(path, pixels: np.ndarray) -> None:
    Image.fromarray(np.asarray(pixels, dtype=np.uint8)).save(path)


@pytest.fixture
def image_folder(tmp_path):
    """Three 4x6 RGB images with known pixels (PNG is lossless), named out of order."""
    rng = np.random.default_rng(0)
    pixels = {name: rng.integers(0, 256, (4, 6, 3), dtype=np.uint8) for name in ("b.png", "a.png", "c.PNG")}
    folder = tmp_path / "images"
    folder.mkdir()
    for name, px in pixels.items():
        write_png(folder / name, px)
    (folder / "notes.txt").write_text("not an image")
    return folder, pixels


def small_model(shape=(1, 3, 4, 6), dtype=TensorProto.FLOAT, name="x") -> Model:
    node = helper.make_node("Relu", [name], ["y"], name="relu")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(name, dtype, list(shape))],
                              [helper.make_tensor_value_info("y", dtype, list(shape))])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    proto.ir_version = 8
    return Model(proto)


# ------------------------------------------------------------------------------------------- npz
def test_from_npz(tmp_path):
    x = np.random.default_rng(0).standard_normal((5, 3, 4, 6)).astype(np.float32)
    path = tmp_path / "cal.npz"
    np.savez(path, x=x)
    cal = CalibrationSet.from_npz(path)
    assert len(cal) == 5 and cal.input_names == ["x"]
    samples = list(cal)
    assert len(samples) == 5
    for k, s in enumerate(samples):
        assert s.keys() == {"x"} and s["x"].shape == (1, 3, 4, 6)
        np.testing.assert_array_equal(s["x"][0], x[k])
    np.testing.assert_array_equal(cal[4]["x"][0], x[4])
    with pytest.raises(IndexError):
        cal[5]
    assert len(CalibrationSet.from_npz(path, count=2)) == 2
    cal.check(small_model())


def test_from_npz_mismatched_sample_counts(tmp_path):
    path = tmp_path / "bad.npz"
    np.savez(path, a=np.zeros((5, 2), np.float32), b=np.zeros((4, 2), np.float32))
    with pytest.raises(CalibrationError) as info:
        CalibrationSet.from_npz(path)
    assert str(path) in str(info.value) and "'a': 5" in str(info.value) and "'b': 4" in str(info.value)
    np.savez(tmp_path / "scalar.npz", a=np.float32(3))
    with pytest.raises(CalibrationError):
        CalibrationSet.from_npz(tmp_path / "scalar.npz")


def test_from_npz_missing_or_unreadable(tmp_path):
    with pytest.raises(CalibrationError, match="nope.npz"):
        CalibrationSet.from_npz(tmp_path / "nope.npz")
    text = tmp_path / "text.npz"
    text.write_text("hello")
    with pytest.raises(CalibrationError, match="text.npz"):
        CalibrationSet.from_npz(text)
    npy = tmp_path / "plain.npy"
    np.save(npy, np.zeros(3))
    with pytest.raises(CalibrationError, match="plain.npy"):
        CalibrationSet.from_npz(npy)


# ------------------------------------------------------------------------------------------- images
def test_from_images_nchw_rgb_mean_std(image_folder):
    folder, pixels = image_folder
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    pre = ImagePreprocessing(height=4, width=6, mean=mean, std=std)
    cal = CalibrationSet.from_images(folder, "x", pre)
    assert len(cal) == 3 and cal.input_names == ["x"]
    order = ["a.png", "b.png", "c.PNG"]  # sorted by name, the .txt is ignored
    for k, name in enumerate(order):
        got = cal[k]["x"]
        assert got.shape == (1, 3, 4, 6) and got.dtype == np.float32 and got.flags.c_contiguous
        expected = (pixels[name].astype(np.float64) / 255.0 - np.array(mean)) / np.array(std)
        np.testing.assert_allclose(got[0], expected.transpose(2, 0, 1), rtol=1e-5, atol=1e-5)
    cal.check(small_model())
    assert len(CalibrationSet.from_images(folder, "x", pre, count=2)) == 2


def test_from_images_nhwc_bgr_and_scale(image_folder):
    folder, pixels = image_folder
    pre = ImagePreprocessing(height=4, width=6, mean=(10.0, 20.0, 30.0), std=(2.0, 4.0, 8.0), scale=1.0,
                             layout="NHWC", channel_order="BGR")
    got = CalibrationSet.from_images(folder, "img", pre)[0]["img"]
    assert got.shape == (1, 4, 6, 3)
    bgr = pixels["a.png"][:, :, ::-1].astype(np.float64)
    # mean/std apply per channel in the stated (BGR) order
    expected = (bgr - np.array([10.0, 20.0, 30.0])) / np.array([2.0, 4.0, 8.0])
    np.testing.assert_allclose(got[0], expected, rtol=1e-6)


def test_from_images_grayscale_and_resize(tmp_path):
    folder = tmp_path / "imgs"
    (folder / "nested").mkdir(parents=True)
    write_png(folder / "nested" / "solid.png", np.full((16, 20, 3), (200, 100, 50), np.uint8))
    pre = ImagePreprocessing(height=4, width=5)
    got = CalibrationSet.from_images(folder, "x", pre)[0]["x"]
    assert got.shape == (1, 3, 4, 5)
    np.testing.assert_allclose(got[0, :, 0, 0], np.array([200, 100, 50]) / 255.0, rtol=1e-6)
    assert np.ptp(got[0], axis=(1, 2)).max() < 1e-6  # a solid image stays solid when resized
    gray = CalibrationSet.from_images(folder, "x", ImagePreprocessing(height=4, width=5, grayscale=True))[0]["x"]
    assert gray.shape == (1, 1, 4, 5)
    luma = (200 * 299 + 100 * 587 + 50 * 114) / 1000  # PIL's L conversion
    assert abs(gray[0, 0, 0, 0] * 255 - luma) <= 1.0


def test_from_images_errors(tmp_path, image_folder):
    with pytest.raises(CalibrationError, match="missing"):
        CalibrationSet.from_images(tmp_path / "missing", "x", ImagePreprocessing(4, 6))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CalibrationError, match="no images"):
        CalibrationSet.from_images(empty, "x", ImagePreprocessing(4, 6))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.png").write_bytes(b"not a png at all")
    cal = CalibrationSet.from_images(bad, "x", ImagePreprocessing(4, 6))
    with pytest.raises(CalibrationError) as info:
        cal[0]
    assert "broken.png" in str(info.value) and "\n" not in str(info.value)
    for kwargs in (dict(layout="CHW"), dict(channel_order="GBR"), dict(std=(1.0, 0.0, 1.0)), dict(height=0),
                   dict(mean=(0.5, 0.5))):
        args = dict(height=4, width=6)
        args.update(kwargs)
        with pytest.raises(CalibrationError):
            ImagePreprocessing(**args)


# ------------------------------------------------------------------------------------------- random
def test_random_is_deterministic_by_seed():
    m = ppocr_model("cls")
    a = CalibrationSet.random(m, count=3, seed=4, input_shapes={"x": CLS})
    b = CalibrationSet.random(m, count=3, seed=4, input_shapes={"x": CLS})
    c = CalibrationSet.random(m, count=3, seed=5, input_shapes={"x": CLS})
    assert len(a) == 3 and a.input_names == ["x"]
    for k in range(3):
        assert a[k]["x"].shape == tuple(CLS) and a[k]["x"].dtype == np.float32
        np.testing.assert_array_equal(a[k]["x"], b[k]["x"])
        np.testing.assert_array_equal(a[k]["x"], a[k]["x"])  # re-reading a sample gives the same data
        assert not np.array_equal(a[k]["x"], c[k]["x"])
    assert not np.array_equal(a[0]["x"], a[1]["x"])
    a.check(m.clone().fix_input_shapes({"x": CLS}))
    u = CalibrationSet.random(m, count=2, input_shapes={"x": CLS}, low=-0.5, high=0.25)
    assert u[0]["x"].min() >= -0.5 and u[0]["x"].max() < 0.25 and u[0]["x"].dtype == np.float32


def test_random_errors_name_the_input():
    m = ppocr_model("cls")
    with pytest.raises(CalibrationError) as info:
        CalibrationSet.random(m, count=2)
    assert "'x'" in str(info.value) and "--input-shape x=" in str(info.value)
    with pytest.raises(CalibrationError, match="'x'"):
        CalibrationSet.random(m, input_shapes={"x": [1, 3, 0, 192]})
    with pytest.raises(CalibrationError, match="'image'"):
        CalibrationSet.random(m, input_shapes={"x": CLS, "image": [1, 3, 4, 4]})
    with pytest.raises(CalibrationError, match="count"):
        CalibrationSet.random(m, count=0, input_shapes={"x": CLS})


def test_random_for_static_scalar_and_integer_inputs():
    node = helper.make_node("Mul", ["x", "s"], ["y"], name="mul")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.INT64, [2, 3]),
                                            helper.make_tensor_value_info("s", TensorProto.INT64, [])],
                              [helper.make_tensor_value_info("y", TensorProto.INT64, [2, 3])])
    m = Model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))
    cal = CalibrationSet.random(m, count=2)
    s = cal[0]
    assert s["x"].dtype == np.int64 and s["x"].shape == (2, 3) and s["s"].shape == ()
    cal.check(m)


def test_random_builds_no_session_per_sample(monkeypatch):
    import sculpt.runtime.session as ortmod

    m = ppocr_model("cls")
    cal = CalibrationSet.random(m, count=3, input_shapes={"x": CLS})

    def no_session(*a, **k):
        raise AssertionError("a calibration sample should not need an onnxruntime session")

    monkeypatch.setattr(ortmod, "make_session", no_session)
    assert [s["x"].shape for s in cal] == [tuple(CLS)] * 3


# ------------------------------------------------------------------------------------------- from_source
def test_from_source_random():
    m = ppocr_model("cls")
    cal = CalibrationSet.from_source("random:4", m, input_shapes={"x": CLS})
    assert len(cal) == 4 and cal[0]["x"].shape == tuple(CLS)
    assert len(CalibrationSet.from_source("random", m, input_shapes={"x": CLS})) == 8
    cal = CalibrationSet.from_source({"source": "random", "count": 3, "seed": 9}, m, input_shapes={"x": CLS})
    np.testing.assert_array_equal(cal[0]["x"], CalibrationSet.random(m, 3, 9, {"x": CLS})[0]["x"])
    for bad in ("random:abc", "random:0", "random:-2", "random:1.5"):
        with pytest.raises(CalibrationError, match="random"):
            CalibrationSet.from_source(bad, m, input_shapes={"x": CLS})
    with pytest.raises(CalibrationError, match="count"):
        CalibrationSet.from_source({"source": "random", "count": "many"}, m, input_shapes={"x": CLS})
    with pytest.raises(CalibrationError, match="'x'"):
        CalibrationSet.from_source("random:2", m)


def test_from_source_folder(image_folder):
    folder, pixels = image_folder
    m = small_model()
    cal = CalibrationSet.from_source(str(folder), m)  # size from the model's static input shape
    assert len(cal) == 3 and cal[0]["x"].shape == (1, 3, 4, 6)
    np.testing.assert_allclose(cal[0]["x"][0], pixels["a.png"].transpose(2, 0, 1) / 255.0, rtol=1e-6)
    cal.check(m)
    opts = {"source": str(folder), "count": 2, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5],
            "channel_order": "BGR"}
    cal = CalibrationSet.from_source(opts, m)
    assert len(cal) == 2
    np.testing.assert_allclose(cal[0]["x"][0], (pixels["a.png"][:, :, ::-1].transpose(2, 0, 1) / 255.0 - 0.5) / 0.5,
                               rtol=1e-5, atol=1e-6)
    # the dynamic PP-OCR classifier needs a size
    cls = ppocr_model("cls")
    with pytest.raises(CalibrationError, match="size"):
        CalibrationSet.from_source(str(folder), cls)
    cal = CalibrationSet.from_source({"source": str(folder), "size": [48, 192]}, cls)
    assert cal[0]["x"].shape == (1, 3, 48, 192)
    cal = CalibrationSet.from_source(str(folder), cls, input_shapes={"x": CLS})
    assert cal[0]["x"].shape == (1, 3, 48, 192)
    nhwc = small_model((1, 4, 6, 3))
    cal = CalibrationSet.from_source({"source": str(folder), "layout": "NHWC"}, nhwc)
    assert cal[0]["x"].shape == (1, 4, 6, 3)
    cal.check(nhwc)
    with pytest.raises(CalibrationError, match="'nope'"):
        CalibrationSet.from_source({"source": str(folder), "input": "nope"}, m)


def test_from_source_npz_and_errors(tmp_path):
    m = small_model()
    path = tmp_path / "cal.npz"
    np.savez(path, x=np.ones((6, 3, 4, 6), np.float32))
    assert len(CalibrationSet.from_source(str(path), m)) == 6
    assert len(CalibrationSet.from_source({"source": str(path), "count": 4}, m)) == 4
    with pytest.raises(CalibrationError, match="'colour'"):
        CalibrationSet.from_source({"source": str(path), "colour": "red"}, m)
    with pytest.raises(CalibrationError, match="source"):
        CalibrationSet.from_source({"count": 3}, m)
    with pytest.raises(CalibrationError, match="missing.npz"):
        CalibrationSet.from_source(str(tmp_path / "missing.npz"), m)
    with pytest.raises(CalibrationError, match="elsewhere"):
        CalibrationSet.from_source(str(tmp_path / "elsewhere"), m)


# ------------------------------------------------------------------------------------------- check, batches
def test_check_rejects_wrong_names_shapes_and_dtypes():
    m = small_model()
    CalibrationSet.from_arrays({"x": np.zeros((2, 3, 4, 6), np.float32)}).check(m)
    with pytest.raises(CalibrationError, match="'image'"):
        CalibrationSet.from_arrays({"image": np.zeros((2, 3, 4, 6), np.float32)}).check(m)
    with pytest.raises(CalibrationError, match="'extra'"):
        CalibrationSet.from_arrays({"x": np.zeros((2, 3, 4, 6), np.float32),
                                    "extra": np.zeros((2, 1), np.float32)}).check(m)
    with pytest.raises(CalibrationError, match=r"'x'.*\[1, 4, 4, 6\]"):
        CalibrationSet.from_arrays({"x": np.zeros((2, 4, 4, 6), np.float32)}).check(m)
    with pytest.raises(CalibrationError, match="'x'"):
        CalibrationSet.from_arrays({"x": np.zeros((2, 3, 4), np.float32)}).check(m)
    with pytest.raises(CalibrationError, match="'x'.*float64"):
        CalibrationSet.from_arrays({"x": np.zeros((2, 3, 4, 6))}).check(m)
    # a dynamic model accepts any size in its dynamic dimensions, not in its static ones
    cls = ppocr_model("cls")
    CalibrationSet.from_arrays({"x": np.zeros((1, 3, 32, 100), np.float32)}).check(cls)
    with pytest.raises(CalibrationError):
        CalibrationSet.from_arrays({"x": np.zeros((1, 1, 32, 100), np.float32)}).check(cls)


def test_batches():
    x = np.arange(5 * 2, dtype=np.float32).reshape(5, 2)
    y = np.arange(5, dtype=np.int64).reshape(5, 1)
    cal = CalibrationSet.from_arrays({"x": x, "y": y})
    batches = list(cal.batches(2))
    assert [b["x"].shape for b in batches] == [(2, 2), (2, 2), (1, 2)]
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in batches]), x)
    np.testing.assert_array_equal(np.concatenate([b["y"] for b in batches]), y)
    assert len(list(cal.batches(10))) == 1 and list(cal.batches(10))[0]["x"].shape == (5, 2)
    assert len(cal.take(3)) == 3 and len(cal.take(99)) == 5
    with pytest.raises(CalibrationError):
        cal.take(-1)


# ------------------------------------------------------------------------------------------- activations
def test_iter_activations_on_cls():
    m = ppocr_model("cls")
    convs = [n for n in m.graph.node if n.op_type == "Conv"]
    first, last = convs[0], convs[-1]
    out = m.output_names[0]
    wanted = [first.output[0], last.output[0], out]
    cal = CalibrationSet.random(m, count=3, seed=1, input_shapes={"x": CLS})
    got = list(iter_activations(m, wanted, cal))
    assert len(got) == 3
    # the first conv's output shape from the conv formula
    attrs = {a.name: helper.get_attribute_value(a) for a in first.attribute}
    w = m.get_constant(first.input[1]).shape
    k, s = attrs["kernel_shape"], attrs.get("strides", [1, 1])
    p = attrs.get("pads", [0, 0, 0, 0])
    h = (CLS[2] + p[0] + p[2] - k[0]) // s[0] + 1
    wd = (CLS[3] + p[1] + p[3] - k[1]) // s[1] + 1
    plain = ort.InferenceSession(m.serialize(), providers=["CPUExecutionProvider"])
    for sample, acts in zip(cal, got):
        assert list(acts) == wanted  # exactly the tensors asked for, in order
        assert acts[first.output[0]].shape == (1, w[0], h, wd)
        assert acts[last.output[0]].ndim == 4 and acts[last.output[0]].shape[0] == 1
        assert acts[out].shape == (1, 2)
        np.testing.assert_allclose(acts[out], plain.run(None, sample)[0], rtol=1e-5, atol=1e-6)
    assert len(list(iter_activations(m, [first.output[0]], cal, limit=2))) == 2
    assert list(iter_activations(m, [], cal)) == [{}, {}, {}]
    with pytest.raises(CalibrationError, match="'no_such_tensor'"):
        list(iter_activations(m, ["no_such_tensor"], cal))

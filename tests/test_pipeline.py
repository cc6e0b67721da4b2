"""The pass protocol, registry, option coercion, YAML/JSON pipelines and instruments."""

import json
from dataclasses import dataclass

import numpy as np
import pytest
import yaml

from graphs import op_counts
from sculpt.errors import OptionError, PassError, PipelineError, VerificationError
from sculpt.examples import tiny_convnet
from sculpt.ir.model import Model
from sculpt.passes import Pipeline, create_pass, parse_pass_spec, registered_passes
from sculpt.passes.base import Pass, PassContext, PassResult, option, register, registered_temporarily

SHAPES = {"input": [1, 3, 32, 32]}


@register
@dataclass
class _BreaksOutputs(Pass):
    """A deliberately wrong 'exact' pass: scales the first Conv weight (used to test verify-each)."""

    name = "test-breaks-outputs"
    exact = True
    factor: float = option(1.5)

    def run(self, model, ctx):
        conv = next(n for n in model.graph.node if n.op_type == "Conv")
        model.replace_constant_input(conv, 1, model.get_constant(conv.input[1]) * self.factor)
        return PassResult(model, True, {})


@register
@dataclass
class _NeedsData(Pass):
    """Requires calibration data."""

    name = "test-needs-calibration"
    exact = False
    needs_calibration = True

    def run(self, model, ctx):
        return PassResult(model, False, {"samples": len(ctx.calibration)})


def test_registry_lists_the_canonicalization_passes():
    names = set(registered_passes())
    assert {"canonicalize", "constant-folding", "fold-batchnorm", "fold-conv-affine", "remove-identity",
            "simplify-shapes", "freeze-initializers"} <= names
    for name, cls in registered_passes().items():
        assert cls.__doc__, name
        assert isinstance(cls.exact, bool)


def test_a_pass_registered_temporarily_is_known_inside_the_block_only():
    @dataclass
    class Temporary(Pass):
        """Test pass."""

        name = "test-temporary"

        def run(self, model, ctx):
            return PassResult(model, False, {})

    with registered_temporarily(Temporary):
        assert registered_passes()["test-temporary"] is Temporary
        assert isinstance(create_pass("test-temporary"), Temporary)
    assert "test-temporary" not in registered_passes()
    with pytest.raises(OptionError, match="unknown pass 'test-temporary'"):
        create_pass("test-temporary")

    @dataclass
    class Clash(Temporary):
        """Test pass named like a built-in one."""

        name = "canonicalize"

    with pytest.raises(TypeError, match="two passes named 'canonicalize'"):
        with registered_temporarily(Clash):
            pass
    assert registered_passes()["canonicalize"] is not Clash


def test_pass_spec_parsing_and_coercion():
    assert parse_pass_spec("canonicalize") == ("canonicalize", {})
    assert parse_pass_spec("x:a=1,b=[2,3],c=z") == ("x", {"a": "1", "b": "[2,3]", "c": "z"})
    p = create_pass("canonicalize", {"max_rounds": "3", "fold-batchnorm": "no", "max_tensor_mb": "1.5"})
    assert (p.max_rounds, p.fold_batchnorm, p.max_tensor_mb) == (3, False, 1.5)


@pytest.mark.parametrize("name,options,fragment", [
    ("no-such-pass", {}, "unknown pass 'no-such-pass'"),
    ("canonicalize", {"bogus": 1}, "has no option 'bogus'"),
    ("canonicalize", {"max_rounds": "abc"}, "expects an integer"),
    ("canonicalize", {"fold_batchnorm": "maybe"}, "expects true or false"),
    ("constant-folding", {"max_tensor_mb": "big"}, "expects a number"),
])
def test_bad_options_are_named(name, options, fragment):
    with pytest.raises(OptionError, match=fragment):
        create_pass(name, options)


def test_pass_works_on_a_copy_and_fails_cleanly():
    m = tiny_convnet()
    before = m.serialize()
    create_pass("canonicalize")(m)
    assert m.serialize() == before  # input untouched
    with pytest.raises(PassError, match="test-needs-calibration.*calibration"):
        create_pass("test-needs-calibration")(m)


def test_pipeline_records_cost_time_and_error(tmp_path):
    pipe = Pipeline.from_specs(["remove-identity", "fold-batchnorm", "canonicalize"], input_shapes=SHAPES,
                               verify_each=True, dump_dir=str(tmp_path / "dump"))
    res = pipe.run(tiny_convnet())
    assert [r.name for r in res.records] == ["remove-identity", "fold-batchnorm", "canonicalize"]
    r0, r1 = res.records[0], res.records[1]
    assert r0.modified and r0.cost_after["nodes"] == r0.cost_before["nodes"] - 2
    assert r1.cost_after["params"] < r1.cost_before["params"]  # BN parameters folded away
    assert r1.cost_after["macs"] < r1.cost_before["macs"]
    assert all(r.error is not None and r.error["max_rel"] < 1e-5 for r in res.records)
    dumps = sorted(p.name for p in (tmp_path / "dump").iterdir())
    assert dumps == ["001_remove-identity.onnx", "002_fold-batchnorm.onnx", "003_canonicalize.onnx"]
    assert op_counts(Model.load(tmp_path / "dump" / "002_fold-batchnorm.onnx")).get("BatchNormalization", 0) == 0


def test_verify_each_catches_a_broken_exact_pass_and_names_what_ran():
    pipe = Pipeline.from_specs(["remove-identity", "test-breaks-outputs"], input_shapes=SHAPES, verify_each=True)
    with pytest.raises(PipelineError) as info:
        pipe.run(tiny_convnet())
    msg = str(info.value)
    assert "test-breaks-outputs" in msg and "passes already run: remove-identity" in msg
    assert isinstance(info.value.cause, VerificationError)
    # without verification the same pipeline runs (the error is only measured when asked)
    Pipeline.from_specs(["test-breaks-outputs"], input_shapes=SHAPES).run(tiny_convnet())


def test_yaml_and_json_pipelines(tmp_path):
    spec = {"input_shapes": SHAPES, "verify_each": True,
            "passes": ["remove-identity", {"constant-folding": {"max_tensor_mb": 8}}, {"canonicalize": None}]}
    y = tmp_path / "p.yaml"
    y.write_text(yaml.safe_dump(spec))
    j = tmp_path / "p.json"
    j.write_text(json.dumps(spec))
    for path in (y, j):
        pipe = Pipeline.from_file(path)
        assert [p.name for p in pipe.passes] == ["remove-identity", "constant-folding", "canonicalize"]
        assert pipe.passes[1].max_tensor_mb == 8.0
        res = pipe.run(tiny_convnet())
        assert "BatchNormalization" not in op_counts(res.model)


@pytest.mark.parametrize("text,fragment", [
    ("passes: []", "non-empty list"),
    ("passes: [canonicalize]\nbogus: 1", "unknown key 'bogus'"),
    ("passes: [{canonicalize: 3}]", "must be a mapping"),
    ("passes: [{no-such: {}}]", "unknown pass"),
    ("passes: [canonicalize\n  - oops: [", "cannot parse"),
])
def test_bad_pipeline_files(tmp_path, text, fragment):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(OptionError, match=fragment):
        Pipeline.from_file(p)


def test_pipeline_passes_calibration_to_passes():
    from sculpt.ir.calibration import CalibrationSet

    m = tiny_convnet().fix_input_shapes(SHAPES)
    cal = CalibrationSet.random(m, count=3)
    res = Pipeline.from_specs(["test-needs-calibration"], calibration=cal).run(m)
    assert res.records[0].stats == {"samples": 2}  # one of the three is held out (see test_honest_numbers)

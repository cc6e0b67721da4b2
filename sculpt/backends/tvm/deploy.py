"""Run an exported artifact through the C++ deploy runner (natively, or under qemu-aarch64 for ARM
artifacts) on numpy inputs, and compare it with onnxruntime on the ONNX model."""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from sculpt import runtime
from sculpt.backends.host_cpu import fused_int8_saturates
from sculpt.backends.tvm.artifact import Artifact, ArtifactError, load_artifact
from sculpt.errors import ShapeError
from sculpt.ir.model import Model
from sculpt.runtime import Comparison, output_error


@dataclass
class DeployRun:
    outputs: dict[str, np.ndarray]
    median_ms: float
    times_ms: list[float]
    emulated: bool  # ran under qemu: latency is the emulator's, not the device's


def check_feeds(artifact: Artifact, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """The inputs in the artifact's order, checked against its manifest (names, shapes, dtypes)."""
    specs = artifact.inputs
    unknown = sorted(set(feeds) - {s.name for s in specs})
    if unknown:
        raise ShapeError(f"{artifact.library.name} has no input named {', '.join(map(repr, unknown))} "
                         f"(its inputs: {', '.join(s.name for s in specs)})")
    ordered = []
    for spec in specs:
        if spec.name not in feeds:
            raise ShapeError(f"no value for input '{spec.name}' of {artifact.library.name}")
        value = np.asarray(feeds[spec.name])
        if list(value.shape) != list(spec.shape):
            raise ShapeError(f"input '{spec.name}' has shape {list(value.shape)}; {artifact.library.name} was "
                             f"compiled for {spec.shape}")
        if value.dtype != np.dtype(spec.dtype):
            raise ShapeError(f"input '{spec.name}' is {value.dtype}; {artifact.library.name} expects {spec.dtype}")
        ordered.append(np.ascontiguousarray(value))
    return ordered


def run_artifact(artifact: Artifact | str | Path, feeds: Mapping[str, np.ndarray], *, runs: int = 1,
                 warmup: int = 0, timeout: float | None = None, threads: int | None = None,
                 progress: Callable[[str], None] | None = None) -> DeployRun:
    """Run ``artifact`` once per ``runs`` (after ``warmup`` runs) with the deploy runner; outputs of the
    last run by the manifest's output names."""
    from sculpt.backends.tvm import thread_policy
    from sculpt.backends.tvm.runner import run_runner
    from sculpt.backends.tvm.runtime_libs import ToolchainError
    import platform

    if not isinstance(artifact, Artifact):
        artifact = load_artifact(artifact)
    if artifact.manifest["target"].get("opencl"):
        raise ToolchainError(f"{artifact.library.name} is built for an OpenCL GPU ({artifact.manifest['target']['name']}):"
                             " it runs on the device; here 'sculpt verify' runs its kernels on PoCL")
    ordered = check_feeds(artifact, feeds)
    work = Path(tempfile.mkdtemp(prefix="sculpt-deploy-"))
    try:
        files = []
        for i, value in enumerate(ordered):
            path = work / f"input_{i}.npy"
            np.save(path, value)
            files.append(path)
        out_dir = work / "outputs"
        out_dir.mkdir()
        env = thread_policy.runtime_env(artifact.thread_policy, threads)
        result = run_runner(artifact.library, artifact.arch, files, out_dir, runs=runs, warmup=warmup,
                            timeout=timeout, env=env, progress=progress)
        specs = artifact.outputs
        if len(result.output_files) != len(specs):
            raise ArtifactError(f"{artifact.library.name} returned {len(result.output_files)} outputs, its manifest "
                                f"lists {len(specs)}")
        outputs = {spec.name: np.load(path) for spec, path in zip(specs, result.output_files)}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return DeployRun(outputs, result.median_ms, result.times_ms, emulated=artifact.arch != platform.machine())


@dataclass
class Verification:
    """Per-output errors of the artifact against onnxruntime on the ONNX model."""

    comparison: object  # sculpt.runtime.Comparison
    rtol: float
    atol: float
    kind: str  # "run" (deploy runner), "opencl-run" (kernels run on PoCL), "opencl-compile" (only compiled)
    emulated: bool = False
    notes: list[str] = field(default_factory=list)
    kernel_check: object | None = None
    unit_check: object | None = None  # qdq_verify.UnitVerification: a QDQ build checked unit by unit

    @property
    def end_to_end_ok(self) -> bool:
        return self.comparison is None or self.comparison.within(self.rtol, self.atol)

    @property
    def ok(self) -> bool:
        """Within tolerance end to end; a QDQ build checked unit by unit: every unit within its bound."""
        return self.unit_check.ok if self.unit_check is not None else self.end_to_end_ok


def _at_artifact_shapes(model_path, artifact: Artifact) -> Model:
    work = Model.load(model_path).clone()
    work.fix_input_shapes({s.name: s.shape for s in artifact.inputs if s.name in work.input_names})
    return work


def reference_outputs(model_path, artifact: Artifact, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """onnxruntime's outputs of the ONNX model at the artifact's input shapes: what the graph defines
    (a QDQ model's graph as written, see runtime.reference_session)."""
    work = _at_artifact_shapes(model_path, artifact)
    return runtime.run(work, feeds, session=runtime.reference_session(work))


def int8_kernels_note(model_path, artifact: Artifact, feeds: Mapping[str, np.ndarray],
                      reference: Mapping[str, np.ndarray]) -> str | None:
    """For a QDQ model: how far onnxruntime's own int8 kernels (its optimized session) are from the
    graph's result on these inputs, as a note; None for other models."""
    work = _at_artifact_shapes(model_path, artifact)
    if not runtime.is_qdq_model(work):
        return None
    fused = runtime.run(work, feeds)
    worst = max((runtime.output_error(n, np.asarray(fused[n]), np.asarray(reference[n])).max_rel
                 for n in reference if n in fused), default=0.0)
    return (f"QDQ model: compared with the graph as written (onnxruntime without graph optimizations); "
            f"onnxruntime's own int8 kernels differ from it by {worst:.3g} (relative) on these inputs"
            + (" (u8 x s8 products saturate on CPUs without VNNI; qdq:weight_bits=7 avoids it)"
               if worst > 1e-3 and fused_int8_saturates() else ""))


def random_feeds(specs, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs of the given TensorSpecs' shapes and dtypes: floats uniform in [0, 1), integers in
    [0, 4), booleans coin flips."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in specs:
        dtype = np.dtype(spec.dtype)
        if dtype.kind == "f":
            feeds[spec.name] = rng.random(spec.shape).astype(dtype)
        elif dtype.kind == "b":
            feeds[spec.name] = rng.integers(0, 2, spec.shape).astype(dtype)
        else:
            feeds[spec.name] = rng.integers(0, 4, spec.shape).astype(dtype)
    return feeds


QDQ_UNITS = ("auto", "always", "off")


def verify_artifact(artifact: Artifact | str | Path, model_path, feeds: Mapping[str, np.ndarray] | None = None, *,
                    rtol: float = 1e-4, atol: float = 1e-6, seed: int = 0, timeout: float | None = None,
                    compile_only: bool = False, qdq_units: str = "auto",
                    progress: Callable[[str], None] | None = None) -> Verification:
    """Run the artifact and compare with onnxruntime: CPU targets in the deploy runner; OpenCL targets
    (no GPU here) compile every kernel on PoCL, then run the kernels there in the order TVM's host code
    launches them (``compile_only``: only compile).

    A QDQ model on a CPU target whose end-to-end error exceeds the tolerance (``qdq_units="auto"``; or
    always, ``"always"``) is then checked unit by unit on the build's own int8 inputs
    (qdq_verify.verify_units), and that check decides: a one-step rounding flip at a .5 tie is within
    float rounding of both results, but propagates through every later unit."""
    from sculpt.backends.tvm.artifact import file_sha256

    if not isinstance(artifact, Artifact):
        artifact = load_artifact(artifact)
    notes = []
    recorded = (artifact.manifest.get("source_model") or {}).get("sha256")
    if recorded and file_sha256(model_path) != recorded:
        notes.append(f"{model_path} is not the model the artifact was compiled from (sha256 differs); "
                     "comparing anyway")
    if artifact.manifest["target"].get("opencl"):
        from sculpt.backends.tvm.opencl import check_kernels

        source_path = artifact.opencl_source_path
        if source_path is None or not source_path.is_file():
            raise ArtifactError(f"{artifact.library.name}: the OpenCL source beside it is missing "
                                f"({source_path})")
        if progress:
            progress(f"compiling the OpenCL kernels of {artifact.library.name}")
        check = check_kernels(source_path.read_text())
        notes.append(f"OpenCL target: {len(check.kernels)} kernels compiled by {check.platform} ({check.device})")
        if compile_only:
            return Verification(None, rtol, atol, "opencl-compile", notes=notes, kernel_check=check)
        from sculpt.backends.tvm.opencl_run import run_artifact_kernels

        feeds = _with_random_feeds(artifact, feeds, seed)
        run = run_artifact_kernels(artifact, model_path, check_feeds(artifact, feeds), progress=progress)
        notes.append(f"{run.launches} kernel launches ran on {run.platform}, a CPU OpenCL: this checks the generated "
                     "kernels and their launch order, not a Mali/Adreno driver or its speed")
        outputs = dict(zip((s.name for s in artifact.outputs), run.outputs))
        return Verification(_compare(artifact, model_path, feeds, outputs, notes), rtol, atol, "opencl-run",
                            notes=notes, kernel_check=check)
    if qdq_units not in QDQ_UNITS:
        raise ValueError(f"qdq_units must be one of {', '.join(QDQ_UNITS)}, got {qdq_units!r}")
    feeds = _with_random_feeds(artifact, feeds, seed)
    if progress:
        progress(f"running {artifact.library.name}" + (" under qemu" if artifact.arch != _machine() else ""))
    run = run_artifact(artifact, feeds, timeout=timeout, progress=progress)
    result = Verification(_compare(artifact, model_path, feeds, run.outputs, notes), rtol, atol, "run",
                          emulated=run.emulated, notes=notes)
    if qdq_units == "off" or (qdq_units == "auto" and result.end_to_end_ok):
        return result
    if not runtime.is_qdq_model(Model.load(model_path)):
        return result
    if artifact.manifest.get("tuning"):
        notes.append("QDQ model, tuned build: not checked unit by unit (the check rebuilds the artifact, and "
                     "MetaSchedule's schedules are not rebuilt); compared end to end only")
        return result
    from sculpt.backends.tvm.qdq_verify import verify_units

    result.unit_check = verify_units(artifact, model_path, feeds, run.outputs, rtol=rtol, atol=atol,
                                     timeout=timeout, progress=progress)
    why = (f"the end-to-end error {result.comparison.max_rel:.3g} (relative) is beyond rtol={rtol:g}"
           if not result.end_to_end_ok else f"the end-to-end error is {result.comparison.max_rel:.3g} (relative)")
    notes.append(f"QDQ model compared unit by unit ({why}; one-step rounding flips at .5 ties, within float "
                 f"rounding of both results, propagate through later units): {result.unit_check.summary()}")
    notes.extend(result.unit_check.notes)
    return result


def _with_random_feeds(artifact: Artifact, feeds: Mapping[str, np.ndarray] | None, seed: int) -> dict[str, np.ndarray]:
    """``feeds``, with random values for the inputs not given."""
    feeds = dict(feeds) if feeds else {}
    for name, value in random_feeds(artifact.inputs, seed).items():
        feeds.setdefault(name, value)
    return feeds


def _compare(artifact: Artifact, model_path, feeds, outputs: Mapping[str, np.ndarray], notes: list[str]):
    """Per-output errors of the artifact's ``outputs`` against onnxruntime on the ONNX model (a note
    added for a QDQ model: int8_kernels_note)."""
    ref = reference_outputs(model_path, artifact, feeds)
    note = int8_kernels_note(model_path, artifact, feeds, ref)
    if note:
        notes.append(note)
    errors = []
    for spec in artifact.outputs:
        if spec.name not in ref:
            raise ArtifactError(f"output '{spec.name}' of {artifact.library.name} is not an output of {model_path}")
        errors.append(output_error(spec.name, outputs[spec.name], np.asarray(ref[spec.name])))
    return Comparison(errors, 1)


def _machine() -> str:
    import platform

    return platform.machine()

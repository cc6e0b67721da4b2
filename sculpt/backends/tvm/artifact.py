"""Compile a model for a target and export a deployable artifact: a shared library (cross-linked for
ARM with aarch64-linux-gnu-g++) and a manifest beside it (inputs, outputs, target, versions, source
model hash). For OpenCL targets the generated OpenCL C is written beside them too.

    model.so             the library: load it with the TVM runtime, call vm_load_executable, main
    model.json           the manifest (MANIFEST_FORMAT)
    model.cl             OpenCL targets only: the kernels' source
    model.tuning/        tuned compiles only: the MetaSchedule database, reused by the next compile

Everything is written to temporary files first and renamed into place; the input model is never
overwritten.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from sculpt import __version__
from sculpt.backends.tvm.targets import NamedTarget, get_target
from sculpt.common import (atomic_write_bytes, check_output_file, give_default_mode, one_line, same_path,
                           to_plain_json)
from sculpt.errors import OptionError, SculptError
from sculpt.ir.model import Model
from sculpt.ir.random_inputs import MAX_RANDOM_INPUT_ELEMENTS
from sculpt.passes import create_pass

MANIFEST_FORMAT = "sculpt-tvm-artifact/1"


class ArtifactError(SculptError):
    """An artifact or its manifest is missing, unreadable or inconsistent."""


@dataclass
class TensorSpec:
    name: str
    shape: list[int]
    dtype: str

    def as_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


@dataclass
class CompiledModel:
    """A model compiled for a target, not yet exported."""

    executable: object  # tvm.relax.VMExecutable
    target: NamedTarget
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    passes: list[str] = field(default_factory=list)
    options: dict = field(default_factory=dict)  # kernels, sparse decisions: recorded in the manifest
    tuning: object | None = None  # tune.TuningReport
    compile_seconds: float = 0.0
    kernels: list = field(default_factory=list)  # KernelDecisions of sculpt's CPU kernels (per TIR function)

    def opencl_source(self) -> str | None:
        """The OpenCL C of every kernel (OpenCL targets), else None."""
        from sculpt.backends.tvm.opencl import opencl_source

        return opencl_source(self.executable) if self.target.is_opencl else None


@dataclass
class Artifact:
    library: Path
    manifest_path: Path
    manifest: dict

    @property
    def target(self) -> NamedTarget:
        target = get_target(self.manifest["target"]["tvm_target"]) if self.manifest["target"]["name"] == "custom" \
            else get_target(self.manifest["target"]["name"])
        gpu_memory = (self.manifest.get("options") or {}).get("gpu_memory", "buffer")
        if gpu_memory != "buffer":
            from sculpt.backends.tvm.adreno_texture import texture_target

            target = texture_target(target, gpu_memory)
        return target

    @property
    def thread_policy(self) -> str:
        """The thread pool policy the artifact expects (manifests older than the policy: the default)."""
        from sculpt.backends.tvm.thread_policy import DEFAULT_POLICY, POLICIES

        runtime = self.manifest.get("runtime")
        policy = runtime.get("thread_policy") if isinstance(runtime, dict) else None
        if policy is None:
            return DEFAULT_POLICY
        if policy not in POLICIES:
            raise ArtifactError(f"{self.manifest_path}: unknown thread_policy '{policy}' "
                                f"(known: {', '.join(POLICIES)})")
        return policy

    @property
    def arch(self) -> str:
        return self.manifest["target"]["arch"]

    @property
    def inputs(self) -> list[TensorSpec]:
        return [TensorSpec(**t) for t in self.manifest["inputs"]]

    @property
    def outputs(self) -> list[TensorSpec]:
        return [TensorSpec(**t) for t in self.manifest["outputs"]]

    @property
    def opencl_source_path(self) -> Path | None:
        name = self.manifest.get("opencl_source")
        return self.library.with_name(name) if name else None


def manifest_path_for(library: Path) -> Path:
    return library.with_suffix(".json")


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ------------------------------------------------------------------ compile
def prepare_model(model, input_shapes: Mapping[str, Sequence[int]] | None = None, *, canonicalize: bool = True):
    """The model with fixed input shapes, canonicalized (what TVM's Relax importer needs)."""
    work = model.clone()
    if input_shapes:
        work.fix_input_shapes(input_shapes)
    work.require_static_inputs("compiling with TVM")
    passes = []
    if canonicalize:
        work = create_pass("canonicalize")(work).model
        passes.append("canonicalize")
    return work, passes


def compile_model(model, target: str | dict | NamedTarget, *, input_shapes=None, canonicalize: bool = True,
                  tune_trials: int = 0, tuning_database: Path | None = None, device=None,
                  tune_strategy: str = "evolutionary", build_options: Mapping | None = None, sparse: str | None = None,
                  search_tiles: int = 0, progress: Callable[[str], None] | None = None,
                  on_tuning_start: Callable[[int], None] | None = None,
                  on_trials: Callable[[int], None] | None = None, int8: str = "off",
                  gpu_memory: str = "buffer") -> CompiledModel:
    """Import ``model`` (a sculpt Model) into Relax and build it for ``target``.

    ``tune_trials`` > 0 tunes with MetaSchedule into ``tuning_database`` (required then); a database
    given with ``tune_trials`` = 0 is only applied. ``build_options`` are passed on to
    ``relax_import.build`` (e.g. ``kernels``); ``sparse`` ('auto'|'on'|'off') runs the sparse-kernel
    rewrite on the Relax module first. ``search_tiles`` > 0 first times that many candidate tiles of
    every sculpt kernel on this machine and caches the fastest (kernels.tile_search; host targets
    with sculpt's kernels only); the build then uses them. ``int8`` (a QDQ model, CPU targets):
    'off' computes its units as written (dequantize, float op, quantize), 'relax' as integer Relax
    ops, 'kernel' on sculpt's int8 conv kernel where the target has its instruction (int8.py).
    ``gpu_memory`` (adreno): 'buffer' (TVM's default pipeline) or 'texture' (adreno_texture)."""
    from sculpt.backends.tvm.relax_import import build, import_to_relax

    start = time.perf_counter()
    target = get_target(target)
    if gpu_memory != "buffer":
        from sculpt.backends.tvm.adreno_texture import texture_target

        target = texture_target(target, gpu_memory)
        if tune_trials or tuning_database is not None or (sparse and sparse != "off") or int8 != "off":
            raise OptionError("--gpu-memory texture builds with TVM's default schedules: no tuning, sparse or int8")
    if int8 != "off":  # canonicalize folds the weights' DequantizeLinear, which the int8 lowering matches
        from sculpt.runtime import is_qdq_model

        canonicalize = canonicalize and not is_qdq_model(model)
    work, passes = prepare_model(model, input_shapes, canonicalize=canonicalize)
    inputs = input_tensor_specs(work)
    if progress:
        progress(f"importing into TVM Relax ({', '.join(f'{t.name}={t.shape}' for t in inputs)})")
    mod = import_to_relax(work, canonicalized="canonicalize" in passes)
    options: dict = {}
    if sparse and sparse != "off":
        import dataclasses

        from sculpt.backends.tvm.sparse import apply_sparse_kernels, layer_names_from_onnx

        if progress:
            progress(f"sparse kernels ({sparse})")
        mod, decisions = apply_sparse_kernels(mod, target.tvm_target(), sparse, layer_names=layer_names_from_onnx(work))
        options["sparse"] = {"mode": sparse, "layers_sparse": sum(1 for d in decisions if d.sparse),
                             "decisions": [to_plain_json(dataclasses.asdict(d)) for d in decisions]}
    if int8 != "off":
        mod, options["int8"] = _lower_int8(mod, work, target, int8, progress)
    outputs = _output_specs(mod, [o.name for o in work.graph.output])
    report = None
    kernel_decisions: list = []
    if tune_trials or tuning_database is not None:
        from sculpt.backends.tvm.tune import tune_and_build

        if tuning_database is None:
            raise OptionError("tuning needs a database folder (sculpt puts it beside the artifact)")
        if progress:
            progress(f"tuning for {target.name} ({tune_trials} trials)" if tune_trials
                     else f"building for {target.name} with the tuning database {tuning_database}")
        executable, report = tune_and_build(mod, target, tune_trials, tuning_database, device=device,
                                            strategy=tune_strategy, on_start=on_tuning_start, on_trials=on_trials)
        build_options = {"kernels": "metaschedule"}  # tuned schedules of TVM's own operators
    else:
        if search_tiles:
            options["tile_search"] = _search_tiles(mod, target, search_tiles, build_options, progress)
        if progress:
            progress(f"building for {target.name}")
        if gpu_memory == "texture":
            from sculpt.backends.tvm.adreno_texture import build_texture

            executable = build_texture(mod, target.tvm_target())
            options["gpu_memory"] = gpu_memory
        else:  # decisions: filled by sculpt's CPU kernels, left empty by TVM's own pipeline
            executable = build(mod, target.spec, decisions=kernel_decisions, **dict(build_options or {}))
    options.update({k: v for k, v in dict(build_options or {}).items()})
    if "kernels" not in options:
        options["kernels"] = "default" if target.is_opencl else _default_kernels()
    return CompiledModel(executable, target, inputs, outputs, passes, options, report,
                         time.perf_counter() - start, kernel_decisions)


def _lower_int8(mod, model, target: NamedTarget, mode: str, progress) -> tuple[object, dict]:
    """The QDQ units of ``mod`` lowered to integer compute (``mode`` 'relax' or 'kernel'), and what was
    lowered, for the manifest."""
    from sculpt.backends.tvm.int8 import int8_kernel_policy, lower_qdq_to_int8
    from sculpt.runtime import is_qdq_model

    if mode not in ("relax", "kernel"):
        raise OptionError(f"--int8 takes off, relax or kernel, got '{mode}'")
    if target.is_opencl:
        raise OptionError(f"--int8 {mode}: target '{target.name}' is not a CPU")
    if not is_qdq_model(model):
        return mod, {"mode": mode, "note": "not a QDQ model: nothing to lower"}
    if progress:
        progress(f"lowering the QDQ units to int8 ({mode})")
    policy = int8_kernel_policy(target.spec) if mode == "kernel" else None
    lowered, stats = lower_qdq_to_int8(mod, policy)
    return lowered, {"mode": mode, "conv2d": stats.conv2d, "matmul": stats.matmul, "on_int8_kernel": stats.int8_kernel,
                     "on_int8_depthwise": stats.int8_depthwise, "folded_chains": stats.folded_chains,
                     "instruction": policy.instruction.name if policy else None,
                     "wide_instruction": policy.wide_instruction.name if policy and policy.wide_instruction else None,
                     "layout": stats.layout or None, "left_float": stats.left_float}


def _search_tiles(mod, target: NamedTarget, candidates: int, build_options: Mapping | None, progress) -> dict:
    """Time ``candidates`` tiles of every kernel on this machine (kernels.tile_search) and cache the
    fastest; what was searched, for the manifest."""
    import tvm

    from sculpt.backends.tvm.kernels import host_target
    from sculpt.backends.tvm.kernels.tile_search import timed_search

    if candidates < 0:
        raise OptionError(f"--search-tiles takes a number of candidate tiles >= 0, got {candidates}")
    if target.is_opencl or target.is_cross:
        raise OptionError(f"--search-tiles: target '{target.name}' is not this machine; tiles are measured here "
                          "(cross and GPU targets use the heuristic)")
    if dict(build_options or {}).get("kernels", _default_kernels()) != "sculpt":
        raise OptionError("--search-tiles measures sculpt's kernels: it needs --kernels sculpt")
    if progress:
        progress(f"timing {candidates} candidate tiles of every kernel on this machine")
    # the CPU the build compiles for (relax_import.build: a bare host llvm gets this machine's mcpu);
    # searched as bare llvm, the tiles were timed as SSE code and cached under a key no build reads
    results, seconds = timed_search(mod, tvm.target.Target(host_target(target.tvm_target())), candidates=candidates,
                                    progress=progress)
    return {"candidates": candidates, "kernels": len(results), "seconds": round(seconds, 1),
            "faster_than_heuristic": sum(1 for r in results if r.best_ms < r.heuristic_ms)}


def _default_kernels() -> str:
    """The CPU kernels relax_import.build uses when not told ("default" before it had a choice)."""
    import inspect

    from sculpt.backends.tvm.relax_import import build

    parameter = inspect.signature(build).parameters.get("kernels")
    return parameter.default if parameter is not None else "default"


def input_tensor_specs(model) -> list[TensorSpec]:
    import onnx

    specs = []
    inits = {t.name for t in model.graph.initializer}
    shapes = model.input_shapes()
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        dtype = onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type).name
        specs.append(TensorSpec(vi.name, [int(d) for d in shapes[vi.name]], dtype))
    return specs


def _output_specs(mod, names: list[str]) -> list[TensorSpec]:
    """Shapes and dtypes of ``main``'s results, as the artifact returns them (flattened tuples)."""
    from tvm import relax

    def flatten(ty) -> list:
        if isinstance(ty, relax.TupleType):
            return [leaf for field_ in ty.fields for leaf in flatten(field_)]
        return [ty]

    leaves = flatten(mod["main"].ret_ty)
    specs = []
    for i, sinfo in enumerate(leaves):
        name = names[i] if i < len(names) else f"output_{i}"
        shape = [int(d) for d in sinfo.shape.values] if getattr(sinfo, "shape", None) is not None else []
        specs.append(TensorSpec(name, shape, str(sinfo.dtype)))
    if len(specs) != len(names):
        raise ArtifactError(f"the Relax module returns {len(specs)} tensors, the ONNX model has {len(names)} "
                            "outputs")
    return specs


# ------------------------------------------------------------------ export
def check_artifact_path(output: str | os.PathLike, *protected: str | os.PathLike) -> Path:
    """Validate ``-o``: a ``.so`` path in a writable folder, whose artifact files overwrite none of
    ``protected`` (the input model)."""
    library = check_output_file(str(output), "-o", "an artifact path ending in .so")
    if library.suffix != ".so":
        raise OptionError(f"{library}: the artifact is a shared library; give -o a path ending in .so")
    for path in (library, manifest_path_for(library), library.with_suffix(".cl")):
        for other in protected:
            if same_path(path, other):
                raise OptionError(f"{path}: writing the artifact would overwrite the input model {other}")
    return library


def export_artifact(compiled: CompiledModel, library: str | os.PathLike, *, source_model: str | os.PathLike | None,
                    source_sha256: str | None = None, thread_policy: str | None = None) -> Artifact:
    """Export the library (cross-linked when the target is not this machine), write the manifest and,
    for OpenCL targets, the kernels' source; all atomically."""
    from sculpt.backends.tvm.runtime_libs import installed_versions, require_tool
    from sculpt.backends.tvm.thread_policy import DEFAULT_POLICY, manifest_entry as thread_policy_entry

    library = Path(library)
    target = compiled.target
    cc = target.cross_compiler
    if cc:
        require_tool(cc, "g++-aarch64-linux-gnu")
    files: dict[Path, bytes] = {}
    cl_source = compiled.opencl_source()
    if cl_source is not None:
        files[library.with_suffix(".cl")] = cl_source.encode()
    tvm_version, ffi_version = installed_versions()
    manifest = {
        "format": MANIFEST_FORMAT,
        "library": library.name,
        "target": target.as_dict(),
        "inputs": [t.as_dict() for t in compiled.inputs],
        "outputs": [t.as_dict() for t in compiled.outputs],
        "source_model": {"file": str(Path(source_model).resolve()) if source_model else None,
                         "sha256": source_sha256 or (file_sha256(source_model) if source_model else None)},
        "passes": compiled.passes,
        "options": to_plain_json(compiled.options),
        "tuning": compiled.tuning.as_dict() if compiled.tuning is not None else None,
        "opencl_source": library.with_suffix(".cl").name if cl_source is not None else None,
        "sculpt_version": __version__,
        "tvm_version": tvm_version,
        "tvm_ffi_version": ffi_version,
        "tvm_target_full": _full_target(target),
        "compile_seconds": round(compiled.compile_seconds, 3),
        # how the CPU thread pool should run it (the deploy runner and 'sculpt bench' apply it)
        "runtime": thread_policy_entry(thread_policy or DEFAULT_POLICY),
    }
    fd, tmp_lib = tempfile.mkstemp(dir=library.parent if str(library.parent) else ".",
                                   prefix=f".{library.stem}.", suffix=".so")
    os.close(fd)
    try:
        try:
            if cc:
                compiled.executable.export_library(tmp_lib, cc=cc)
            else:
                compiled.executable.export_library(tmp_lib)
        except Exception as e:
            raise ArtifactError(f"{library}: exporting the library for {target.name} failed: {one_line(e)}") \
                from None
        give_default_mode(tmp_lib, executable=True)
        for path, data in files.items():
            atomic_write_bytes(path, data)
        os.replace(tmp_lib, library)
        atomic_write_bytes(manifest_path_for(library), (json.dumps(manifest, indent=2) + "\n").encode())
    finally:
        if os.path.exists(tmp_lib):
            os.unlink(tmp_lib)
    return Artifact(library, manifest_path_for(library), manifest)


def compile_artifact(model_path: str | os.PathLike, target: str | dict | NamedTarget, output: str | os.PathLike, *,
                     input_shapes=None, tune_trials: int = 0, tuning_database: Path | None = None, **kwargs) -> Artifact:
    """Load, compile and export in one call (what ``sculpt compile`` does)."""
    from sculpt.backends.tvm.tune import database_dir_for

    library = check_artifact_path(output, model_path)
    model = Model.load(model_path)
    if tune_trials and tuning_database is None:
        tuning_database = database_dir_for(library)
    compiled = compile_model(model, target, input_shapes=input_shapes, tune_trials=tune_trials,
                             tuning_database=tuning_database, **kwargs)
    return export_artifact(compiled, library, source_model=model_path)


def load_artifact(path: str | os.PathLike) -> Artifact:
    """An exported artifact: the library and its manifest (``path`` may name either)."""
    p = Path(path)
    library = p.with_suffix(".so") if p.suffix == ".json" else p
    manifest_path = manifest_path_for(library)
    if not library.is_file():
        raise ArtifactError(f"{library}: no such artifact library")
    if not manifest_path.is_file():
        raise ArtifactError(f"{manifest_path}: the manifest of {library.name} is missing (it is written beside "
                            "the library by 'sculpt compile')")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (ValueError, UnicodeDecodeError, RecursionError) as e:  # RecursionError: absurdly deep nesting
        raise ArtifactError(f"{manifest_path}: not a valid manifest ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise ArtifactError(f"{manifest_path}: not a sculpt artifact manifest (format "
                            f"{manifest.get('format') if isinstance(manifest, dict) else None!r}, expected "
                            f"{MANIFEST_FORMAT!r})")
    for key in ("inputs", "outputs", "target"):
        if key not in manifest:
            raise ArtifactError(f"{manifest_path}: the manifest has no '{key}'")
    _check_manifest(manifest, manifest_path, library)
    artifact = Artifact(library, manifest_path, manifest)
    artifact.thread_policy  # noqa: B018  (an unknown policy is refused now, not when the artifact runs)
    return artifact


_TENSOR_KEYS = ("name", "shape", "dtype")


def _check_manifest(manifest: dict, where: Path, library: Path) -> None:
    """Every field sculpt reads from a manifest has the type and range 'sculpt compile' writes: a
    tampered or foreign manifest is one error naming the manifest and the field, never a crash."""
    def refuse(field: str, why: str):
        raise ArtifactError(f"{where}: manifest field '{field}' {why}")

    def optional(field: str, kind: type, what: str):
        value = manifest.get(field)
        if value is not None and not isinstance(value, kind):
            refuse(field, f"must be {what} or null, got {type(value).__name__}")
        return value

    target = manifest["target"]
    if not isinstance(target, dict):
        refuse("target", "must be an object")
    for key in ("name", "arch"):
        if not isinstance(target.get(key), str) or not target[key]:
            refuse(f"target.{key}", f"must be a non-empty string, got {target.get(key)!r}")
    if not isinstance(target.get("opencl", False), bool):
        refuse("target.opencl", f"must be true or false, got {target['opencl']!r}")
    if not isinstance(target.get("tvm_target", {}), (dict, str)):
        refuse("target.tvm_target", "must be an object or a string")
    for field in ("inputs", "outputs"):
        specs = manifest[field]
        if not isinstance(specs, list):
            refuse(field, "must be a list of {name, shape, dtype} objects")
        names = set()
        for i, spec in enumerate(specs):
            item = f"{field}[{i}]"
            if not isinstance(spec, dict):
                refuse(item, "must be an object {name, shape, dtype}")
            unknown = sorted(set(map(str, spec)) - set(_TENSOR_KEYS))
            if unknown:
                refuse(item, f"has an unknown key '{unknown[0]}' (known: {', '.join(_TENSOR_KEYS)})")
            missing = [k for k in _TENSOR_KEYS if k not in spec]
            if missing:
                refuse(item, f"has no '{missing[0]}'")
            if not isinstance(spec["name"], str) or not spec["name"] or spec["name"] in names:
                refuse(f"{item}.name", f"must be a non-empty string, unique in '{field}', got {spec['name']!r}")
            names.add(spec["name"])
            shape = spec["shape"]
            if not isinstance(shape, list) or len(shape) > 32 or not all(
                    isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
                refuse(f"{item}.shape", f"must be a list of at most 32 dimensions ≥ 0, got {str(shape)[:80]}")
            elements = 1
            for d in shape:
                elements *= d
            if elements > MAX_RANDOM_INPUT_ELEMENTS:
                refuse(f"{item}.shape", f"declares {elements:.3g} elements (shape {str(shape)[:80]}), more than the "
                                        f"{MAX_RANDOM_INPUT_ELEMENTS:.3g} sculpt handles")
            try:
                kind = np.dtype(spec["dtype"]).kind if isinstance(spec["dtype"], str) else None
            except Exception:  # TypeError for most strings numpy does not know
                kind = None
            if kind is None or kind not in "biuf":
                refuse(f"{item}.dtype", f"must name a numeric dtype (float32, int64, ...), got {spec['dtype']!r}")
    source = manifest.get("opencl_source")
    if source is not None:
        if not isinstance(source, str) or source in ("", ".", "..") or any(c in source for c in "/\\\0"):
            refuse("opencl_source", f"must be the name of a file beside the library, got {str(source)[:80]!r}")
        path = library.with_name(source)
        folder = os.path.realpath(library.parent)
        if os.path.commonpath([folder, os.path.realpath(path)]) != folder:
            refuse("opencl_source", f"'{source}' is a link that leads out of the artifact's folder")
    for field in ("runtime", "options", "tuning"):
        optional(field, dict, "an object")
    passes = optional("passes", list, "a list of pass names")
    if passes is not None and not all(isinstance(n, str) for n in passes):
        refuse("passes", "must be a list of pass names")
    source_model = optional("source_model", dict, "an object")
    for key in ("file", "sha256"):
        value = (source_model or {}).get(key)
        if value is not None and not isinstance(value, str):
            refuse(f"source_model.{key}", f"must be a string or null, got {type(value).__name__}")


def _full_target(target: NamedTarget) -> dict:
    """The target with every attribute TVM filled in (features, keys), as TVM prints it."""
    try:
        return json.loads(str(target.tvm_target()))
    except ValueError:
        return dict(target.spec)

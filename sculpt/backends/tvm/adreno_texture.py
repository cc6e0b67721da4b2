"""Adreno builds that keep activations and small constants in OpenCL image memory (textures):
TVM 0.27's Adreno texture lowering, made to build and to compute the model.

TVM 0.27 ships the pieces (``tvm.relax.backend.adreno``, ``tvm.s_tir.backend.adreno``, dlight's
``adreno`` rules); a target with the key "texture" (TVM's tag ``qcom/adreno-opencl-texture``) selects
them in the Relax pipeline: ``ConvertLayout`` turns conv2d into NCHW4c/OIHW4o, ``LegalizeOps`` lowers
it to ``topi.nn.conv2d_NCHWc_OIHWo``, ``AnnotateCustomMemoryScope`` gives tensors a texture scope
(``global.texture``, ``global.texture-weight``, ``global.texture-nhwc``; a tensor stays ``global`` where
a consumer needs a buffer) and the dlight ``adreno`` rules schedule the convolutions, layout transforms
and pooling. As shipped it neither builds a real model nor computes one; each problem and what this
module does about it:

1. A grouped or depthwise conv2d (every MobileNet-style model, PP-OCR included) fails to legalize:
   ConvertLayout converts it to NCHW4c like any conv2d, and ``conv2d_NCHWc_OIHWo`` computes
   ``oc_chunk // groups`` (0 for a depthwise conv) and divides by it ("Check failed: pb->value != 0
   (0 vs. 0) : Divide by zero"). Here ConvertLayout gets a callback that leaves grouped convolutions
   in NCHW (buffers, scheduled by the generic GPU rules); the others are converted as TVM would.
2. The TIR pipeline that lowers texture-scope buffers to image reads and writes (``TextureFlatten``,
   ``InjectTextureAlloc``: ``s_tir.backend.adreno.pipeline``) cannot be used through ``tvm.compile``:
   the name "default" means the generic s_tir pipeline, which leaves image parameters accessed like
   pointers (``vload4(0, image + i)``: not OpenCL C), and "adreno" (or ``tir_pipeline=None``) fails
   with "TypeError: cannot unpack non-iterable ModulePass object": the TIRx build (apache/tvm#19581)
   wants (pipeline, host finalization, device finalization) and the Adreno pipeline returns the first
   alone. Here it is registered under its own name with the s_tir pipeline's finalization passes.
3. Every image write in a vectorized loop is miscompiled: ``tirx.VectorizeLoop`` returns early for
   calls without a primitive type and scalarizes the statement when an argument is a vector
   (apache/tvm#19944, "Non-primitive calls are not vectorized themselves"); ``texture2d_store``
   returns void, so its own vectorizing branch is never reached. The loop then writes lane i's value,
   broadcast to the 4 channels, into the whole pixel, once per lane. :func:`vector_texture_stores`
   (a TIR pass after TVM's) turns each such loop back into lanes gathered in a local texel and one
   store of it; :func:`narrow_texture_stores` finds any narrow store left, and the build warns.
4. Functions that write a texture and are not a convolution, layout transform or pooling get dlight's
   generic fallback, which binds the 4 channels of a pixel to threads that each write the whole
   pixel: Adreno's own fallback rule (``dlight.adreno.Fallback``, in TVM 0.27 but not in its
   pipeline) comes first for them.
5. ``dlight.adreno.Pool2D`` allocates the pooling accumulator inside the vectorized channel loop;
   VectorizeLoop keeps one float for the four lanes (the max of the last channel everywhere). Pooling
   is scheduled by the generic rules instead.
6. A reduction (a mean: PP-OCR det's squeeze-and-excitation blocks) or a pooling whose result an NCHW4c
   conv reads writes it into a texture one channel per thread: the cross-thread reduction's store is
   lowered after TextureFlatten, the generic rules bind the channels to threads. Here they write a
   buffer, copied into the texture (``to_vdevice``, :func:`_reductions_into_buffers`).
7. ``conv2d_transpose``'s layout inference cannot follow an NCHW4c input ("Layouts must have the same
   size", PP-OCR det): it reads NCHW.

What comes out: the NCHW4c convolutions, their layout transforms and the ops fused with them read and
write ``image2d_array_t`` with ``read_imagef``/``write_imagef``; weights stay buffers; biases become
images. Both pipelines are otherwise sculpt's fail-safe GPU pipeline (gpu_schedule).
"""

from __future__ import annotations

import re
import warnings

from sculpt.backends.tvm.targets import NamedTarget
from sculpt.common import one_line
from sculpt.errors import OptionError, SculptWarning

GPU_MEMORY_CHOICES = ("buffer", "texture")
TEXTURE_KEYS = ["adreno", "opencl", "gpu", "texture"]  # TVM's qcom/adreno-opencl-texture tag
TIR_PIPELINE = "sculpt-adreno-texture"
_NCHW4C = ["NCHW4c", "OIHW4o", "NCHW4c"]  # the layouts TVM's Adreno legalization asks for


def texture_target(target: NamedTarget, gpu_memory: str = "texture") -> NamedTarget:
    """``target`` for ``gpu_memory`` ("buffer": unchanged; "texture": an Adreno target with the texture
    key). Raises OptionError for an unknown choice or a target that is not Adreno's."""
    if gpu_memory not in GPU_MEMORY_CHOICES:
        raise OptionError(f"--gpu-memory '{gpu_memory}': choose from {', '.join(GPU_MEMORY_CHOICES)}")
    if gpu_memory == "buffer":
        return target
    spec = target.spec
    if spec.get("kind") != "opencl" or spec.get("device") != "adreno":
        raise OptionError(f"--gpu-memory texture is for --target adreno (TVM's texture lowering is Adreno's), "
                          f"not '{target.name}'")
    if "texture" in (spec.get("keys") or []):
        return target
    return NamedTarget(target.name, target.description + "; activations in texture memory",
                       {**spec, "keys": list(TEXTURE_KEYS)})


def is_texture_target(target) -> bool:
    """Whether a tvm.target.Target (or a target JSON dict) asks for Adreno's texture lowering."""
    keys = target.get("keys") or [] if isinstance(target, dict) else list(target.keys)
    return "texture" in keys and "adreno" in keys


def legalize_passes(target) -> list:
    """TVM's Adreno legalization passes for a texture target, changed as the module's docstring lists:
    ConvertLayout leaves grouped convolutions and conv2d_transpose in NCHW; reductions and pooling that would
    write a texture write a buffer copied into it; pooling is not scheduled by Adreno's Pool2D rule;
    Adreno's fallback rule comes before the generic one."""
    from tvm import relax

    from tvm.s_tir import dlight

    passes = []
    for p in relax.backend.adreno.legalize_passes(target):
        if p.info.name == "AnnotateCustomMemoryScope":
            passes += [p, _reductions_into_buffers()]
            continue
        if p.info.name == "ConvertLayout":
            p = relax.transform.ConvertLayout({}, _conv_layouts)
        elif any(isinstance(rule, dlight.adreno.Pool2D) for rule in getattr(p, "rules", ())):
            # Adreno's pooling schedule allocates the accumulator inside the vectorized channel loop, which
            # VectorizeLoop shrinks to one float for all four lanes: pooling goes to the generic rules
            p = dlight.ApplyDefaultSchedule(*[r for r in p.rules if not isinstance(r, dlight.adreno.Pool2D)])
        elif any(isinstance(rule, dlight.gpu.Fallback) for rule in getattr(p, "rules", ())):
            # elementwise functions that write a texture: Adreno's fallback (the channels of a pixel as a
            # vector), not the generic one, which binds the channels to threads that each store the whole
            # pixel (reductions keep the generic reduction rules: see narrow_texture_stores)
            p = dlight.ApplyDefaultSchedule(*[r for r in p.rules if not isinstance(r, dlight.gpu.Fallback)],
                                            dlight.adreno.Fallback(), dlight.gpu.Fallback())
        passes.append(p)
    return passes


# OpPatternKind kCommReduce and kOutEWiseFusable: the TIR functions legalized by then that reduce (mean, sum,
# a reduction with elementwise ops after it); convolutions and pooling are still Relax ops at that point
_REDUCTIONS = (3, 4)
_POOLS = ("relax.nn.max_pool2d", "relax.nn.avg_pool2d", "relax.nn.adaptive_avg_pool2d")


def _reductions_into_buffers():
    """A Relax pass after AnnotateCustomMemoryScope: a reduction (a TIR function of pattern kCommReduce or
    kOutEWiseFusable, e.g. a mean) that would write its result into a texture writes a buffer, copied into
    the texture after it (``to_vdevice``); so does pooling. TVM lowers a cross-thread reduction's final store
    after TextureFlatten, and the generic rules that schedule pooling bind the channels to threads: either
    way one channel per thread is written into the whole pixel (narrow_texture_stores)."""
    import tvm
    from tvm import relax

    call_tir = tvm.ir.Op.get("relax.call_tir")

    @relax.expr_functor.mutator
    class Rewrite(relax.PyExprMutator):
        def __init__(self, mod):
            super().__init__(mod)
            self.mod = mod
            vdevices = list(mod.global_infos.get("vdevice") or [])
            self.buffer = next((v for v in vdevices if str(v.memory_scope) == "global"), None)

        def visit_call_(self, call):
            call = super().visit_call_(call)
            out = call.ty_args[0] if len(call.ty_args) == 1 else None
            vdevice = getattr(out, "vdevice", None)
            if self.buffer is None or vdevice is None or "texture" not in str(vdevice.memory_scope):
                return call
            if call.op.same_as(call_tir):
                if int(self.mod[call.args[0]].attrs.get("op_pattern", -1)) not in _REDUCTIONS:
                    return call
            elif getattr(call.op, "name", None) in _POOLS:  # the output's device follows the input's
                data = self.builder_.emit(relax.op.to_vdevice(call.args[0], self.buffer))
                call = relax.Call(call.op, [data, *call.args[1:]], call.attrs, call.ty_args, call.span)
            else:
                return call
            buffer_ty = relax.TensorType(out.shape, out.dtype, vdevice=self.buffer)
            into_buffer = relax.Call(call.op, call.args, call.attrs, [buffer_ty], call.span)
            return relax.op.to_vdevice(self.builder_.emit(into_buffer), vdevice)

    @tvm.transform.module_pass(opt_level=0, name="SculptReductionsIntoBuffers")
    def rewrite(mod, _ctx):
        mutator = Rewrite(mod)
        for gvar, func in list(mod.functions_items()):
            if isinstance(func, relax.Function):
                mod[gvar] = mutator.visit_expr(func)
        return mod

    return rewrite


def _conv_layouts(call):
    if call.op.name == "relax.nn.conv2d" and int(call.attrs.groups) != 1:
        return {"relax.nn.conv2d": ["NCHW", "OIHW", "NCHW"]}  # conv2d_NCHWc_OIHWo divides by zero on these
    if call.op.name == "relax.nn.conv2d_transpose":
        # its layout inference cannot follow an NCHW4c input (TransposeLike: "Layouts must have the same
        # size"): it reads NCHW
        return {"relax.nn.conv2d_transpose": ["NCHW", "IOHW", "NCHW"]}
    return {"relax.nn.conv2d": list(_NCHW4C)}


def tir_pipeline(repair: bool = True) -> str:
    """The name of TVM's Adreno TIR pipeline (texture flattening and allocation) followed by
    :func:`vector_texture_stores` (``repair=False``: without it, TVM's code as is), registered with the
    finalization passes TVM's TIRx build expects (TVM 0.27 registers the Adreno pipeline without them)."""
    import tvm
    from tvm.s_tir import pipeline as s_tir_pipeline
    from tvm.s_tir.backend.adreno.pipeline import default_tir_pipeline
    from tvm.tirx import compilation_pipeline

    name = TIR_PIPELINE if repair else TIR_PIPELINE + "-unrepaired"
    if name not in compilation_pipeline.PIPELINE_MAP:
        tvm.tirx.register_tir_pipeline(name, lambda: (
            tvm.transform.Sequential([default_tir_pipeline()] + ([vector_texture_stores()] if repair else [])),
            s_tir_pipeline.finalize_host_passes, s_tir_pipeline.finalize_device_passes))
    return name


def vector_texture_stores():
    """A TIR pass giving back the vector store TVM 0.27's VectorizeLoop scalarized: a serial loop over the
    lanes of one pixel whose only statement is ``texture2d_store`` of a scalar at a coordinate that does
    not depend on the loop becomes one store of the vector of the lanes' values (what the vectorized loop
    meant; see :func:`narrow_texture_stores`). Other narrow stores are left as they are."""
    import tvm
    from tvm import tirx

    def rebuild(stmt):
        if isinstance(stmt, tirx.SeqStmt):
            children = [rebuild(child) for child in stmt]
            return stmt if all(a.same_as(b) for a, b in zip(children, stmt)) else tirx.SeqStmt(children, stmt.span)
        if isinstance(stmt, tirx.For):
            store = _lanes_as_one_store(stmt)
            if store is not None:
                return store
            body = rebuild(stmt.body)
            return stmt if body.same_as(stmt.body) else tirx.For(
                stmt.loop_var, stmt.min, stmt.extent, stmt.kind, body, stmt.thread_binding, stmt.annotations,
                stmt.step, stmt.span)
        if isinstance(stmt, tirx.IfThenElse):
            then_case = rebuild(stmt.then_case)
            else_case = rebuild(stmt.else_case) if stmt.else_case is not None else None
            if then_case.same_as(stmt.then_case) and (else_case is None or else_case.same_as(stmt.else_case)):
                return stmt
            return tirx.IfThenElse(stmt.condition, then_case, else_case, stmt.span)
        if isinstance(stmt, tirx.AttrStmt):
            body = rebuild(stmt.body)
            return stmt if body.same_as(stmt.body) else tirx.AttrStmt(stmt.node, stmt.attr_key, stmt.value, body,
                                                                      stmt.span)
        if isinstance(stmt, tirx.While):
            body = rebuild(stmt.body)
            return stmt if body.same_as(stmt.body) else tirx.While(stmt.condition, body, stmt.span)
        return stmt

    @tvm.transform.module_pass(opt_level=0, name="SculptVectorTextureStores")
    def repair(mod, _ctx):
        updated = {}
        for gvar, func in mod.functions_items():
            if isinstance(func, tirx.PrimFunc):
                body = rebuild(func.body)
                if not body.same_as(func.body):
                    updated[gvar] = func.with_body(body)
        for gvar, func in updated.items():
            mod[gvar] = func
        return mod

    return repair


def _lanes_as_one_store(loop):
    """The pixel stores a scalarized loop over a pixel's lanes meant, or None: the loop then writes each
    lane's values into local texels (the loop's lets and values unchanged) and, after it, one
    texture2d_store writes each texel. The loop may hold several such stores (a fused function writes
    several pixels per thread), and lets; anything else leaves it as it is."""
    from tvm import tirx
    from tvm.sym.analyzer import Analyzer
    from tvm_ffi.structural import structural_equal

    if not (loop.kind == tirx.ForKind.SERIAL and isinstance(loop.min, tirx.IntImm) and int(loop.min) == 0
            and isinstance(loop.extent, tirx.IntImm)):
        return None
    lanes = int(loop.extent)
    body = list(loop.body) if isinstance(loop.body, tirx.SeqStmt) else [loop.body]
    binds = [stmt for stmt in body if isinstance(stmt, tirx.Bind)]
    stores = [stmt for stmt in body if isinstance(stmt, tirx.Evaluate)
              and getattr(stmt.value.op, "name", None) == "tirx.texture2d_store"]
    if not stores or len(binds) + len(stores) != len(body):
        return None
    for stmt in stores:
        value, pixel_bits = stmt.value.args[-1], int(stmt.value.args[4].value)
        if value.ty.dtype.lanes != 1 or value.ty.dtype.bits * lanes != pixel_bits:
            return None
    analyzers = []
    for lane in range(2):  # pixels that do not depend on the lane (the lets may)
        analyzer = Analyzer()
        analyzer.bind(loop.loop_var, tirx.IntImm(loop.loop_var.ty.dtype, lane))
        for b in binds:
            analyzer.bind(b.var, b.value)
        analyzers.append(analyzer)
    for stmt in stores:
        pixel = [[a.simplify(arg) for arg in stmt.value.args[1:-1]] for a in analyzers]
        if not structural_equal(pixel[0], pixel[1]):
            return None  # each lane stores to a pixel of its own: not a scalarized pixel store
    fill, after, texels = [], [], []
    for stmt in body:
        if isinstance(stmt, tirx.Bind):
            fill.append(stmt)
            continue
        value = stmt.value.args[-1]
        texel = tirx.decl_buffer((lanes,), str(value.ty.dtype), name=f"sculpt_texel{len(texels)}", scope="local")
        texels.append(tirx.AllocBuffer(texel))
        fill.append(tirx.BufferStore(texel, value, [loop.loop_var]))
        vector = tirx.BufferLoad(texel, [tirx.Ramp(tirx.IntImm("int32", 0), tirx.IntImm("int32", 1), lanes)])
        after.append(tirx.Evaluate(_with_last_argument(stmt.value, vector), stmt.span))
    filled = tirx.For(loop.loop_var, loop.min, loop.extent, loop.kind,
                      tirx.SeqStmt(fill) if len(fill) > 1 else fill[0], loop.thread_binding, loop.annotations,
                      loop.step, loop.span)
    return tirx.SeqStmt(texels + [filled] + after)


def _with_last_argument(call, value):
    import tvm

    args = list(call.args[:-1]) + [value]
    return tvm.ir.expr.Call(call.op, args, call.attrs, call.ty_args, call.span, ret_ty=call.ty)
def build_texture(mod, target):
    """Build the Relax module ``mod`` for an Adreno texture target (a tvm.target.Target): sculpt's fail-safe
    GPU pipeline with the texture legalization (:func:`legalize_passes`), TVM's Adreno TIR pipeline and
    :func:`vector_texture_stores`. Warns when image writes narrower than a pixel are left, and (as
    relax_import.build_gpu does) names the functions whose schedule fell back."""
    import tvm

    from sculpt.backends.tvm.gpu_schedule import fail_safe_gpu_pipeline
    from sculpt.backends.tvm.relax_import import GPUScheduleFallbackWarning, TVMImportError

    fallbacks: list = []
    lowered: dict = {}

    @tvm.instrument.pass_instrument
    class _Lowered:
        def run_after_pass(self, module, info):
            if info.name == "SculptVectorTextureStores":
                lowered["tir"] = module

    current = tvm.transform.PassContext.current()
    try:
        with tvm.transform.PassContext(opt_level=current.opt_level, config=dict(current.config),
                                       required_pass=list(current.required_pass),
                                       disabled_pass=list(current.disabled_pass),
                                       instruments=list(current.instruments) + [_Lowered()]):
            executable = tvm.compile(mod, target=target, relax_pipeline=fail_safe_gpu_pipeline(target, fallbacks),
                                     tir_pipeline=tir_pipeline())
    except TVMImportError:
        raise
    except Exception as e:
        raise TVMImportError(f"TVM build for adreno (texture memory) failed: {one_line(e)}") from None
    wrong = narrow_texture_stores(lowered["tir"]) if "tir" in lowered else {}
    if wrong:
        warnings.warn(TextureMiscompileWarning(
            f"adreno texture build: {sum(wrong.values())} image writes in {len(wrong)} functions (e.g. {min(wrong)}) "
            "store one channel's value into all 4 channels of the pixel (TVM's texture lowering, left as it is "
            "by sculpt's repair: narrow_texture_stores); the build computes wrong results"), stacklevel=3)
    if fallbacks:
        warnings.warn(GPUScheduleFallbackWarning(
            f"adreno: a GPU schedule rule of TVM failed on {len(fallbacks)} function(s), scheduled by the next "
            "rule that applies instead: " + "; ".join(f.describe() for f in fallbacks)), stacklevel=3)
    return executable


_IMAGE_PARAM = re.compile(r"image2d(?:_array)?_t\s+\w+")
_IMAGE_CALL = re.compile(r"\b(read_image[fhi]|write_image[fhi]|READ_IMAGE[FHI])\s*\(")


def image_kernels(source: str) -> dict:
    """What of a build's OpenCL C uses images: kernels defined with an image parameter, and the image
    reads and writes in their bodies (macro definitions not counted)."""
    from sculpt.backends.tvm.opencl import _KERNEL_DEF

    kernels = sorted({name for name, params in _KERNEL_DEF.findall(source) if _IMAGE_PARAM.search(params)})
    body = "\n".join(line for line in source.splitlines() if not line.lstrip().startswith("#define"))
    calls = [m.group(1).lower() for m in _IMAGE_CALL.finditer(body)]
    return {"kernels": kernels, "reads": sum(c.startswith("read") for c in calls),
            "writes": sum(c.startswith("write") for c in calls)}


def narrow_texture_stores(mod) -> dict[str, int]:
    """Function -> how many of its ``texture2d_store`` calls store a value narrower than the pixel they
    write (a float, or a float broadcast to 4 lanes, where the RGBA pixel takes 4 channels' values), in a
    TIR module after TVM's lowering.

    OpenCL's write_imagef writes a whole pixel; TVM emits such a store as the scalar broadcast to the
    four channels, so three of them get a wrong value. TVM 0.27 makes them in two ways:
    ``tirx.VectorizeLoop`` scalarizes every texture store in a vectorized loop (since apache/tvm#19944 it
    returns early for calls without a primitive type, "Non-primitive calls are not vectorized
    themselves", and texture2d_store returns void, so the branch that vectorizes its value is never
    reached): the loop then stores lane i's value into the whole pixel, once per lane; and a schedule
    that binds the 4 channels to threads (dlight's generic GPU rules: the fallback, the reductions) has
    each thread store its own channel into the whole pixel. Also counted: element stores into a texture
    buffer that are no texture2d_store at all (a cross-thread reduction's result, lowered by
    LowerThreadAllreduce after TextureFlatten ran), which OpenCL C gets as the same broadcast."""
    from tvm import tirx

    found: dict[str, int] = {}

    def visit(stmt, name):
        if isinstance(stmt, tirx.SeqStmt):
            for child in stmt:
                visit(child, name)
        elif isinstance(stmt, tirx.IfThenElse):
            visit(stmt.then_case, name)
            if stmt.else_case is not None:
                visit(stmt.else_case, name)
        elif isinstance(stmt, tirx.Evaluate):
            call = stmt.value
            if getattr(getattr(call, "op", None), "name", None) == "tirx.texture2d_store":
                value, pixel_bits = call.args[-1], int(call.args[4].value)
                if value.ty.dtype.bits * value.ty.dtype.lanes < pixel_bits or isinstance(value, tirx.Broadcast):
                    found[name] = found.get(name, 0) + 1
        elif isinstance(stmt, tirx.BufferStore) and "texture" in stmt.buffer.scope():
            found[name] = found.get(name, 0) + 1  # an element store into a texture (made after TextureFlatten)
        elif getattr(stmt, "body", None) is not None:  # For, While, AttrStmt, LetStmt, ...
            visit(stmt.body, name)

    for gvar, func in mod.functions_items():
        if isinstance(func, tirx.PrimFunc):
            visit(func.body, gvar.name_hint)
    return found


class TextureMiscompileWarning(SculptWarning):
    """A texture build still has image writes narrower than the pixel (narrow_texture_stores)."""


def texture_geometry(shape, scope: str) -> tuple[int, int, int]:
    """(width, height, depth) in RGBA pixels of the image2d_array TVM's OpenCL runtime allocates for a
    tensor of ``shape`` in ``scope`` (its texture.h: the last axis is the 4 channels of a pixel; the
    others are split at the scope's separator into depth, height and width). The image's pixels, row by
    row and slice by slice, are the tensor in C order."""
    rank = len(shape)
    separator = {"global.texture": rank - 2, "global.texture-weight": 1, "global.texture-nhwc": 2}.get(scope)
    if separator is None or rank < 2 or separator >= rank:
        raise ValueError(f"no texture layout for scope '{scope}' and shape {list(shape)}")
    width = height = depth = 1
    for i, d in enumerate(shape[:-1]):
        if i < separator - 1:
            depth *= int(d)
        elif i < separator:
            height *= int(d)
        else:
            width *= int(d)
    return width, height, depth


# ------------------------------------------------------------------ images on an OpenCL device (opencl_run)
def make_image(context, queue, shape: tuple[int, ...], dtype: str, scope: str, host=None):
    """The RGBA image2d_array TVM's OpenCL runtime makes for a tensor of ``shape`` in a texture ``scope``
    on a device without cl_khr_image2d_from_buffer (PoCL has none; TVM then gives every texture view an
    image of its own), filled from ``host`` (a C-order array), or with NaN like opencl_run's new buffers."""
    import numpy as np
    import pyopencl as cl

    from sculpt.backends.tvm.opencl import OpenCLError

    channel = {"float32": cl.channel_type.FLOAT, "float16": cl.channel_type.HALF_FLOAT}.get(dtype)
    if channel is None or not shape or shape[-1] != 4:
        raise OpenCLError(f"a {dtype}{list(shape)} tensor in scope '{scope}': images are made of float32/float16 "
                          "tensors whose last axis is the 4 channels of a pixel")
    width, height, depth = texture_geometry(shape, scope)
    flags = cl.mem_flags.READ_WRITE | (cl.mem_flags.COPY_HOST_PTR if host is not None else 0)
    make = getattr(cl, "create_image", cl.Image)  # pyopencl 2026: create_image; before: the Image class
    try:
        image = make(context, flags, cl.ImageFormat(cl.channel_order.RGBA, channel), shape=(width, height, depth),
                     is_array=True, hostbuf=host.reshape(depth, height, width, 4) if host is not None else None)
    except cl.Error as e:
        raise OpenCLError(f"an image of {width}x{height}x{depth} pixels for a {list(shape)} tensor in scope "
                          f"'{scope}' could not be made: {one_line(e, 200)}") from None
    if host is None:
        cl.enqueue_fill_image(queue, image, np.full(4, np.nan, np.dtype(dtype)), (0, 0, 0), (width, height, depth))
    return image


def copy_tensor(queue, source: tuple, target: tuple) -> None:
    """Copy a tensor between memories, each given as (memory, shape, scope): scope "global" for a buffer,
    a texture scope for an image, "host" for a numpy array. An image's pixels are the tensor in C order."""
    import pyopencl as cl

    from sculpt.backends.tvm.opencl import OpenCLError

    (src, src_shape, src_scope), (dst, dst_shape, dst_scope) = source, target
    images = [(shape, scope) for shape, scope in ((src_shape, src_scope), (dst_shape, dst_scope))
              if scope not in ("global", "host")]
    if not images:
        cl.enqueue_copy(queue, dst, src)
        return
    region = texture_geometry(*images[0])
    if len(images) == 2:
        if region != texture_geometry(*images[1]):
            raise OpenCLError(f"a copy between images of different layouts ({src_scope} -> {dst_scope})")
        cl.enqueue_copy(queue, dst, src, src_origin=(0, 0, 0), dest_origin=(0, 0, 0), region=region)
    elif dst_scope == "host" or src_scope == "host":
        cl.enqueue_copy(queue, dst, src, origin=(0, 0, 0), region=region)
    else:
        cl.enqueue_copy(queue, dst, src, offset=0, origin=(0, 0, 0), region=region)

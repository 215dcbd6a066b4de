"""ExecuTorch: `<name>.pte`, the torch.export program lowered whole to the XNNPACK delegate (Android/iOS apps,
Raspberry Pi and other ARM boards, x86), run here by executorch's Python runtime. The metadata travels inside
the program as the constant method `yolo_metadata` (a JSON string): an app's runtime returns it by running that
method, and this loader reads it from the program's tables without running anything.

XNNPACK takes every op of these models once a few are written the way its partitioner accepts them (REWRITES:
splits as slices, softmax over the last axis, nearest upsampling as a broadcast multiply, batched matmuls
without broadcasting, arithmetic scalars as tensors of the graph's dtype) and the anchor grid is folded into a
constant; export logs which ops, if any, stay outside the delegate. --half: an fp16 program (fp16 input and
activations; XNNPACK stores convolution weights fp32 and packs them to fp16 at load), for ARM CPUs with fp16
arithmetic: on x86 without it, slower than fp32.
"""
from __future__ import annotations

import copy
import json
import math
import mmap
import operator
import os
import struct
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from utils.deploy.formats.base import (ExportJob, Format, LoadOptions, NumpyRunner, check_detector_output,
                                       first_line_and_reason, input_geometry, read_json)
from utils.general import LOGGER, UserError

METADATA_METHOD = "yolo_metadata"
FLOAT16 = 5  # ExecuTorch ScalarType of a Half tensor (TensorInfo.dtype())
aten = torch.ops.aten


# ---- rewrites: ops written the way XNNPACK's partitioner takes them (each is exact) ----
def _slices(x: torch.Tensor, sizes: list[int], dim: int) -> list[torch.Tensor]:
    dim, start, out = dim % x.dim(), 0, []
    for s in sizes:
        out.append(aten.slice.Tensor(x, dim, start, start + s))
        start += s
    return out


def _split_with_sizes(x, split_sizes, dim=0):
    """XNNPACK slices but does not split: a split between two delegates ran in the portable kernels."""
    return _slices(x, list(split_sizes), dim)


def _split(x, split_size, dim=0):
    n = x.shape[dim]
    return _slices(x, [min(split_size, n - i) for i in range(0, n, split_size)], dim)


def _chunk(x, chunks, dim=0):
    return _split(x, math.ceil(x.shape[dim] / chunks), dim)


def _softmax(x, dim, half_to_float=False):
    """XNNPACK's softmax takes the last axis only (the DFL decoder's is axis 1)."""
    last = x.dim() - 1
    if dim % x.dim() == last:
        return NotImplemented
    return aten._softmax.default(x.transpose(dim, last), last, half_to_float).transpose(dim, last)


def _softmax_int(x, dim, dtype=None):
    return NotImplemented if dtype is not None else _softmax(x, dim)


def _upsample_nearest2d(x, output_size, scale_factors):
    """XNNPACK has no nearest resize: an integer factor is a broadcast multiply by ones (exact)."""
    b, c, h, w = x.shape
    oh, ow = output_size if output_size is not None else (int(h * scale_factors[0]), int(w * scale_factors[1]))
    if oh % h or ow % w:
        return NotImplemented
    ones = torch.ones(1, 1, 1, oh // h, 1, ow // w, dtype=x.dtype, device=x.device)
    return (x.reshape(b, c, h, 1, w, 1) * ones).reshape(b, c, oh, ow)


def _unsqueeze(x, dim):
    """XNNPACK unsqueezes only at the last axis; a view inserts the axis anywhere."""
    shape = list(x.shape)
    shape.insert(dim % (x.dim() + 1), 1)
    return aten.view.default(x, shape)


def _matmul(a, b):
    """4-D matmuls as one bmm: torch's own decomposition broadcasts Mobile MQA's single key/value head over the
    query heads with an expand that XNNPACK lacks; folding the heads into the query length needs none."""
    if a.dim() != 4 or b.dim() != 4 or a.shape[0] != b.shape[0]:
        return NotImplemented
    n, h, q, k = a.shape
    if b.shape[1] == h:
        return aten.bmm.default(a.reshape(n * h, q, k), b.reshape(n * h, k, b.shape[-1])).reshape(n, h, q, b.shape[-1])
    if b.shape[1] == 1:
        return aten.bmm.default(a.reshape(n, h * q, k), b.reshape(n, k, b.shape[-1])).reshape(n, h, q, b.shape[-1])
    return NotImplemented


def _silu(x):
    """x * sigmoid(x) in x's dtype: the default decomposition computes fp16 in fp32, a cast XNNPACK refuses."""
    return aten.mul.Tensor(x, aten.sigmoid.default(x))


def _with_tensor_scalar(op):
    """A Python number as a 0-dim tensor of the other operand's dtype: ExecuTorch otherwise makes an int64 (or
    fp32 in an fp16 graph) tensor plus a cast, which XNNPACK refuses (the box decoder's `/ 2`)."""
    def rewrite(x, other, *args, **kwargs):
        if isinstance(other, torch.Tensor) or not isinstance(x, torch.Tensor) or not x.is_floating_point():
            return NotImplemented
        return op(x, aten.full.default([], other, dtype=x.dtype, device=x.device), *args, **kwargs)
    return rewrite


REWRITES = {
    aten.split_with_sizes.default: _split_with_sizes, aten.split.Tensor: _split, aten.chunk.default: _chunk,
    aten._softmax.default: _softmax, aten.softmax.int: _softmax_int,
    aten.upsample_nearest2d.vec: _upsample_nearest2d, aten.unsqueeze.default: _unsqueeze,
    aten.matmul.default: _matmul, aten.silu.default: _silu,
    **{op: _with_tensor_scalar(op) for op in (aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor)},
}

# ops whose result depends only on their input's shape and dtype (static in a fixed-size export)
SHAPE_ONLY = {aten.new_ones.default, aten.new_zeros.default, aten.new_full.default, aten.new_empty.default,
              aten.ones_like.default, aten.zeros_like.default, aten.full_like.default, aten.empty_like.default}


def fold_constants(gm: torch.fx.GraphModule) -> int:
    """Evaluate once what depends on no input value and no weight (the anchor grid and strides, the rewrites'
    constants) and keep it as a tensor attribute: XNNPACK then receives one constant instead of cumsum /
    meshgrid / full ops it cannot take. Returns the number of constants made."""
    graph, values = gm.graph, {}

    def real(node):
        if node in values:
            return values[node]
        v = node.meta["val"]  # a shape-only op's input: a stand-in of its shape and dtype
        return torch.zeros(v.shape, dtype=v.dtype)

    for n in graph.nodes:
        if n.op != "call_function" or n.is_impure():
            continue
        ins = n.all_input_nodes
        if not all(a in values or (n.target in SHAPE_ONLY and isinstance(a.meta.get("val"), torch.Tensor)) for a in ins):
            continue
        args, kwargs = torch.fx.node.map_arg((n.args, n.kwargs), real)
        with torch.no_grad():
            values[n] = n.target(*args, **kwargs)
    made = 0
    for n, v in values.items():
        if isinstance(v, torch.Tensor) and any(u not in values for u in n.users):
            name = f"_folded_constant{made}"
            gm.register_buffer(name, v.contiguous().clone(), persistent=False)
            with graph.inserting_before(n):
                const = graph.get_attr(name)
            const.meta = dict(n.meta)
            n.replace_all_uses_with(const)
            made += 1
    graph.eliminate_dead_code()
    gm.recompile()
    return made


def xnnpack_program(job: ExportJob, half: bool = False) -> torch.export.ExportedProgram:
    """The job's torch.export program with REWRITES applied and constants folded, exported again (fp16 for
    half: the fp32 CPU model halved)."""
    model, im = job.float_cpu()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if half:
            im = im.half()
            ep = torch.export.export(copy.deepcopy(model).half(), (im,), strict=False)
        else:
            ep = job.exported_program()
        gm = ep.run_decompositions(REWRITES).module()
        fold_constants(gm)
        return torch.export.export(gm, (im,), strict=False)


def outside_delegate(program: torch.export.ExportedProgram) -> tuple[int, Counter]:
    """(delegated partitions, Counter of the ops left to ExecuTorch's portable kernels) of a lowered program."""
    parts, ops = 0, Counter()
    for n in program.graph.nodes:
        if n.op != "call_function" or n.target is operator.getitem:
            continue
        name = getattr(n.target, "__name__", str(n.target))
        if name == "executorch_call_delegate":
            parts += 1
        else:
            ops[name] += 1
    return parts, ops


def export(job: ExportJob, f: Path) -> Path:
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower
    half = bool(job.opts.half)
    meta = {**job.meta_for(FORMAT), "half": half}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        edge = to_edge_transform_and_lower(xnnpack_program(job, half), partitioner=[XnnpackPartitioner()],
                                           constant_methods={METADATA_METHOD: json.dumps(meta)})
        parts, ops = outside_delegate(edge.exported_program())
        if ops:
            LOGGER.warning(f"WARNING: ExecuTorch: {sum(ops.values())} ops stay outside XNNPACK (portable kernels): "
                           + ", ".join(f"{k} x{v}" for k, v in ops.most_common()))
        else:
            LOGGER.info(f"ExecuTorch: every op delegated to XNNPACK ({parts} partition{'s' * (parts != 1)})")
        data = edge.to_executorch().buffer
    tmp = f.with_name(f.name + ".tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, f)
    finally:
        tmp.unlink(missing_ok=True)
    return f


# program.fbs as vtable slots (a flatbuffer schema only ever appends fields, so these stay valid)
_PROGRAM_PLANS = 6                                     # Program.execution_plan
_PLAN_NAME, _PLAN_VALUES, _PLAN_OPERATORS, _PLAN_DELEGATES = 4, 8, 16, 18
_EVALUE_TYPE, _EVALUE_VAL, _STRING_VAL = 4, 6, 4       # EValue.val (a union: type, then value), String.string_val
_KERNEL_TYPE_STRING = 6                                # KernelTypes.String


def _tables(tab, slot: int) -> list:
    from flatbuffers.table import Table
    o = tab.Offset(slot)
    if not o:
        return []
    start = tab.Vector(o)
    return [Table(tab.Bytes, tab.Indirect(start + 4 * i)) for i in range(tab.VectorLen(o))]


def _vector_len(tab, slot: int) -> int:
    o = tab.Offset(slot)
    return tab.VectorLen(o) if o else 0


def read_program(path: Path) -> tuple[dict | None, int, int]:
    """(the metadata JSON stored as the constant method `yolo_metadata` or None, the number of operators that
    `forward` runs in the portable kernels, its number of delegate calls), read from the program's flatbuffer
    tables with the flatbuffers package: nothing in the file runs. A file that is no program gives (None, 0, 0)."""
    import flatbuffers
    from flatbuffers.table import Table
    meta, ops, delegates = None, 0, 0
    try:
        with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            root = Table(buf, flatbuffers.encode.Get(flatbuffers.packer.uoffset, buf, 0))
            for plan in _tables(root, _PROGRAM_PLANS):
                o = plan.Offset(_PLAN_NAME)
                name = plan.String(o + plan.Pos).decode("utf-8") if o else ""
                if name == "forward":
                    ops, delegates = _vector_len(plan, _PLAN_OPERATORS), _vector_len(plan, _PLAN_DELEGATES)
                values = _tables(plan, _PLAN_VALUES) if name == METADATA_METHOD else []
                if len(values) == 1 and values[0].Offset(_EVALUE_TYPE):
                    v = values[0]
                    if v.Get(flatbuffers.number_types.Uint8Flags, v.Offset(_EVALUE_TYPE) + v.Pos) == _KERNEL_TYPE_STRING:
                        s = Table(bytearray(), 0)
                        v.Union(s, v.Offset(_EVALUE_VAL))
                        meta = read_json(s.String(s.Offset(_STRING_VAL) + s.Pos).decode("utf-8"))
    except (OSError, ValueError, IndexError, UnicodeDecodeError, struct.error):
        return None, 0, 0
    return (meta if isinstance(meta, dict) else None), ops, delegates


def set_threads(n: int) -> None:
    """The size of ExecuTorch's one thread pool, which XNNPACK runs on (process-wide, like torch's)."""
    from executorch.extension.pybindings import portable_lib
    if n > 0 and portable_lib._threadpool_get_thread_count() != n:
        portable_lib._unsafe_reset_threadpool(n)


class ExecuTorchRunner(NumpyRunner):
    """The program's `forward` in executorch's Python runtime (XNNPACK on the CPU whatever the input's device)."""

    def __init__(self, path: Path, opts: LoadOptions):
        from executorch.runtime import Runtime
        set_threads(int(opts.threads or torch.get_num_threads()))
        try:
            self.program = Runtime.get().load_program(path)
            self.method = self.program.load_method("forward")
            meta_in = self.method.metadata.input_tensor_meta(0)
            meta_out = self.method.metadata.output_tensor_meta(0)
        except Exception as e:
            raise UserError(f"{path}: not a loadable ExecuTorch program ({first_line_and_reason(e)})") from None
        raw, _, _ = read_program(path)
        meta = dict(raw or {})
        shape = list(meta_in.sizes())
        input_geometry(meta, shape)
        self.fixed_batch = shape[0] if shape else None
        if meta_in.dtype() == FLOAT16:
            self.input_dtype, self.precision = np.float16, "fp16"
        self.meta = check_detector_output(path, meta, raw is not None, "output 0", list(meta_out.sizes()))
        if (opts.half or opts.bf16) and self.precision != "fp16":
            LOGGER.warning(f"WARNING: --half: {path.name} runs in the precision it was exported in (fp32); "
                           f"export with --include executorch --half for an fp16 program")

    def run(self, x: np.ndarray) -> np.ndarray:
        return self.method.execute((torch.from_numpy(np.ascontiguousarray(x)),))[0].numpy()


FORMAT = Format(
    name="executorch", title="ExecuTorch", order=50, suffix=".pte", folder=False,
    export=export, load=ExecuTorchRunner,
    export_packages=(("executorch", "executorch"),), run_packages=(("executorch", "executorch"),),
    half="fp16 activations (ARM CPUs with fp16 arithmetic)", half_file=True,
    runs_on="Android / iOS apps, Raspberry Pi and ARM boards (XNNPACK CPU); x86",
)

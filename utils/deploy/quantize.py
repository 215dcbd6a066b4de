"""INT8 post-training quantization of exported models, calibrated on training images of the data YAML.

The calibration images are the training images that training's own verification keeps (utils.data.verify),
evenly spaced, put through inference's own preprocessing (utils.data.augment.preprocess_image at the export
size, RGB, 0..1) and read one at a time (CalibrationImages). ONNX: ONNX Runtime's static quantization (QDQ
format, per-channel symmetric int8 weights, uint8 activations with MinMax ranges over every image), on a graph
whose average pools and inner-axis softmax are rewritten for ONNX Runtime's faster kernels (same fp32 numbers).
OpenVINO: NNCF's post-training quantization of the OpenVINO model itself (no torch involved) on the same images.
Both keep the detect head's box decoding (the DFL softmax and expectation, anchor arithmetic, score sigmoid)
and the attention's softmax and matmuls in fp32 (`fp32_nodes`): int8 pixel coordinates would step in 1/256
of the image size.
"""
from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from utils.data import imread, load_data_config
from utils.data.augment import preprocess_image
from utils.data.verify import scan_dataset
from utils.general import LOGGER, UserError

DEFAULT_IMAGES = 200  # calibration images


class CalibrationImages(Sequence):
    """The INT8 calibration inputs, each a float32 [1, 3, h, w] array as the model sees it, decoded from its file
    when asked for: memory holds one image at a time whatever --calib-images says (500 images held as float32 at
    640 px were 2.5 GB); the quantizers read them once or twice, so decoding again costs little next to
    quantization. auto=False letterboxes to exactly hw (fixed-size exports), True resizes the long side to the
    export size with minimal padding (what a dynamic export is fed)."""

    def __init__(self, files: Sequence[str], hw: tuple[int, int], stride: int, auto: bool = False):
        self.files, self.hw, self.stride, self.auto = list(files), (int(hw[0]), int(hw[1])), int(stride), bool(auto)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return CalibrationImages(self.files[i], self.hw, self.stride, self.auto)
        f = self.files[i]
        try:
            im = imread(str(f))
        except OSError as e:  # verified when the list was made; changed on disk since
            raise UserError(f"INT8 calibration: {e}") from None
        img, _ = preprocess_image(im, self.hw, self.stride, auto=self.auto)
        return img[None].astype(np.float32) / 255.0

    def __iter__(self) -> Iterator[np.ndarray]:
        return (self[i] for i in range(len(self)))

    def shape_text(self) -> str:
        h, w = self.hw
        return (f"resized to fit {h}x{w} with minimal padding to multiples of {self.stride} (the dynamic export's "
                f"inputs)" if self.auto else f"letterboxed to {h}x{w}")


def calibration_images(data: str | Path, hw: tuple[int, int], stride: int, n: int = DEFAULT_IMAGES,
                       auto: bool = False) -> CalibrationImages:
    """n training images of `data`, evenly spaced over the split as training's own verification lists it (a
    corrupt, truncated or too small image that training skips is skipped here too, with the same one-line
    warning), decoded on use (CalibrationImages)."""
    if n < 1:
        raise UserError(f"--calib-images {n}: must be at least 1")
    cfg = load_data_config(data, need=("train",))
    name = Path(cfg.yaml_file).name
    level = LOGGER.level
    LOGGER.setLevel(logging.WARNING)  # the scan's summary line; each skipped file is still one warning
    try:
        files = scan_dataset(cfg.train, cfg.nc, prefix="INT8 calibration: ").im_files
    finally:
        LOGGER.setLevel(level)
    pick = np.unique(np.linspace(0, len(files) - 1, min(n, len(files))).round().astype(int))
    images = CalibrationImages([files[i] for i in pick], hw, stride, auto)
    LOGGER.info(f"INT8 calibration: {len(images)} of the {len(files)} usable training images of {name}, "
                f"{images.shape_text()}, read one at a time")
    return images


@contextlib.contextmanager
def quiet_quantizers():
    """Hide what the quantizers print that a user can do nothing about: ONNX Runtime's advice to run its model
    pre-processing (logged twice per call; the traced graph is already shape-inferred and optimised at load),
    torch's "No CUDA runtime is found" (NNCF imports torch's extension builder, which looks for CUDA), NNCF's
    per-node INFO lines. Warnings about the model itself still show."""
    advice = ("Please consider to run pre-processing", "Please consider pre-processing")

    class DropAdvice(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return not str(record.msg).startswith(advice)

    root, f = logging.getLogger(), DropAdvice()
    quiet = {name: logging.getLogger(name) for name in ("torch.utils.cpp_extension", "nncf")}
    levels = {name: lg.level for name, lg in quiet.items()}
    root.addFilter(f)
    for lg in quiet.values():
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.removeFilter(f)
        for name, lg in quiet.items():
            lg.setLevel(levels[name])


def node_groups(names: Sequence[str]) -> dict[str, list[str]]:
    """Nodes by what they are, from their torch.onnx scope names (kept by the conversion to OpenVINO):
    'decoding' (the detect head /model.<last>/ outside its convolution branches cv2..cv5: DFL softmax and
    expectation, anchor arithmetic, score sigmoid), 'attention' (Softmax and MatMul nodes elsewhere: the Mobile
    MQA blocks), then 'layer <i>' for the rest of each /model.<i>/. The groups INT8 sensitivity is measured
    over (benchmarks/bench_formats.py --sensitivity)."""
    layer = re.compile(r"^/model\.(\d+)/")
    idx = {n: int(m.group(1)) for n in names if (m := layer.match(n))}
    groups: dict[str, list[str]] = {"decoding": [], "attention": []}
    if not idx:
        return groups
    last = max(idx.values())
    branch = re.compile(rf"^/model\.{last}/cv\d+\.")
    attention = re.compile(r"/(Softmax|MatMul)(_\d+)?$")
    for n in names:
        if n not in idx:
            continue
        if idx[n] == last and not branch.match(n):
            groups["decoding"].append(n)
        elif idx[n] != last and attention.search(n):
            groups["attention"].append(n)
        else:
            groups.setdefault(f"layer {idx[n]}", []).append(n)
    return groups


def fp32_nodes(names: Sequence[str]) -> list[str]:
    """Nodes left in fp32: the head's decoding and the attention's softmax/matmuls (`node_groups`), in graph
    order. Measured (benchmarks/results/formats.md, --sensitivity): quantizing the decoding puts pixel
    coordinates and DFL expectations on a 256-level grid (mAP50-95 0.44 -> 0.00); every convolution, SiLU,
    pooling, concat and upsample quantizes within a few tenths of a point."""
    groups = node_groups(names)
    keep = set(groups["decoding"]) | set(groups["attention"])
    return [n for n in names if n in keep]


def pools_as_convolutions(model):
    """AveragePool nodes without padding rewritten as depthwise convolutions with 1/k^2 weights, the same
    numbers in fp32 (the weights 1/4, 1/9 ... quantize exactly per channel). Why: ONNX Runtime runs a quantized
    AveragePool in a slow NCHW kernel (the 5 ADown pools of gelan-t took 3.7 ms of 27 at 384x640, one thread)
    and a quantized depthwise convolution in its fast int8 convolution kernels (~0.1 ms)."""
    import onnx
    from onnx import helper, numpy_helper
    shapes = {}
    inferred = onnx.shape_inference.infer_shapes(model)
    for v in list(inferred.graph.value_info) + list(inferred.graph.input):
        dims = v.type.tensor_type.shape.dim
        shapes[v.name] = [d.dim_value if d.HasField("dim_value") else 0 for d in dims]
    nodes = []
    for n in model.graph.node:
        a = {x.name: helper.get_attribute_value(x) for x in n.attribute}
        shape = shapes.get(n.input[0], []) if n.input else []
        if (n.op_type != "AveragePool" or len(shape) != 4 or not shape[1] or any(a.get("pads", [0]))
                or a.get("ceil_mode", 0) or a.get("auto_pad", b"NOTSET") not in (b"NOTSET", b"VALID")):
            nodes.append(n)
            continue
        k, c = list(a["kernel_shape"]), shape[1]
        w = numpy_helper.from_array(np.full([c, 1, *k], 1.0 / np.prod(k), np.float32), f"{n.name}.pool_weight")
        model.graph.initializer.append(w)
        nodes.append(helper.make_node("Conv", [n.input[0], w.name], list(n.output), name=n.name, group=c,
                                      kernel_shape=k, strides=list(a.get("strides", [1] * len(k)))))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


def softmax_as_reductions(model):
    """Softmax over an axis that is not the last (the DFL's 16 bins, axis 1 of [B, 16, 4, A]) written as
    ReduceMax, Sub, Exp, ReduceSum, Div over that axis: the same numbers (bit-identical here), but ONNX Runtime
    transposes such a softmax to rows of 16 values (1.9 ms of 22 for gelan-t INT8 at 384x640, one thread),
    while the reductions run along contiguous memory (the INT8 file 8% faster). The new nodes are named
    `<softmax>/...`, so a node list naming the softmax names them too."""
    import onnx
    from onnx import helper, numpy_helper
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)
    ranks = {}
    for v in list(onnx.shape_inference.infer_shapes(model).graph.value_info) + list(model.graph.input):
        ranks[v.name] = len(v.type.tensor_type.shape.dim)
    nodes = []
    for n in model.graph.node:
        axis = next((helper.get_attribute_value(a) for a in n.attribute if a.name == "axis"), -1)
        rank = ranks.get(n.input[0], 0) if n.input else 0
        if n.op_type != "Softmax" or opset < 13 or not rank or axis in (-1, rank - 1):
            nodes.append(n)
            continue
        x, y, p = n.input[0], n.output[0], n.name
        axes = numpy_helper.from_array(np.array([axis], np.int64), f"{p}/axes")
        model.graph.initializer.append(axes)
        by_input = opset >= 18  # ReduceMax takes its axes as an input from opset 18 (ReduceSum from 13)
        nodes += [helper.make_node("ReduceMax", [x, axes.name] if by_input else [x], [f"{p}/max"], name=f"{p}/ReduceMax",
                                   keepdims=1, **({} if by_input else {"axes": [axis]})),
                  helper.make_node("Sub", [x, f"{p}/max"], [f"{p}/shifted"], name=f"{p}/Sub"),
                  helper.make_node("Exp", [f"{p}/shifted"], [f"{p}/exp"], name=f"{p}/Exp"),
                  helper.make_node("ReduceSum", [f"{p}/exp", axes.name], [f"{p}/sum"], name=f"{p}/ReduceSum", keepdims=1),
                  helper.make_node("Div", [f"{p}/exp", f"{p}/sum"], [y], name=f"{p}/Div")]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


def quantize_onnx(src: Path, dst: Path, images: Sequence[np.ndarray], keep_fp32: Sequence[str] | None = None) -> Path:
    """Static INT8 copy of the ONNX file `src`, metadata kept: QDQ, per-channel symmetric int8 weights, uint8
    activations (x86 runs u8 x s8; s8 activations left most convolutions unfused here, 2x slower than fp32),
    MinMax ranges over every calibration image, average pools as depthwise convolutions
    (`pools_as_convolutions`), an inner-axis softmax as reductions (`softmax_as_reductions`). keep_fp32: node
    names to leave unquantized (default `fp32_nodes`)."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it: Iterator = iter(images)

        def get_next(self):
            x = next(self.it, None)
            return None if x is None else {"images": x}

        def rewind(self):
            self.it = iter(images)

    model = onnx.load(str(src))
    meta = list(model.metadata_props)
    model = softmax_as_reductions(pools_as_convolutions(model))
    names = [n.name for n in model.graph.node]
    exclude = fp32_nodes(names) if keep_fp32 is None else list(keep_fp32)
    # a rewritten node's parts stay fp32 with it (today's quantizer has no int8 kernels for them anyway)
    exclude += [n for n in names if any(n.startswith(k + "/") for k in exclude)]
    # no CalibMaxIntermediateOutputs: ONNX Runtime drops the ranges of every full chunk it clears (ranges came
    # from the last len % chunk images only, and a multiple of the chunk size failed "No data is collected");
    # the collected outputs are per-tensor min/max scalars, so keeping all of them costs little memory
    with quiet_quantizers():
        quantize_static(model, str(dst), Reader(), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        nodes_to_exclude=exclude)
    q = onnx.load(str(dst))
    del q.metadata_props[:]
    q.metadata_props.extend(meta)  # names / stride / imgsz travel with the file
    onnx.save(q, str(dst))
    return dst


def quantize_openvino(model, images: Sequence[np.ndarray], keep_fp32: Sequence[str] | None = None):
    """NNCF post-training INT8 quantization of an openvino.Model (mixed preset: symmetric weights,
    asymmetric activations, MinMax activation ranges); `keep_fp32` (default `fp32_nodes`) stays in float."""
    try:
        import nncf
    except ImportError:
        raise UserError("export.py: --include openvino --int8 needs nncf (pip install nncf)") from None
    nncf.set_log_level(logging.WARNING)  # its INFO lines list every node it leaves alone
    names = [op.get_friendly_name() for op in model.get_ordered_ops()]
    ignored = nncf.IgnoredScope(names=fp32_nodes(names) if keep_fp32 is None else list(keep_fp32), validate=False)
    # activation ranges from the min/max over all images, as ONNX Runtime's MinMax: NNCF's default (the mean of
    # per-image ranges) clipped the class logits of a fitted model (scores 0.96 -> 0.25, tests/test_formats.py)
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet
    advanced = nncf.AdvancedQuantizationParameters(activations_range_estimator_params=RangeEstimatorParametersSet.MINMAX)
    from utils.deploy.signal_stack import same_signal_stack  # NNCF compiles the model for its statistics
    with quiet_quantizers(), same_signal_stack():
        return nncf.quantize(model, nncf.Dataset(images), preset=nncf.QuantizationPreset.MIXED,
                             subset_size=len(images), ignored_scope=ignored, advanced_parameters=advanced)


def quantize_openvino_for_cpu(model, images: Sequence[np.ndarray]) -> tuple[object, str | None]:
    """quantize_openvino with the convolutions that this CPU runs faster in float left in float (measured:
    utils.deploy.int8_layers). Returns (model, the float precision those run in, or None when none is left)."""
    from utils.deploy import int8_layers
    names = [op.get_friendly_name() for op in model.get_ordered_ops()]
    keep, precision, line = int8_layers.float_layers(model, images, quantize_openvino)
    LOGGER.info(f"OpenVINO INT8: {line}; --int8-all quantizes every one (a smaller file)")
    if not keep:
        return quantize_openvino(model, images), None
    return quantize_openvino(model, images, keep_fp32=list(dict.fromkeys(fp32_nodes(names) + keep))), precision

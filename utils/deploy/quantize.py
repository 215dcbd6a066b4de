"""INT8 post-training quantization of exported models, calibrated on training images of the data YAML.

The calibration images go through inference's own preprocessing (utils.data.augment.preprocess_image at the
export size, RGB, 0..1), evenly spaced over the train split. ONNX: ONNX Runtime's static quantization (QDQ
format, per-channel symmetric int8 weights, uint8 activations with MinMax ranges). OpenVINO: NNCF's
post-training quantization of the OpenVINO model itself (no torch involved) on the same images.
Both keep the detect head's box decoding (the DFL softmax and expectation, anchor arithmetic, score sigmoid)
and the attention's softmax and matmuls in fp32 (`fp32_nodes`): int8 pixel coordinates would step in 1/256
of the image size.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from utils.data import imread, load_data_config
from utils.data.augment import preprocess_image
from utils.data.verify import collect_image_files
from utils.general import LOGGER, UserError

DEFAULT_IMAGES = 200  # calibration images


def calibration_images(data: str | Path, hw: tuple[int, int], stride: int, n: int = DEFAULT_IMAGES,
                       auto: bool = False) -> list[np.ndarray]:
    """n training images of `data` (evenly spaced), each a float32 [1, 3, h, w] array as the model sees it.
    auto=False letterboxes to exactly hw (fixed-size exports), True with minimal padding (dynamic ones)."""
    if n < 1:
        raise UserError(f"--calib-images {n}: must be at least 1")
    cfg = load_data_config(data)
    files, _ = collect_image_files(cfg.train)
    if not files:
        raise UserError(f"{cfg.yaml_file}: no training images to calibrate INT8 with")
    pick = np.unique(np.linspace(0, len(files) - 1, min(n, len(files))).round().astype(int))
    out = []
    for i in pick:
        img, _ = preprocess_image(imread(str(files[i])), hw, stride, auto=auto)
        out.append((img[None].astype(np.float32) / 255.0))
    LOGGER.info(f"INT8 calibration: {len(out)} images of {Path(cfg.yaml_file).name} train ({len(files)} in all), "
                f"letterboxed to {hw[0]}x{hw[1]}")
    return out


def fp32_nodes(names: Sequence[str]) -> list[str]:
    """Nodes to leave in fp32, from their torch.onnx scope names (kept by the conversion to OpenVINO):
    the detect head's decoding (nodes of the last layer /model.<last>/ outside its convolution branches
    cv2..cv5) and the Mobile MQA attention (Softmax and MatMul nodes elsewhere). Why: quantizing the decoding
    puts pixel coordinates and DFL expectations on a 256-level grid (benchmarks/bench_formats.py --sensitivity
    measures mAP50-95 with each part quantized)."""
    layer = re.compile(r"^/model\.(\d+)/")
    idx = [int(m.group(1)) for n in names if (m := layer.match(n))]
    if not idx:
        return []
    head = f"/model.{max(idx)}/"
    branch = re.compile(re.escape(head) + r"cv\d+\.")
    attention = re.compile(r"/(Softmax|MatMul)(_\d+)?$")
    return [n for n in names if (n.startswith(head) and not branch.match(n))
            or (not n.startswith(head) and attention.search(n))]


def quantize_onnx(src: Path, dst: Path, images: list[np.ndarray], keep_fp32: Sequence[str] | None = None) -> Path:
    """Static INT8 copy of the ONNX file `src`, metadata kept: QDQ, per-channel symmetric int8 weights, uint8
    activations (x86 runs u8 x s8; s8 activations left most convolutions unfused here, 2x slower than fp32).
    keep_fp32: node names to leave unquantized (default `fp32_nodes`)."""
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
    exclude = fp32_nodes([n.name for n in model.graph.node]) if keep_fp32 is None else list(keep_fp32)
    quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, nodes_to_exclude=exclude,
                    extra_options={"CalibMaxIntermediateOutputs": 16})
    q = onnx.load(str(dst))
    del q.metadata_props[:]
    q.metadata_props.extend(model.metadata_props)  # names / stride / imgsz travel with the file
    onnx.save(q, str(dst))
    return dst


def quantize_openvino(model, images: list[np.ndarray], keep_fp32: Sequence[str] | None = None):
    """NNCF post-training INT8 quantization of an openvino.Model (mixed preset: symmetric weights,
    asymmetric activations, MinMax activation ranges); `keep_fp32` (default `fp32_nodes`) stays in fp32."""
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
    return nncf.quantize(model, nncf.Dataset(images), preset=nncf.QuantizationPreset.MIXED,
                         subset_size=len(images), ignored_scope=ignored, advanced_parameters=advanced)

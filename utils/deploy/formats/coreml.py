"""Core ML: `<name>.mlpackage`, an ML program converted by coremltools from the torch.export program (export mode:
static shapes, so the Mobile MQA shape arithmetic is constants). Input `images` float32 [B, 3, H, W] RGB in
0..1 (letterboxed), output `output0` float32 [B, 4 + nc, A] (xywh pixels + class scores); class names, stride,
nc and image size are JSON strings in the model's user-defined metadata. fp32 compute unless --half (fp16,
which the Apple Neural Engine needs). Core ML runs only on Apple devices: this machine writes the file and
checks its spec, macOS / iOS run it.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from utils.deploy.formats.base import ExportJob, Format, first_line_and_reason, quiet
from utils.general import UserError

INPUT, OUTPUT = "images", "output0"


def _quiet():
    """coremltools on Linux logs that its Apple runtime is absent, that this torch is newer than it was tested
    with, and draws progress bars: none of it concerns the user, errors still propagate."""
    return quiet("coremltools")


def _describe(ml, meta: dict, half: bool) -> None:
    b, (h, w), nc = meta["batch"], meta["imgsz"], meta["nc"]
    ml.short_description = (f"Object detector ({meta.get('model') or 'YOLOv9'}, {nc} classes, stride {meta['stride']}); "
                            f"boxes and class scores of every anchor: apply a confidence threshold and NMS")
    ml.input_description[INPUT] = (f"float32 [{b}, 3, {h}, {w}]: RGB image(s) scaled to 0..1, letterboxed to "
                                   f"{h}x{w} (resize keeping aspect, pad with 114/255 grey)")
    ml.output_description[OUTPUT] = (f"float32 [{b}, {4 + nc}, anchors]: per anchor x_center, y_center, width, "
                                     f"height in input pixels, then {nc} class scores (sigmoid)")
    ml.version = "fp16" if half else "fp32"
    for k, v in meta.items():
        ml.user_defined_metadata[k] = json.dumps(v)


def export(job: ExportJob, f: Path) -> Path:
    with _quiet():
        import coremltools as ct
        ep = job.exported_program().run_decompositions()  # core ATen ops (new_ones -> full, ...) coremltools reads
        try:
            ml = ct.convert(ep, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS15,
                            compute_precision=ct.precision.FLOAT16 if job.opts.half else ct.precision.FLOAT32)
        except Exception as e:  # an op coremltools does not know, named on the first line
            raise UserError(f"export.py --include coreml: coremltools could not convert the model "
                            f"({first_line_and_reason(e)})") from None
        spec = ml.get_spec()
        ct.utils.rename_feature(spec, spec.description.input[0].name, INPUT)
        ct.utils.rename_feature(spec, spec.description.output[0].name, OUTPUT)
        ml = ct.models.MLModel(spec, weights_dir=ml.weights_dir, skip_model_load=True)
        _describe(ml, {**job.meta_for(FORMAT), "half": bool(job.opts.half)}, job.opts.half)
        part = f.with_name(f.stem + "-partial" + f.suffix)  # coremltools wants the .mlpackage ending
        try:
            ml.save(str(part))
            if f.is_dir():
                shutil.rmtree(f)
            part.rename(f)
        finally:
            shutil.rmtree(part, ignore_errors=True)
    return f


FORMAT = Format(
    name="coreml", title="Core ML", order=70, suffix=".mlpackage", folder=True,
    export=export, load=None, marker="Data/com.apple.CoreML/*.mlmodel", file_suffixes=(".mlmodel",),
    export_packages=(("coremltools", "coremltools"),),
    half="fp16 compute (for the Neural Engine)", runs_here=False, half_file=True,
    runs_on="macOS, iOS and iPadOS",
)

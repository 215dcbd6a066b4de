"""Deployment in one place: re-parameterise dual-head models to GELAN (reparam), export to TorchScript/ONNX
(export), import upstream YOLOv9 checkpoints safely (upstream)."""

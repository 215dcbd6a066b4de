"""Data package: data YAML, verified YOLO datasets with a memory-mapped label store, augmentations, loaders,
synthetic default."""
from .augment import letterbox, max_random_imgsz, random_imgsz
from .config import DataConfig, load_data_config
from .dataset import YOLODataset
from .images import imread
from .loader import create_dataloader, multi_scale, seed_worker
from .synthetic import generate_shapes
from .verify import IMG_FORMATS, img2label_paths, scan_dataset

__all__ = ["DataConfig", "load_data_config", "create_dataloader", "YOLODataset", "letterbox", "generate_shapes",
           "img2label_paths", "random_imgsz", "max_random_imgsz", "multi_scale", "seed_worker", "imread",
           "scan_dataset", "IMG_FORMATS"]

"""Image/mask loading, the MVTec AD folder reader and deterministic synthetic demo data."""

from anomalens.data.io import (
    IMAGE_EXTENSIONS,
    MAX_IMAGE_PIXELS,
    list_images,
    load_image,
    load_mask,
    to_rgb_array,
)
from anomalens.data.mvtec import Sample, load_sample_mask, test_samples, training_images
from anomalens.data.synthetic import (
    DEFECT_TYPES,
    TEXTURES,
    add_defect,
    make_category,
    make_dataset,
    normal_crop,
)

__all__ = [
    "DEFECT_TYPES",
    "IMAGE_EXTENSIONS",
    "MAX_IMAGE_PIXELS",
    "TEXTURES",
    "Sample",
    "add_defect",
    "list_images",
    "load_image",
    "load_mask",
    "load_sample_mask",
    "make_category",
    "make_dataset",
    "normal_crop",
    "test_samples",
    "to_rgb_array",
    "training_images",
]

"""Datasets of the DenseNet paper read from their real file formats: CIFAR-10/100 (binary and python
releases), SVHN (.mat), image-folder trees (ImageNet layout, directories or zips).

    from densenet.data import DATASETS, build_data, DataError
    data = build_data("cifar10+", "/data/cifar-10-python.tar.gz", batch_size=64, val_size=5000)
    for images, labels in data.train.batches(epoch, start=step):  # (64, 3, 32, 32) float32, (64,) int64
        ...
"""
from .archive import safe_extract
from .build import DATASETS, IMAGENET_MEAN, IMAGENET_STD, SAMPLE_PATH, Data, build_data, channel_stats
from .cache import cache_dir
from .download import RESOURCES
from .download import download as download_dataset
from .errors import DataError, DataNotFound, ExpansionRefused, check_finite
from .folder import DEFAULT_MAX_PIXELS, IMAGE_SUFFIXES, ImageTree, decode_image, open_image, scan_tree
from .image_reading import ImageOptions, eval_view, fit_image, match_channels, read_image
from .loader import ArrayLoader, FolderLoader
from .transforms import eval_image

__all__ = [
    "DATASETS", "Data", "build_data", "DataError", "DataNotFound", "ArrayLoader", "FolderLoader", "ImageTree", "scan_tree",
    "decode_image", "safe_extract", "download_dataset", "RESOURCES", "cache_dir", "channel_stats", "SAMPLE_PATH",
    "IMAGENET_MEAN", "IMAGENET_STD", "DEFAULT_MAX_PIXELS", "ExpansionRefused", "check_finite", "IMAGE_SUFFIXES",
    "open_image", "eval_image", "ImageOptions", "read_image", "fit_image", "match_channels", "eval_view",
]

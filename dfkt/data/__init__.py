"""Data: named digit domains, in-memory arrays, image lists/folders, torchvision sets, corruptions."""
from dfkt.data.arrays import (ArrayDataset, load_digits_images, load_mnist10k, load_npz, normalize, require_file,
                              resolve_data_root, to_float)
from dfkt.data.corruptions import CORRUPTIONS, Corrupt, check_corruption, corrupt
from dfkt.data.domains import get_domain, list_domains, split_indices
from dfkt.data.images import IMAGENET_MEAN, IMAGENET_STD, ImageFolder, ImageList, default_transforms
from dfkt.data.indexed import IndexedDataset, Subset
from dfkt.data.torchvision_sets import default_transform, list_torchvision_datasets, torchvision_dataset

__all__ = [
    "ArrayDataset", "load_npz", "load_digits_images", "load_mnist10k", "normalize", "require_file", "resolve_data_root",
    "to_float", "CORRUPTIONS", "Corrupt", "check_corruption", "corrupt", "get_domain", "list_domains",
    "split_indices", "IMAGENET_MEAN", "IMAGENET_STD", "ImageFolder", "ImageList", "default_transforms",
    "IndexedDataset", "Subset", "default_transform", "list_torchvision_datasets", "torchvision_dataset",
]

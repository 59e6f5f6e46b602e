"""Lightning DataModules: bundled digits (offline), their digits-C corruptions, image folders for data on disk,
Gaussian-mixture points, the 2-D ring of Gaussians, and the test streams of the TTA benchmarks (CIFAR-10-C,
CIFAR-100-C, ImageNet-C, ImageNet-R/A, any ImageFolder and its on-the-fly corruptions)."""

from entreg.data.cache import ArrayCache
from entreg.data.cifar_c import CIFAR10CDataModule, CIFAR100CDataModule, CIFARCDataModule
from entreg.data.corruptions import COMMON_CORRUPTIONS, corrupt_images
from entreg.data.digits import DigitsDataModule
from entreg.data.digits_c import DigitsCCache, corrupt_digits, corruption_names, default_cache_dir
from entreg.data.folder_c import ImageFolderCDataModule
from entreg.data.folder_streams import ImageFolderStream, ImageNetADataModule, ImageNetRDataModule
from entreg.data.folders import CIFAR10DataModule, ImageFolderDataModule
from entreg.data.gmm import GaussianMixtureDataModule
from entreg.data.imagenet_c import ImageNetCDataModule, read_image_ids
from entreg.data.imagenet_classes import IMAGENET_A_CLASSES, IMAGENET_R_CLASSES, IMAGENET_WNIDS
from entreg.data.imagenet_ids import robustbench_imagenet_c_ids
from entreg.data.ring import RingDataModule, ring_mixture
from entreg.data.shifts import ShiftedDigitsDataModule
from entreg.data.streams import BenchmarkStream, Domain, stream_order

__all__ = [
    "COMMON_CORRUPTIONS",
    "IMAGENET_A_CLASSES",
    "IMAGENET_R_CLASSES",
    "IMAGENET_WNIDS",
    "ArrayCache",
    "BenchmarkStream",
    "CIFAR10CDataModule",
    "CIFAR10DataModule",
    "CIFAR100CDataModule",
    "CIFARCDataModule",
    "DigitsCCache",
    "DigitsDataModule",
    "Domain",
    "GaussianMixtureDataModule",
    "ImageFolderCDataModule",
    "ImageFolderDataModule",
    "ImageFolderStream",
    "ImageNetADataModule",
    "ImageNetCDataModule",
    "ImageNetRDataModule",
    "RingDataModule",
    "ShiftedDigitsDataModule",
    "corrupt_digits",
    "corrupt_images",
    "corruption_names",
    "default_cache_dir",
    "read_image_ids",
    "ring_mixture",
    "robustbench_imagenet_c_ids",
    "stream_order",
]

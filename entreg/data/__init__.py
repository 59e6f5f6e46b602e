"""Lightning DataModules: bundled digits (offline), their digits-C corruptions, image folders for data on disk,
Gaussian-mixture points and the 2-D ring of Gaussians."""

from entreg.data.digits import DigitsDataModule
from entreg.data.digits_c import DigitsCCache, corrupt_digits, corruption_names, default_cache_dir
from entreg.data.folders import CIFAR10DataModule, ImageFolderDataModule
from entreg.data.gmm import GaussianMixtureDataModule
from entreg.data.ring import RingDataModule, ring_mixture
from entreg.data.shifts import ShiftedDigitsDataModule

__all__ = [
    "CIFAR10DataModule",
    "DigitsCCache",
    "DigitsDataModule",
    "GaussianMixtureDataModule",
    "ImageFolderDataModule",
    "RingDataModule",
    "ShiftedDigitsDataModule",
    "corrupt_digits",
    "corruption_names",
    "default_cache_dir",
    "ring_mixture",
]

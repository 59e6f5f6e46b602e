"""Lightning DataModules: bundled digits (offline) and image folders for users with data on disk."""

from entreg.data.digits import DigitsDataModule
from entreg.data.folders import CIFAR10DataModule, ImageFolderDataModule
from entreg.data.shifts import ShiftedDigitsDataModule

__all__ = ["CIFAR10DataModule", "DigitsDataModule", "ImageFolderDataModule", "ShiftedDigitsDataModule"]

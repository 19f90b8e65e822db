"""LightningDataModules and dataset sources of refine-pl."""

from datamodules.backdoor import BackdoorDataModule, RefineDataModule, VictimDataModule
from datamodules.sources import DatasetSource, EmbeddedMNIST

__all__ = ["BackdoorDataModule", "DatasetSource", "EmbeddedMNIST", "RefineDataModule", "VictimDataModule"]

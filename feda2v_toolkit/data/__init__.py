"""Datasets: the safetensors dataset format, the original code's caches, node splits and the demo data."""

from feda2v_toolkit.data.dataset import Batch, Dataset
from feda2v_toolkit.data.open import open_dataset
from feda2v_toolkit.data.writer import DatasetWriter, write_dataset

__all__ = ["Batch", "Dataset", "DatasetWriter", "open_dataset", "write_dataset"]

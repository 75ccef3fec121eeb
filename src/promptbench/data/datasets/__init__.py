"""Dataset registry: every `Dataset` subclass with a `name` registers itself here."""

from promptbench.data.datasets.base import DATASETS, Dataset
from promptbench.data.datasets.folder import FolderDataset
from promptbench.data.datasets.synthetic import SyntheticDataset

__all__ = ["DATASETS", "Dataset", "FolderDataset", "SyntheticDataset"]

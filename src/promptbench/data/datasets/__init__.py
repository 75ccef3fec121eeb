"""Dataset registry: every `Dataset` subclass with a `name` registers itself here."""

from promptbench.data.datasets.base import DATASETS, Dataset
from promptbench.data.datasets.benchmark import BenchmarkDataset, open_dataset
from promptbench.data.datasets.coop import (
    DTD,
    FGVCAircraft,
    Caltech101,
    EuroSAT,
    Food101,
    OxfordFlowers,
    OxfordPets,
    StanfordCars,
    SUN397,
    UCF101,
)
from promptbench.data.datasets.folder import FolderDataset
from promptbench.data.datasets.imagenet import (
    ImageNet,
    ImageNetA,
    ImageNetFamily,
    ImageNetR,
    ImageNetSketch,
    ImageNetV2,
    imagenet_labels,
)
from promptbench.data.datasets.synthetic import SyntheticDataset

__all__ = [
    "DATASETS", "Dataset", "BenchmarkDataset", "open_dataset", "FolderDataset", "SyntheticDataset",
    "DTD", "FGVCAircraft", "Caltech101", "EuroSAT", "Food101", "OxfordFlowers", "OxfordPets", "StanfordCars",
    "SUN397", "UCF101", "ImageNet", "ImageNetA", "ImageNetFamily", "ImageNetR", "ImageNetSketch", "ImageNetV2",
    "imagenet_labels",
]

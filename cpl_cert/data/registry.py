"""What cpl-cert knows about each named dataset: shape, classes, normalisation, radii, file layout."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import CplCertError

MNIST_EPS = ("0.1", "0.25", "0.5", "1.0")
CIFAR_EPS = ("36/255", "72/255", "108/255")
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
"""The MNIST-family files of each split (images, labels), plain or with ``.gz``."""


@dataclass(frozen=True)
class DatasetSpec:
    """A named dataset: what its images look like and where its files live.

    ``file_format`` is ``idx`` (MNIST family) or ``cifar`` (pickled batches); ``folder`` is the folder
    torchvision's download creates (``FashionMNIST``, with the IDX files under ``raw/``, or
    ``cifar-10-batches-py``); ``files`` names each split's files in that folder.
    """

    name: str
    input_shape: tuple[int, int, int]
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    default_eps: tuple[str, ...]
    file_format: str
    folder: str
    torchvision_class: str
    files: dict[str, tuple[str, ...]] = field(default_factory=dict)
    label_key: str = ""
    system_dirs: tuple[str, ...] = ()
    system_package: str = ""
    """The Debian package that installs a system copy, when there is one."""


SPECS: dict[str, DatasetSpec] = {
    "fashion-mnist": DatasetSpec(
        "fashion-mnist", (1, 28, 28), FASHION_CLASSES, (0.2860,), (0.3530,), MNIST_EPS,
        "idx", "FashionMNIST", "FashionMNIST", IDX_FILES, system_dirs=("/usr/share/datasets/fashion-mnist",),
        system_package="dataset-fashion-mnist",
    ),
    "mnist": DatasetSpec(
        "mnist", (1, 28, 28), tuple(str(i) for i in range(10)), (0.1307,), (0.3081,), MNIST_EPS,
        "idx", "MNIST", "MNIST", IDX_FILES, system_dirs=("/usr/share/datasets/mnist",),
    ),
    "cifar10": DatasetSpec(
        "cifar10", (3, 32, 32), CIFAR10_CLASSES, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), CIFAR_EPS,
        "cifar", "cifar-10-batches-py", "CIFAR10",
        {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}, label_key="labels",
    ),
    "cifar100": DatasetSpec(
        "cifar100", (3, 32, 32), tuple(f"class-{i}" for i in range(100)), (0.5071, 0.4865, 0.4409),
        (0.2673, 0.2564, 0.2762), CIFAR_EPS, "cifar", "cifar-100-python", "CIFAR100",
        {"train": ("train",), "test": ("test",)}, label_key="fine_labels",
    ),
}

SPLITS = ("train", "test")


def check_name(name: str) -> DatasetSpec | None:
    """The spec of a named dataset (``None`` for ``folder:PATH``); one sentence for an unknown name."""
    if name.startswith("folder:"):
        return None
    if name not in SPECS:
        raise CplCertError(f"unknown dataset {name!r}; choose one of {', '.join(dataset_names())}")
    return SPECS[name]


def check_fits(name: str, input_shape: tuple[int, ...], num_classes: int) -> None:
    """Before any file is read or downloaded: refuse a named dataset whose images or classes do not fit a model."""
    spec = check_name(name)
    if spec is None:
        return
    if tuple(spec.input_shape) != tuple(input_shape):
        raise CplCertError(f"the {name} images have shape {tuple(spec.input_shape)} but the model expects {tuple(input_shape)}")
    if len(spec.classes) != num_classes:
        raise CplCertError(f"{name} has {len(spec.classes)} classes but the model predicts {num_classes}")


def dataset_names() -> list[str]:
    """Every name ``load_dataset`` accepts (``folder:PATH`` stands for any ImageFolder tree)."""
    return [*SPECS, "folder:PATH"]

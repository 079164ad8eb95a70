"""Datasets by name, found offline first, held as one uint8 tensor (moved to the device once).

Resolution order for a named dataset: ``--data-dir``, ``$CPL_CERT_DATA``, a system copy (Debian's
``dataset-fashion-mnist``), the Fashion-MNIST test split shipped inside this package, then a
torchvision download into the cache (skipped when ``$CPL_CERT_OFFLINE`` is set). When nothing works,
one sentence says where it looked and how to get the data.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import CplCertError

PACKAGE_DATA = Path(__file__).parent
SHIPPED_FASHION_MNIST = PACKAGE_DATA / "fashion-mnist"


@dataclass(frozen=True)
class DatasetSpec:
    """What cpl-cert knows about a named dataset."""

    name: str
    input_shape: tuple[int, int, int]
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    default_eps: tuple[str, ...]
    torchvision_class: str = ""
    raw_folder: str = ""
    system_dirs: tuple[str, ...] = ()


MNIST_EPS = ("0.1", "0.25", "0.5", "1.0")
CIFAR_EPS = ("36/255", "72/255", "108/255")
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

SPECS: dict[str, DatasetSpec] = {
    "fashion-mnist": DatasetSpec(
        "fashion-mnist", (1, 28, 28), FASHION_CLASSES, (0.2860,), (0.3530,), MNIST_EPS,
        "FashionMNIST", "FashionMNIST", ("/usr/share/datasets/fashion-mnist",),
    ),
    "mnist": DatasetSpec(
        "mnist", (1, 28, 28), tuple(str(i) for i in range(10)), (0.1307,), (0.3081,), MNIST_EPS,
        "MNIST", "MNIST", ("/usr/share/datasets/mnist",),
    ),
    "cifar10": DatasetSpec(
        "cifar10", (3, 32, 32), CIFAR10_CLASSES, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), CIFAR_EPS,
        "CIFAR10", "cifar-10-batches-py",
    ),
    "cifar100": DatasetSpec(
        "cifar100", (3, 32, 32), tuple(f"class-{i}" for i in range(100)), (0.5071, 0.4865, 0.4409),
        (0.2673, 0.2564, 0.2762), CIFAR_EPS, "CIFAR100", "cifar-100-python",
    ),
}

DOWNLOAD_TIMEOUT_S = 10.0
"""Socket timeout of a dataset download: no answer in this many seconds means no network."""

MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


@dataclass
class ImageDataset:
    """A split held in memory: ``images`` uint8 ``(N, C, H, W)``, ``labels`` int64 ``(N,)``."""

    name: str
    split: str
    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str = ""
    default_eps: tuple[str, ...] = MNIST_EPS
    extra: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def subset(self, limit: int | None) -> "ImageDataset":
        """The first ``limit`` points (all when ``None``)."""
        if limit is None:
            return self
        if limit < 1:
            raise CplCertError(f"--limit must be a positive number of points, got {limit}")
        return ImageDataset(
            self.name, self.split, self.images[:limit], self.labels[:limit], self.classes,
            self.mean, self.std, self.source, self.default_eps, self.extra,
        )

    def metadata(self) -> dict[str, Any]:
        """The ``dataset`` entry of a checkpoint's metadata."""
        return {
            "name": self.name,
            "input_shape": list(self.input_shape),
            "num_classes": self.num_classes,
            "classes": list(self.classes),
            "mean": list(self.mean),
            "std": list(self.std),
        }


def to_float_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 pixels to floats in [0, 1] (float inputs pass through)."""
    return images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()


def cache_dir() -> Path:
    """Where decompressed copies and downloads go: ``$CPL_CERT_CACHE`` or ``~/.cache/cpl-cert``."""
    base = os.environ.get("CPL_CERT_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"), "cpl-cert")
    return Path(base)


def _find_idx_dir(candidate: Path, spec: DatasetSpec, split: str) -> Path | None:
    """The folder under ``candidate`` holding the split's IDX files (gzipped or not), if any."""
    images_name = MNIST_FILES[split][0]
    for folder in (candidate, candidate / spec.raw_folder / "raw", candidate / spec.name, candidate / spec.raw_folder):
        if (folder / images_name).is_file() or (folder / f"{images_name}.gz").is_file():
            return folder
    return None


def _stage_uncompressed(source: Path, spec: DatasetSpec, split: str) -> Path:
    """Copy the split's IDX files, uncompressed, to ``<cache>/<tag>/<raw_folder>/raw`` for torchvision."""
    # The tag names the source folder and its files' sizes and times, so a changed source is staged afresh.
    stamps = [str(source.resolve())]
    for name in MNIST_FILES[split]:
        file = source / name if (source / name).is_file() else source / f"{name}.gz"
        stat = file.stat()
        stamps.append(f"{file.name}:{stat.st_size}:{stat.st_mtime_ns}")
    tag = f"{spec.name}-{hashlib.sha256('|'.join(stamps).encode()).hexdigest()[:12]}"
    root = cache_dir() / tag
    raw = root / spec.raw_folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for name in MNIST_FILES[split]:
        target = raw / name
        if target.is_file():
            continue
        tmp = raw / f".{name}.{os.getpid()}.tmp"
        if (source / name).is_file():
            shutil.copyfile(source / name, tmp)
        else:
            with gzip.open(source / f"{name}.gz", "rb") as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst)
        os.replace(tmp, target)
    return root


def _load_mnist_family(root: Path, spec: DatasetSpec, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Read the uncompressed IDX files with torchvision's readers (its dataset class wants all four files)."""
    from torchvision.datasets.mnist import read_image_file, read_label_file

    raw = root / spec.raw_folder / "raw"
    images_name, labels_name = MNIST_FILES[split]
    images = read_image_file(str(raw / images_name))
    labels = read_label_file(str(raw / labels_name))
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
    return images.unsqueeze(1).contiguous(), labels.long()


def _load_cifar(root: Path, spec: DatasetSpec, split: str, download: bool) -> tuple[torch.Tensor, torch.Tensor]:
    import torchvision.datasets as tvd

    cls = getattr(tvd, spec.torchvision_class)
    ds = cls(str(root), train=(split == "train"), download=download)
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
    return images, torch.tensor(ds.targets, dtype=torch.long)


def _candidate_dirs(spec: DatasetSpec, data_dir: str | os.PathLike[str] | None, split: str) -> list[tuple[str, Path]]:
    candidates: list[tuple[str, Path]] = []
    if data_dir is not None:
        candidates.append(("--data-dir", Path(data_dir)))
    if os.environ.get("CPL_CERT_DATA"):
        candidates.append(("$CPL_CERT_DATA", Path(os.environ["CPL_CERT_DATA"])))
    candidates.extend(("system copy", Path(d)) for d in spec.system_dirs)
    if spec.name == "fashion-mnist" and split == "test":
        candidates.append(("shipped test split", SHIPPED_FASHION_MNIST))
    return candidates


def _load_named(spec: DatasetSpec, split: str, data_dir: str | os.PathLike[str] | None, download: bool) -> ImageDataset:
    looked: list[str] = []
    mnist_family = spec.raw_folder in ("FashionMNIST", "MNIST")
    for origin, folder in _candidate_dirs(spec, data_dir, split):
        looked.append(str(folder))
        try:
            if mnist_family:
                found = _find_idx_dir(folder, spec, split)
                if found is None:
                    continue
                images, labels = _load_mnist_family(_stage_uncompressed(found, spec, split), spec, split)
                source = f"{origin}: {found}"
            else:
                if not (folder / spec.raw_folder).is_dir():
                    continue
                images, labels = _load_cifar(folder, spec, split, download=False)
                source = f"{origin}: {folder}"
        except (OSError, RuntimeError, ValueError, EOFError) as exc:
            raise CplCertError(f"the {spec.name} files in {folder} are unreadable ({exc})") from None
        return ImageDataset(spec.name, split, images, labels, spec.classes, spec.mean, spec.std, source, spec.default_eps)
    if download and not os.environ.get("CPL_CERT_OFFLINE"):
        root = cache_dir() / "downloads"
        try:
            return _download(spec, split, root)
        except Exception:  # noqa: BLE001 - any download failure ends in the one sentence below
            failure = f"a download into {root} failed (no network?)"
    else:
        failure = "downloads are off" + (" ($CPL_CERT_OFFLINE is set)" if download else "")
    where = f"looked in {', '.join(looked)}" if looked else "no local copy is known"
    raise CplCertError(
        f"could not find the {spec.name} {split} split: {where} and {failure}; "
        f"fetch it on a connected machine with torchvision.datasets.{spec.torchvision_class}(ROOT, download=True) "
        f"and pass --data-dir ROOT or set $CPL_CERT_DATA=ROOT"
    )


def _download(spec: DatasetSpec, split: str, root: Path) -> ImageDataset:
    """torchvision download into ``root``, quiet (its prints and progress bars are swallowed) and with a
    socket timeout so that a machine without network fails in seconds instead of hanging."""
    import contextlib
    import io
    import socket

    root.mkdir(parents=True, exist_ok=True)
    previous_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            if spec.raw_folder in ("FashionMNIST", "MNIST"):
                import torchvision.datasets as tvd

                getattr(tvd, spec.torchvision_class)(str(root), train=(split == "train"), download=True)
                images, labels = _load_mnist_family(root, spec, split)
            else:
                images, labels = _load_cifar(root, spec, split, download=True)
    finally:
        socket.setdefaulttimeout(previous_timeout)
    return ImageDataset(spec.name, split, images, labels, spec.classes, spec.mean, spec.std, f"download: {root}", spec.default_eps)


def _load_folder(path: Path, split: str) -> ImageDataset:
    """An ImageFolder tree (``PATH/<class>/<image>``, or ``PATH/<split>/<class>/<image>``); images share one size."""
    import torchvision.datasets as tvd
    from torchvision.transforms.functional import pil_to_tensor

    root = path / split if (path / split).is_dir() else path
    if not root.is_dir():
        raise CplCertError(f"the image folder {path} does not exist")
    try:
        ds = tvd.ImageFolder(str(root))
    except (FileNotFoundError, RuntimeError) as exc:
        raise CplCertError(f"{root} is not an image folder tree ({str(exc).splitlines()[0]})") from None
    from PIL import Image

    tensors, labels = [], []
    for file, label in ds.samples:
        with Image.open(file) as image:
            # Grayscale stays one channel (ImageFolder's default loader would make it RGB).
            tensors.append(pil_to_tensor(image.convert("L" if image.mode in ("1", "L", "I", "I;16") else "RGB")))
        labels.append(label)
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) != 1:
        raise CplCertError(f"the images under {root} do not all have the same size and channels: {sorted(shapes)[:3]}")
    images = torch.stack(tensors)
    x = images.double() / 255
    channels = images.shape[1]
    mean = tuple(float(v) for v in x.mean(dim=(0, 2, 3)))
    std = tuple(max(float(v), 1e-3) for v in x.std(dim=(0, 2, 3)))
    eps = CIFAR_EPS if channels == 3 else MNIST_EPS
    return ImageDataset(f"folder:{path}", split, images, torch.tensor(labels), tuple(ds.classes), mean, std[:channels], f"folder: {root}", eps)


def dataset_names() -> list[str]:
    return [*SPECS, "folder:PATH"]


def load_dataset(
    name: str,
    split: str = "test",
    data_dir: str | os.PathLike[str] | None = None,
    download: bool = True,
) -> ImageDataset:
    """Load ``split`` ("train" or "test") of a dataset by name (see module docstring for the search order)."""
    if split not in ("train", "test"):
        raise CplCertError(f"unknown split {split!r}; use train or test")
    if name.startswith("folder:"):
        return _load_folder(Path(name[len("folder:"):]), split)
    spec = SPECS.get(name)
    if spec is None:
        raise CplCertError(f"unknown dataset {name!r}; choose one of {', '.join(dataset_names())}")
    return _load_named(spec, split, data_dir, download)


def check_compatible(dataset: ImageDataset, model_input_shape: tuple[int, ...], model_classes: int) -> None:
    """Fail with one sentence if the data do not fit the model."""
    if tuple(dataset.input_shape) != tuple(model_input_shape):
        raise CplCertError(
            f"the {dataset.name} images have shape {tuple(dataset.input_shape)} but the model expects {tuple(model_input_shape)}"
        )
    if dataset.num_classes != model_classes:
        raise CplCertError(f"{dataset.name} has {dataset.num_classes} classes but the model predicts {model_classes}")

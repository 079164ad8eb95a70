"""Finding a named dataset: ``--data-dir``, ``$CPL_CERT_DATA``, a system copy, the shipped test split, a download.

``--data-dir`` is the user's own copy: it must hold the split, or loading fails with one sentence
(numbers must never silently come from another copy). Without it, each other place is tried in that
order and the first that holds the split's files wins. ``$CPL_CERT_DATA`` is a data root that may hold
other datasets, but it must be an existing, non-empty folder (a typo stops with one sentence);
``$CPL_CERT_NO_SYSTEM_COPY`` (any non-empty value) keeps the system copy out. The download
(torchvision's, into ``$CPL_CERT_CACHE`` or ``~/.cache/cpl-cert``) is skipped when
``$CPL_CERT_OFFLINE`` is set. When nothing works, one sentence says where it looked and how to get
the data.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import socket
from pathlib import Path

import torch

from ..errors import CplCertError
from .cifar import read_batches
from .dataset import ImageDataset
from .folder import load_folder
from .idx import find_idx_file, read_idx_split
from .registry import SPLITS, DatasetSpec, check_name

SHIPPED_FASHION_MNIST = Path(__file__).parent / "fashion-mnist"
"""The Fashion-MNIST test split that ships inside the package (MIT licence, notice in that folder)."""

DOWNLOAD_TIMEOUT_S = 10.0
"""Socket timeout of a dataset download: no answer in this many seconds means no network."""

READ_ERRORS = (OSError, ValueError, EOFError, pickle.UnpicklingError)

Split = tuple[torch.Tensor, torch.Tensor, Path]


def cache_dir() -> Path:
    """Where downloads go: ``$CPL_CERT_CACHE`` or ``~/.cache/cpl-cert``."""
    base = os.environ.get("CPL_CERT_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"), "cpl-cert")
    return Path(base)


def _read_idx_dir(folder: Path, spec: DatasetSpec, split: str) -> Split | None:
    """The split from IDX files in ``folder`` or a torchvision-style subfolder of it, if any holds them."""
    images_name, labels_name = spec.files[split]
    for where in (folder, folder / spec.folder / "raw", folder / spec.name, folder / spec.folder):
        images_file = find_idx_file(where, images_name)
        labels_file = find_idx_file(where, labels_name)
        if images_file is not None and labels_file is not None:
            return (*read_idx_split(images_file, labels_file), where)
    return None


def _read_cifar_dir(folder: Path, spec: DatasetSpec, split: str) -> Split | None:
    """The split from pickled batches in ``folder/<cifar-10-batches-py>`` or ``folder`` itself, if present."""
    names = spec.files[split]
    for where in (folder / spec.folder, folder):
        if all((where / name).is_file() for name in names):
            return (*read_batches(where, names, spec.label_key), where)
    return None


def read_split(spec: DatasetSpec, folder: Path, split: str) -> Split | None:
    """``(images, labels, folder read)`` when ``folder`` holds the split, else ``None``."""
    reader = _read_idx_dir if spec.file_format == "idx" else _read_cifar_dir
    return reader(folder, spec, split)


def _env_data_dir() -> Path | None:
    """``$CPL_CERT_DATA``, a data root that may hold several datasets; one sentence when it names nothing
    usable (missing, a file, an empty folder), since a mistyped root must not pass silently to another copy."""
    value = os.environ.get("CPL_CERT_DATA")
    if not value:
        return None
    folder = Path(value)
    fix = "set it to the folder that holds your datasets, or unset CPL_CERT_DATA"
    if not folder.exists():
        raise CplCertError(f"$CPL_CERT_DATA={folder} does not exist; {fix}")
    if not folder.is_dir():
        raise CplCertError(f"$CPL_CERT_DATA={folder} is a file, not a folder; {fix}")
    if next(folder.iterdir(), None) is None:
        raise CplCertError(f"$CPL_CERT_DATA={folder} is an empty folder; {fix}")
    return folder


def _candidate_dirs(spec: DatasetSpec, split: str) -> list[tuple[str, Path]]:
    """The places to look without ``--data-dir``, in order, each with the name the data's ``source`` will give it."""
    candidates: list[tuple[str, Path]] = []
    env = _env_data_dir()
    if env is not None:
        candidates.append(("$CPL_CERT_DATA", env))
    if not os.environ.get("CPL_CERT_NO_SYSTEM_COPY"):
        candidates.extend(("system copy", Path(d)) for d in spec.system_dirs)
    if spec.name == "fashion-mnist" and split == "test":
        candidates.append(("shipped test split", SHIPPED_FASHION_MNIST))
    return candidates


def _dataset(spec: DatasetSpec, split: str, found: Split, origin: str) -> ImageDataset:
    images, labels, where = found
    return ImageDataset(spec.name, split, images, labels, spec.classes, spec.mean, spec.std, f"{origin}: {where}", spec.default_eps)


def _download(spec: DatasetSpec, split: str, root: Path) -> Split | None:
    """torchvision's download into ``root``, then our reader; quiet (its prints and progress bars are
    swallowed) and with a socket timeout so that a machine without network fails in seconds."""
    import torchvision.datasets as tvd

    root.mkdir(parents=True, exist_ok=True)
    previous_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            getattr(tvd, spec.torchvision_class)(str(root), train=(split == "train"), download=True)
    finally:
        socket.setdefaulttimeout(previous_timeout)
    return read_split(spec, root, split)


def expected_files(spec: DatasetSpec, split: str) -> str:
    """The files of ``split`` that a folder must hold, in words."""
    if spec.file_format == "idx":
        images, labels = spec.files[split]
        return f"{images}[.gz] and {labels}[.gz] (or {spec.folder}/raw/ with them)"
    return f"{spec.folder}/ with {', '.join(spec.files[split])}"


def _read(spec: DatasetSpec, folder: Path, split: str) -> Split | None:
    try:
        return read_split(spec, folder, split)
    except READ_ERRORS as exc:
        raise CplCertError(f"the {spec.name} files in {folder} are unreadable ({exc})") from None


def _from_data_dir(spec: DatasetSpec, split: str, folder: Path) -> ImageDataset:
    """The split from ``--data-dir`` or one sentence: a user's own copy is never silently replaced by another."""
    if folder.exists() and not folder.is_dir():
        raise CplCertError(f"--data-dir {folder} is a file, not a folder")
    if not folder.is_dir():
        raise CplCertError(f"--data-dir {folder} does not exist")
    found = _read(spec, folder, split)
    if found is None:
        raise CplCertError(f"--data-dir {folder} does not hold the {spec.name} {split} split: expected {expected_files(spec, split)}")
    return _dataset(spec, split, found, "--data-dir")


def _load_named(spec: DatasetSpec, split: str, data_dir: str | os.PathLike[str] | None, download: bool) -> ImageDataset:
    if data_dir is not None:
        return _from_data_dir(spec, split, Path(data_dir))
    looked: list[str] = []
    for origin, folder in _candidate_dirs(spec, split):
        looked.append(str(folder))
        found = _read(spec, folder, split)
        if found is not None:
            return _dataset(spec, split, found, origin)
    if download and not os.environ.get("CPL_CERT_OFFLINE"):
        root = cache_dir() / "downloads"
        try:
            found = _download(spec, split, root)
        except Exception:  # noqa: BLE001 - any download failure ends in the one sentence below
            found = None
        if found is not None:
            return _dataset(spec, split, found, "download")
        failure = f"a download into {root} failed (no network?)"
    else:
        failure = "downloads are off" + (" ($CPL_CERT_OFFLINE is set)" if download else "")
    where = f"looked in {', '.join(looked)}" if looked else "no local copy is known"
    if os.environ.get("CPL_CERT_NO_SYSTEM_COPY") and spec.system_dirs:
        where += " ($CPL_CERT_NO_SYSTEM_COPY is set: no system copy)"
    debian = f"on Debian, apt-get install {spec.system_package} installs it; or " if spec.system_package else ""
    raise CplCertError(
        f"could not find the {spec.name} {split} split: {where} and {failure}; {debian}"
        f"fetch it on a connected machine with torchvision.datasets.{spec.torchvision_class}(ROOT, download=True) "
        f"and pass --data-dir ROOT or set $CPL_CERT_DATA=ROOT"
    )


def load_dataset(
    name: str,
    split: str = "test",
    data_dir: str | os.PathLike[str] | None = None,
    download: bool = True,
    convert: bool = False,
) -> ImageDataset:
    """Load ``split`` ("train" or "test") of a dataset by name (see the module docstring for the search order).

    ``convert`` applies to ``folder:PATH`` only: it allows the lossless image conversions of ``cpl_cert.images``.
    """
    if split not in SPLITS:
        raise CplCertError(f"unknown split {split!r}; use train or test")
    if name.startswith("folder:"):
        return load_folder(Path(name[len("folder:") :]), split, convert)
    spec = check_name(name)
    assert spec is not None
    return _load_named(spec, split, data_dir, download)

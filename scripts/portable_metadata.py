"""Rewrite the training record of shipped checkpoints as ``cpl-cert train`` writes it today, tensors untouched.

    python scripts/portable_metadata.py --root /work models/*.safetensors

Absolute paths in ``training.args`` (``out``, ``data_dir``, a ``folder:`` dataset) and in the recorded command
become relative to ``--root`` (the folder the run was started from) or, outside it, the file name alone, as
``cpl_cert.files.portable_path`` does for new runs. Options recorded under names the command line no longer has
are renamed. Only the JSON header changes: the tensor bytes are copied as they are, and the script checks
that the SHA-256 of the tensor data is the same before and after.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import struct
from pathlib import Path

RENAMED = {"depth": "conv_depth", "dense_width": "dense_inner"}
"""Options of early ``train`` versions, by the name they have now."""
PATH_OPTIONS = ("--out", "--data-dir")


def portable(path: str | None, root: Path) -> str | None:
    """``path`` relative to ``root`` when absolute and under it, its name when absolute elsewhere."""
    if path is None or not Path(path).is_absolute():
        return path
    return str(Path(path).relative_to(root)) if Path(path).is_relative_to(root) else Path(path).name


def portable_command(command: str, root: Path) -> str:
    """The recorded command line with the values of path options (and a ``folder:`` dataset) made portable."""
    words = shlex.split(command)
    for i, word in enumerate(words):
        if i > 0 and words[i - 1] in PATH_OPTIONS:
            words[i] = portable(word, root)
        elif i > 0 and words[i - 1] == "--dataset" and word.startswith("folder:"):
            words[i] = "folder:" + portable(word[len("folder:"):], root)
    return shlex.join(words)


def rewrite_training(training: dict, root: Path) -> dict:
    """The ``training`` entry with portable paths and today's option names."""
    args = {RENAMED.get(key, key): value for key, value in training.get("args", {}).items()}
    for key in ("out", "data_dir"):
        args[key] = portable(args.get(key), root)
    if str(args.get("dataset", "")).startswith("folder:"):
        args["dataset"] = "folder:" + portable(args["dataset"][len("folder:"):], root)
    for record in (args, training):
        if "command" in record:
            record["command"] = portable_command(record["command"], root)
    return {**training, "args": args}


def split_file(data: bytes) -> tuple[dict, bytes]:
    """The safetensors header (parsed) and the tensor bytes after it."""
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + length]), data[8 + length :]


def rewrite(path: Path, root: Path) -> None:
    """Rewrite ``path``'s training metadata in place; the tensor bytes are checked unchanged."""
    header, tensors = split_file(path.read_bytes())
    meta = header["__metadata__"]
    assert json.dumps(json.loads(meta["training"]), sort_keys=True) == meta["training"], "the record would change beyond the fix"
    meta["training"] = json.dumps(rewrite_training(json.loads(meta["training"]), root), sort_keys=True)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    before = hashlib.sha256(tensors).hexdigest()
    path.write_bytes(struct.pack("<Q", len(text)) + text + tensors)
    after_header, after = split_file(path.read_bytes())
    assert hashlib.sha256(after).hexdigest() == before and {k: v for k, v in after_header.items() if k != "__metadata__"} == {
        k: v for k, v in header.items() if k != "__metadata__"
    }
    print(f"{path}: tensor data sha256 {before} (unchanged)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, required=True, help="the folder the training runs were started from")
    parser.add_argument("files", type=Path, nargs="+")
    options = parser.parse_args()
    for path in options.files:
        rewrite(path, options.root)


if __name__ == "__main__":
    main()

"""Checkpoints: exact round trips, and one clear sentence (exit 1, no traceback) for every bad file."""

from __future__ import annotations

import importlib.util
import json
import re
import struct
from pathlib import Path

import pytest
import torch
from conftest import make_frozen
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import cpl_cert
from cpl_cert.checkpoint import FORMAT
from cpl_cert.cli import app

runner = CliRunner()


def test_save_load_gives_bit_identical_logits(tmp_path, tiny_model):
    path = tmp_path / "m.safetensors"
    cpl_cert.save_checkpoint(tiny_model, path, dataset={"name": "fashion-mnist"}, training={"epochs": 3})
    loaded, meta = cpl_cert.load_checkpoint(path)
    x = torch.rand(7, 1, 28, 28)
    assert torch.equal(tiny_model(x), loaded(x))
    assert meta["format"] == FORMAT and meta["dataset"]["name"] == "fashion-mnist" and meta["training"]["epochs"] == 3
    assert loaded.config == tiny_model.config
    assert not loaded.training and cpl_cert.is_frozen(loaded)
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"], "no temporary file may be left behind"


def test_save_freezes_an_unfrozen_model(tmp_path):
    torch.manual_seed(0)
    model = cpl_cert.build_model("cpl-tiny", input_shape=(1, 12, 12), num_classes=3)
    cpl_cert.save_checkpoint(model, tmp_path / "m.safetensors")
    loaded, _ = cpl_cert.load_checkpoint(tmp_path / "m.safetensors")
    assert cpl_cert.lipschitz_bounds(loaded).upper == 1.0


def test_lln_round_trip(tmp_path):
    model = make_frozen("cpl-tiny", input_shape=(3, 8, 8), num_classes=4, head="lln", std=(0.2, 0.3, 0.4))
    cpl_cert.save_checkpoint(model, tmp_path / "m.safetensors")
    loaded, _ = cpl_cert.load_checkpoint(tmp_path / "m.safetensors")
    x = torch.rand(3, 3, 8, 8)
    assert torch.equal(model(x), loaded(x))


def _rewrite(path: Path, out: Path, tensors=None, metadata=None) -> Path:
    original = load_file(str(path))
    with open(path, "rb") as handle:
        (size,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(size))
    meta = dict(header.get("__metadata__", {}))
    if metadata is not None:
        meta = metadata(meta)
    save_file(tensors(original) if tensors else original, str(out), metadata=meta)
    return out


def _bad_files(src: Path, tmp: Path) -> dict[str, Path]:
    data = src.read_bytes()
    files = {}
    files["truncated"] = tmp / "truncated.safetensors"
    files["truncated"].write_bytes(data[: len(data) // 2])
    files["truncated-header"] = tmp / "truncated-header.safetensors"
    files["truncated-header"].write_bytes(data[:20])
    files["not-safetensors"] = tmp / "text.safetensors"
    files["not-safetensors"].write_text("hello, this is not a checkpoint at all\n" * 10)
    files["pickle"] = tmp / "model.pth"
    torch.save({"weight": torch.zeros(3)}, files["pickle"])
    files["legacy-pickle"] = tmp / "legacy.pt"
    torch.save({"weight": torch.zeros(3)}, files["legacy-pickle"], _use_new_zipfile_serialization=False)
    files["no-metadata"] = _rewrite(src, tmp / "nometa.safetensors", metadata=lambda m: None)
    files["missing-config"] = _rewrite(src, tmp / "noconfig.safetensors", metadata=lambda m: {k: v for k, v in m.items() if k != "config"})
    files["malformed-config"] = _rewrite(src, tmp / "badjson.safetensors", metadata=lambda m: {**m, "config": "{not json"})
    files["config-not-object"] = _rewrite(src, tmp / "cfglist.safetensors", metadata=lambda m: {**m, "config": "[1, 2]"})
    files["config-bad-values"] = _rewrite(
        src, tmp / "cfgbad.safetensors", metadata=lambda m: {**m, "config": json.dumps({**json.loads(m["config"]), "head": "magic"})}
    )
    files["newer-format"] = _rewrite(src, tmp / "newer.safetensors", metadata=lambda m: {**m, "format": "cpl-cert/2"})
    files["foreign-format"] = _rewrite(src, tmp / "foreign.safetensors", metadata=lambda m: {**m, "format": "other/1"})

    def wrong_shape(t):
        t = dict(t)
        t["dense.0.weight"] = torch.zeros(3, 3)
        return t

    def nan_weight(t):
        t = dict(t)
        t["convs.0.weight"] = t["convs.0.weight"].clone()
        t["convs.0.weight"][0, 0, 0, 0] = float("nan")
        return t

    def inf_weight(t):
        t = dict(t)
        t["dense.1.bias"] = t["dense.1.bias"].clone()
        t["dense.1.bias"][0] = float("inf")
        return t

    def missing_tensor(t):
        return {k: v for k, v in t.items() if k != "dense.0.u"}

    def unfrozen(t):
        return {**t, "dense.0.step": torch.zeros(())}

    files["wrong-shape"] = _rewrite(src, tmp / "shape.safetensors", tensors=wrong_shape)
    files["nan"] = _rewrite(src, tmp / "nan.safetensors", tensors=nan_weight)
    files["inf"] = _rewrite(src, tmp / "inf.safetensors", tensors=inf_weight)
    files["missing-tensor"] = _rewrite(src, tmp / "missing.safetensors", tensors=missing_tensor)
    files["unfrozen"] = _rewrite(src, tmp / "unfrozen.safetensors", tensors=unfrozen)
    files["missing-file"] = tmp / "does-not-exist.safetensors"
    files["folder"] = tmp
    return files


@pytest.mark.parametrize("command", ["info", "lipschitz"])
def test_every_bad_file_gives_one_sentence_and_exit_1(tmp_path, tiny_checkpoint, command):
    for kind, path in _bad_files(tiny_checkpoint, tmp_path).items():
        result = runner.invoke(app, [command, str(path)])
        assert result.exit_code == 1, (kind, result.output)
        assert "Traceback" not in result.output, kind
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("Error:"), (kind, result.stderr)
        with pytest.raises(cpl_cert.CplCertError):
            cpl_cert.load_checkpoint(path)


def test_pickle_is_never_unpickled(tmp_path, monkeypatch):
    import pickle

    path = tmp_path / "evil.pth"
    torch.save({"x": 1}, path)
    monkeypatch.setattr(pickle, "load", lambda *a, **k: pytest.fail("pickle.load called"))
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load called"))
    with pytest.raises(cpl_cert.CplCertError, match="pickle"):
        cpl_cert.load_checkpoint(path)


def _header_len(path: Path) -> int:
    with open(path, "rb") as handle:
        return struct.unpack("<Q", handle.read(8))[0]


@pytest.mark.parametrize("low_bits, mask", [(0x80, 0xFF), (0x4B50, 0xFFFF)])
def test_valid_checkpoint_whose_header_length_looks_like_pickle_magic_loads(tmp_path, tiny_model, low_bits, mask):
    """A header length whose first bytes read 0x80 or 'PK' must not be mistaken for a pickle file."""
    path = tmp_path / "m.safetensors"
    cpl_cert.save_checkpoint(tiny_model, path, training={"pad": ""})
    base = _header_len(path)
    target = base + ((low_bits - base) & mask)
    for pad in range(max(0, target - base - 16), target - base + 16):
        cpl_cert.save_checkpoint(tiny_model, path, training={"pad": "x" * pad})
        if _header_len(path) & mask == low_bits:
            break
    assert _header_len(path) & mask == low_bits
    loaded, meta = cpl_cert.load_checkpoint(path)
    assert torch.equal(loaded(torch.zeros(1, 1, 28, 28)), tiny_model(torch.zeros(1, 1, 28, 28)))


def _edit(entry: str, change: dict | list | None = None, drop: str | None = None):
    """A metadata edit: ``entry``'s JSON updated with ``change`` (or replaced by a non-object), or ``drop`` removed."""

    def apply(meta: dict[str, str]) -> dict[str, str]:
        value = json.loads(meta[entry])
        value = {**value, **change} if isinstance(change, dict) else change
        return {**meta, entry: json.dumps(value)}

    return apply


NAN = float("nan")
BAD_METADATA = [
    # (entry, change, what the one sentence must say)
    ("dataset", {"input_shape": 5}, "dataset.input_shape must be a list of 3 whole numbers"),
    ("dataset", {"input_shape": [1, 28]}, "dataset.input_shape must be a list of 3 whole numbers"),
    ("dataset", {"input_shape": [1.0, 28, 28]}, "dataset.input_shape must be a list of 3 whole numbers"),
    ("dataset", {"num_classes": 10.0}, "dataset.num_classes must be a whole number >= 2, got 10.0"),
    ("dataset", {"num_classes": "10"}, "dataset.num_classes must be a whole number >= 2"),
    ("dataset", {"num_classes": True}, "dataset.num_classes must be a whole number >= 2, got true"),
    ("dataset", {"classes": "abcdefghij"}, "dataset.classes must be a non-empty list of strings"),
    ("dataset", {"classes": list(range(10))}, "dataset.classes must be a non-empty list of strings"),
    ("dataset", {"name": 7}, "dataset.name must be a non-empty string"),
    ("dataset", {"mean": "0.5"}, "dataset.mean must be a non-empty list of finite numbers"),
    ("dataset", {"mean": [NAN]}, "dataset.mean must be a non-empty list of finite numbers, got [NaN]"),
    ("dataset", {"std": [0.0]}, "dataset.std must be a non-empty list of finite numbers above 0"),
    ("dataset", {"std": [0.3, 0.3]}, "the dataset metadata's std has 2 values, the images have 1 channels"),
    ("dataset", {"colour": "blue"}, "dataset has an unknown key 'colour'"),
    ("dataset", [1, 28, 28], "the metadata field dataset must be a JSON object"),
    ("config", {"num_classes": 10.0}, "config.num_classes must be a whole number >= 2"),
    ("config", {"input_shape": 5}, "config.input_shape must be a list of 3 whole numbers"),
    ("config", {"input_shape": ["1", 28, 28]}, "config.input_shape must be a list of 3 whole numbers"),
    ("config", {"input_shape": [1.5, 28, 28]}, "config.input_shape must be a list of 3 whole numbers"),
    ("config", {"mean": ["0.5"]}, "config.mean must be a non-empty list of finite numbers"),
    ("config", {"std": "x"}, "config.std must be null or a non-empty list of finite numbers above 0"),
    ("config", {"head": 3}, "config.head must be a non-empty string"),
    ("config", {"preset": 5}, "config.preset must be null or a non-empty string"),
    ("config", {"channels": True}, "config.channels must be a whole number >= 1"),
    ("config", {"pool": 4.0}, "config.pool must be a whole number >= 1"),
    ("training", {"epochs": "3"}, "training.epochs must be a whole number >= 0"),
    ("training", {"seed": 0.5}, "training.seed must be a whole number"),
    ("training", {"clean_accuracy": "high"}, "training.clean_accuracy must be a finite number in [0, 1]"),
    ("training", {"clean_accuracy": 1.5}, "training.clean_accuracy must be a finite number in [0, 1]"),
    ("training", {"certified": [0.5]}, "training.certified must be an object whose values are finite numbers in [0, 1]"),
    ("training", {"certified": {"0.1": "x"}}, "training.certified must be an object whose values are finite numbers in [0, 1]"),
    ("training", {"versions": {"torch": 2}}, "training.versions must be an object whose values are strings"),
    ("training", {"loss": "hinge"}, "the metadata field training.loss must be a JSON object"),
    ("training", {"loss": {"name": 3}}, "training.loss.name must be a non-empty string"),
    ("training", {"optimizer": {"lr": "fast"}}, "training.optimizer.lr must be a finite number >= 0, got \"fast\""),
    ("training", {"wall_seconds": -1}, "training.wall_seconds must be a finite number >= 0, got -1"),
    ("training", {"args": "--epochs 3"}, "training.args must be a JSON object"),
    ("training", "trained", "the metadata field training must be a JSON object"),
]


def _commands(path: Path, tmp: Path) -> list[list[str]]:
    """Every command that reads a checkpoint, with the arguments it needs to get that far."""
    commands = [["info", str(path)], ["lipschitz", str(path)], ["certify", str(path)], ["attack", str(path)]]
    commands.append(["predict", str(path), str(tmp / "x.png")])
    if importlib.util.find_spec("onnx") is not None:
        commands.append(["export", str(path), "--onnx", str(tmp / "m.onnx")])
    return commands


def test_every_metadata_field_is_type_checked_by_every_command(tmp_path, tiny_checkpoint):
    """A table of edited metadata: each gives one sentence naming the field (exit 1, no traceback) from every
    command and ``CplCertError`` from the library; none is taken loosely (``"abcd"`` as class names, 10.0 as a count)."""
    for index, (entry, change, phrase) in enumerate(BAD_METADATA):
        path = _rewrite(tiny_checkpoint, tmp_path / f"bad{index}.safetensors", metadata=_edit(entry, change))
        for command in _commands(path, tmp_path):
            result = runner.invoke(app, command)
            lines = [line for line in result.stderr.splitlines() if line.strip()]
            assert result.exit_code == 1 and len(lines) == 1, (entry, change, command, result.output)
            assert lines[0].startswith("Error:") and phrase in lines[0] and "Traceback" not in result.output, (phrase, lines[0])
        with pytest.raises(cpl_cert.CplCertError, match=re.escape(phrase)):
            cpl_cert.load_checkpoint(path)


def test_well_typed_metadata_of_every_kind_loads(tmp_path, tiny_checkpoint):
    """Whole numbers where numbers are asked, extra training keys and partial entries are all fine."""
    extra = {"clean_accuracy": 1, "certified": {"0.25": 0}, "provenance": {"source": "x"}, "note": [1, "two"], "loss": {"name": "hinge", "margin": 1}}
    path = _rewrite(tiny_checkpoint, tmp_path / "ok.safetensors", metadata=_edit("training", extra))
    path = _rewrite(path, tmp_path / "ok2.safetensors", metadata=_edit("dataset", {"classes": [str(i) for i in range(10)], "mean": [0], "std": [1]}))
    result = runner.invoke(app, ["info", str(path)])
    assert result.exit_code == 0, result.output
    assert "clean_accuracy (per-epoch evaluation): 100.00%" in result.stdout
    _, meta = cpl_cert.load_checkpoint(path)
    assert meta["training"]["note"] == [1, "two"] and meta["dataset"]["classes"][9] == "9"


SHIPPED_MODELS = sorted((Path(__file__).resolve().parents[1] / "models").glob("*.safetensors"))


@pytest.mark.parametrize("path", SHIPPED_MODELS, ids=lambda p: p.name)
def test_shipped_models_record_portable_paths_and_todays_option_names(path):
    """No path of the machine that trained them, and a training record whose options the CLI still has
    (fmnist-cpl-best recorded /work/runs/...; the two cpl-xs models recorded depth and dense_width)."""
    from dataclasses import fields

    from safetensors import safe_open

    from cpl_cert.train import TrainOptions

    with safe_open(str(path), "pt") as handle:
        meta = handle.metadata()
    assert not re.search(r'(^|[\s"=])/(work|home|tmp|Users|root)\b', json.dumps(meta)), meta["training"]
    args = json.loads(meta["training"])["args"]
    assert set(args) == {f.name for f in fields(TrainOptions)} | {"world_size"}
    assert not Path(args["out"]).is_absolute() and f"--out {args['out']}" in args["command"]


def test_train_records_paths_relative_to_the_working_folder(tmp_path, monkeypatch):
    """An absolute --out under the working folder is recorded relative to it; a path elsewhere by its name alone."""
    import cpl_cert.cli.train as train_cli
    from cpl_cert.train import TrainResult

    seen = []
    monkeypatch.setattr(train_cli, "train", lambda options, on_event: seen.append(options) or TrainResult(options.out))
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere" / "fmnist"
    work.mkdir()
    monkeypatch.chdir(work)
    result = runner.invoke(app, ["train", "--out", str(work / "runs" / "m.safetensors"), "--data-dir", str(elsewhere),
                                 "--dataset", f"folder:{tmp_path / 'pictures'}"])
    assert result.exit_code == 0, result.output
    record = seen[0].record(1)
    assert (record["out"], record["data_dir"], record["dataset"]) == ("runs/m.safetensors", "fmnist", "folder:pictures")
    assert record["command"] == "cpl-cert train --out runs/m.safetensors --dataset folder:pictures --data-dir fmnist"
    assert str(tmp_path) not in json.dumps(record)


def test_a_torch_file_points_to_import(tmp_path):
    """``info best_model.pt``: the sentence says which command reads such files."""
    torch.save({"weight": torch.zeros(3)}, tmp_path / "best_model.pt")
    result = runner.invoke(app, ["info", str(tmp_path / "best_model.pt")])
    assert result.exit_code == 1 and len(result.stderr.strip().splitlines()) == 1
    assert "cpl-cert import" in result.stderr and "reference code" in result.stderr


def test_train_passes_every_option_it_takes(tmp_path, monkeypatch):
    """Each train option reaches TrainOptions under its own name (a value per option, none left at its default)."""
    import inspect
    from dataclasses import fields

    import cpl_cert.cli.train as train_cli
    from cpl_cert.train import TrainOptions, TrainResult

    parameters = set(inspect.signature(train_cli.train_command).parameters) - {"ctx", "threads"}
    assert parameters == {f.name for f in fields(TrainOptions)} - {"command"}
    seen = []
    monkeypatch.setattr(train_cli, "train", lambda options, on_event: seen.append(options) or TrainResult(options.out))
    args = ["train", "--out", str(tmp_path / "m.safetensors"), "--model", "cpl-tiny", "--dataset", "mnist", "--epochs", "3",
            "--loss", "offset-ce", "--margin", "0.5", "--offset", "1.5", "--temperature", "0.5", "--optimizer", "sgd", "--lr", "0.01",
            "--momentum", "0.8", "--weight-decay", "0.001", "--batch-size", "64", "--augment", "none", "--seed", "7", "--device", "cpu",
            "--std-normalize", "--conv-depth", "2", "--channels", "8", "--dense-depth", "1", "--dense-inner", "32", "--conv-inner", "4",
            "--head", "lln", "--data-dir", str(tmp_path), "--train-limit", "100", "--eval-limit", "50", "--save-every", "2", "--resume",
            "--overwrite", "--compile", "--bf16", "--freeze-iters", "5", "--stop-after", "2"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    defaults = TrainOptions(out=tmp_path / "m.safetensors")
    unchanged = [f.name for f in fields(TrainOptions) if f.name not in ("out", "command") and getattr(seen[0], f.name) == getattr(defaults, f.name)]
    assert unchanged == []
    assert (seen[0].epochs, seen[0].head, seen[0].limit_train, seen[0].stop_after) == (3, "lln", 100, 2)

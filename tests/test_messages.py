"""Messages that name the fix: one sentence, exit 1, checked before any data is loaded where they can be."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from conftest import make_frozen
from formats import write_idx_split
from typer.testing import CliRunner

import cpl_cert
import cpl_cert.loading as loading
import cpl_cert.train.setup as train_setup
from cpl_cert.cli import app
from cpl_cert.errors import CplCertError

runner = CliRunner()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    model = make_frozen("cpl-tiny", channels=4, conv_depth=1, dense_depth=1, conv_inner=4, dense_inner=32)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    cpl_cert.save_checkpoint(model, path, dataset={"name": "fashion-mnist"})
    return path


@pytest.fixture
def no_data_loading(monkeypatch):
    """Any attempt to load a dataset fails the test (the message must come first)."""

    def refuse(*args, **kwargs):
        raise AssertionError("a dataset was loaded before the options were checked")

    monkeypatch.setattr(loading, "load_dataset", refuse)
    monkeypatch.setattr(train_setup, "load_dataset", refuse)


def one_sentence(result) -> str:
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "Traceback" not in result.output, result.output
    return lines[0][len("Error: "):]


@pytest.mark.parametrize("device", ["mps", "meta", "xla"])
def test_unsupported_devices_are_named(checkpoint, device, no_data_loading):
    message = one_sentence(runner.invoke(app, ["certify", str(checkpoint), "--device", device]))
    assert message == f"device '{device}' is not supported; use auto, cpu, cuda or cuda:N"


@pytest.mark.parametrize("eps", ["-0.5", "inf", "nan", "0", "-36/255"])
def test_eps_that_is_not_a_positive_number_is_said_so(checkpoint, eps, no_data_loading):
    for command in ("certify", "attack"):
        message = one_sentence(runner.invoke(app, [command, str(checkpoint), "--eps", f"0.1,{eps}"]))
        assert message == f"eps must be positive and finite, got '{eps}'"


def test_certify_refuses_a_data_dir_without_the_split(checkpoint, tmp_path):
    message = one_sentence(runner.invoke(app, ["certify", str(checkpoint), "--data-dir", str(tmp_path)]))
    assert message.startswith(f"--data-dir {tmp_path} does not hold the fashion-mnist test split: expected t10k-images-idx3-ubyte")


def test_a_model_that_does_not_fit_the_dataset_is_refused_before_loading_it(tmp_path, no_data_loading):
    rgb = make_frozen("cpl-tiny", input_shape=(3, 32, 32), channels=4, conv_depth=0, dense_depth=1, dense_inner=8)
    cpl_cert.save_checkpoint(rgb, tmp_path / "rgb.safetensors", dataset={"name": "cifar10"})
    message = one_sentence(runner.invoke(app, ["certify", str(tmp_path / "rgb.safetensors"), "--dataset", "fashion-mnist"]))
    assert message == "the fashion-mnist images have shape (1, 28, 28) but the model expects (3, 32, 32)"
    message = one_sentence(runner.invoke(app, ["attack", str(tmp_path / "rgb.safetensors"), "--dataset", "imagenet"]))
    assert message.startswith("unknown dataset 'imagenet'; choose one of fashion-mnist")


@pytest.mark.parametrize(
    "option, value, expected",
    [
        ("--model", "cpl-huge", "unknown preset 'cpl-huge'"),
        ("--dataset", "imagenet", "unknown dataset 'imagenet'"),
        ("--loss", "mse", "unknown loss 'mse'"),
        ("--augment", "mixup", "unknown augmentation 'mixup'"),
    ],
)
def test_train_checks_names_before_loading_data(option, value, expected, tmp_path, no_data_loading):
    result = runner.invoke(app, ["train", "--out", str(tmp_path / "m.safetensors"), "--device", "cpu", option, value])
    assert one_sentence(result).startswith(expected)
    assert list(tmp_path.iterdir()) == []


def test_resume_of_a_missing_checkpoint_is_refused(tmp_path, no_data_loading):
    out = tmp_path / "typo.safetensors"
    message = one_sentence(runner.invoke(app, ["train", "--out", str(out), "--device", "cpu", "--resume"]))
    assert message == f"there is no run to resume: {out} does not exist; check --out, or leave out --resume to start a new run"
    assert not out.exists()


def test_resume_with_another_architecture_is_refused_before_loading_data(tmp_path, train_data_dir, monkeypatch):
    """A finished cpl-tiny run, resumed as cpl-xs: refused from the checkpoint's metadata alone."""
    out = tmp_path / "run.safetensors"
    first = ["train", "--model", "cpl-tiny", "--device", "cpu", "--epochs", "1", "--train-limit", "64", "--eval-limit", "32",
             "--freeze-iters", "5", "--data-dir", str(train_data_dir), "--out", str(out)]
    assert runner.invoke(app, first).exit_code == 0

    def refuse(*args, **kwargs):
        raise AssertionError("a dataset was loaded before the options were checked")

    monkeypatch.setattr(train_setup, "load_dataset", refuse)
    message = one_sentence(runner.invoke(app, [*first[:2], "cpl-xs", *first[3:], "--resume"]))
    assert message == f"cannot resume {out}: it holds a different architecture than the options ask for"


def fake_package(folder: Path, name: str, body: str) -> None:
    (folder / name).mkdir()
    (folder / name / "__init__.py").write_text(body)


def test_autoattack_engine_names_the_extra_or_the_module_that_is_really_missing(tmp_path, monkeypatch, checkpoint):
    """Without pyautoattack one sentence names the extra; if a module it imports is missing, that module."""
    from cpl_cert.attacks.authors import require_autoattack

    fake_package(tmp_path, "pyautoattack", "import cpl_cert_missing_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "pyautoattack", raising=False)
    with pytest.raises(CplCertError) as info:
        require_autoattack()
    assert str(info.value) == (
        "pyautoattack is installed but cannot be imported: it needs the module 'cpl_cert_missing_dependency', "
        "which is missing (pip install cpl_cert_missing_dependency), or use --engine native"
    )
    monkeypatch.setitem(sys.modules, "pyautoattack", None)  # not installed at all
    message = one_sentence(runner.invoke(app, ["attack", str(checkpoint), "--engine", "autoattack"]))
    assert message == (
        "the autoattack engine needs the optional package pyautoattack (Croce & Hein's AutoAttack code), which is not installed; "
        "install it with pip install pyautoattack (or pip install '.[autoattack]' in the cpl-cert folder), or use --engine native"
    )


def test_install_hints_give_commands_that_work_from_a_clone():
    """cpl-cert is installed from its repository, not an index: 'pip install cpl-cert[...]' would fail."""
    from cpl_cert.attacks.authors import INSTALL_HINT as AUTOATTACK
    from cpl_cert.cli.plots import INSTALL_HINT as PLOT
    from cpl_cert.export import INSTALL_HINT as ONNX

    for hint, package in ((PLOT, "matplotlib"), (AUTOATTACK, "pyautoattack"), (ONNX, "onnx")):
        assert f"pip install {package}" in hint and "cpl-cert[" not in hint


def test_attack_help_says_why_its_limit_is_1000():
    import typer.main

    limit = next(p for p in typer.main.get_command(app).commands["attack"].params if p.name == "limit")
    assert limit.default == 1000 and "The default is 1000, not all (as certify)" in limit.help


def test_info_labels_the_per_epoch_evaluation(tmp_path):
    model = make_frozen("cpl-tiny", channels=4, conv_depth=0, dense_depth=1, dense_inner=8)
    training = {"epochs": 3, "epochs_completed": 3, "eval_n": 2000, "clean_accuracy": 0.87, "certified": {"0.25": 0.746}}
    cpl_cert.save_checkpoint(model, tmp_path / "m.safetensors", dataset={"name": "fashion-mnist"}, training=training)
    output = runner.invoke(app, ["info", str(tmp_path / "m.safetensors")]).stdout
    assert "clean_accuracy (epoch 3 evaluation, first 2,000 test images): 87.00%" in output
    assert "certified (epoch 3 evaluation, first 2,000 test images): 0.25: 74.60%" in output


def test_output_that_is_not_a_terminal_keeps_identifiers_whole(checkpoint):
    """The sha256 and every number appear whole (no ellipsis) when the output is a pipe or a file."""
    info = runner.invoke(app, ["info", str(checkpoint)])
    assert cpl_cert.files.file_sha256(checkpoint) in info.stdout and "…" not in info.stdout
    bounds = runner.invoke(app, ["lipschitz", str(checkpoint), "--samples", "0"])
    assert bounds.exit_code == 0 and "…" not in bounds.stdout


def small_split(folder: Path, train: int = 10, test: int = 6) -> Path:
    """A Fashion-MNIST folder with ``train`` training and ``test`` test images (gzipped IDX)."""
    write_idx_split(folder, "train", train, [i % 10 for i in range(train)])
    write_idx_split(folder, "t10k", test, [i % 10 for i in range(test)])
    return folder


def test_train_that_fails_before_its_first_step_leaves_no_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "runs" / "new" / "m.safetensors"
    result = runner.invoke(app, ["train", "--out", str(out), "--device", "cpu", "--data-dir", str(tmp_path / "empty")])
    assert one_sentence(result).startswith(f"--data-dir {tmp_path / 'empty'} does not hold the fashion-mnist train split")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


def test_train_refuses_an_out_below_a_file_before_loading_data(tmp_path, no_data_loading):
    (tmp_path / "file").write_text("x")
    message = one_sentence(runner.invoke(app, ["train", "--out", str(tmp_path / "file" / "m.safetensors"), "--device", "cpu"]))
    assert message == f"cannot write {tmp_path / 'file' / 'm.safetensors'}: {tmp_path / 'file'} is a file, not a folder"


def test_a_limit_above_the_data_says_so_in_one_line(checkpoint, tmp_path):
    """Decided: a note on stderr (the command goes on with all the points), for certify, attack and train."""
    data = small_split(tmp_path / "data")
    result = runner.invoke(app, ["certify", str(checkpoint), "--data-dir", str(data), "--limit", "7", "--lower-bound-samples", "0"])
    assert result.exit_code == 0, result.output
    assert result.stderr.strip() == "Note: --limit 7 is more than the 6 points of the fashion-mnist test split; using all 6"
    assert re.search(r"points\s+│\s+6\s+│", result.stdout), result.stdout
    attack = runner.invoke(app, ["attack", str(checkpoint), "--data-dir", str(data), "--limit", "9", "--attack", "pgd", "--steps", "2"])
    assert attack.exit_code in (0, 3), attack.output
    assert "Note: --limit 9 is more than the 6 points of the fashion-mnist test split; using all 6" in attack.stderr
    trained = runner.invoke(app, ["train", "--out", str(tmp_path / "m.safetensors"), "--device", "cpu", "--model", "cpl-tiny",
                                  "--epochs", "1", "--freeze-iters", "2", "--data-dir", str(data), "--train-limit", "20",
                                  "--eval-limit", "8"])
    assert trained.exit_code == 0, trained.output
    notes = [line for line in trained.stderr.splitlines() if line.startswith("Note:")]
    assert notes == [
        "Note: --train-limit 20 is more than the 10 points of the fashion-mnist train split; using all 10",
        "Note: --eval-limit 8 is more than the 6 points of the fashion-mnist test split; using all 6",
    ]


@pytest.mark.parametrize("command", ["certify", "attack"])
def test_a_plot_name_that_is_not_png_is_refused(checkpoint, tmp_path, command, no_data_loading):
    message = one_sentence(runner.invoke(app, [command, str(checkpoint), "--plot", str(tmp_path / "p.txt")]))
    assert message == f"--plot writes a PNG image: give it a name ending in .png, not {tmp_path / 'p.txt'}"
    assert list(tmp_path.iterdir()) == []

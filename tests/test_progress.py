"""Progress: what the library reports through its callbacks, and how the command line shows it."""

from __future__ import annotations

import io
import time

import pytest
import torch
from conftest import make_frozen
from rich.console import Console
from typer.testing import CliRunner

import cpl_cert
from cpl_cert.attacks.ensemble import run_suite
from cpl_cert.certification import certificate_constants
from cpl_cert.cli import app
from cpl_cert.cli.progress import Activity, Line, clock
from cpl_cert.cli.train_display import RunClock
from cpl_cert.models import float64_copy
from cpl_cert.radii import float64_pass

runner = CliRunner()


@pytest.fixture(scope="module")
def small_model():
    return make_frozen("cpl-tiny", channels=4, conv_depth=1, dense_depth=1, conv_inner=4, dense_inner=32)


def test_certify_reports_every_stage(small_model):
    data = cpl_cert.load_dataset("fashion-mnist").subset(300)
    # An eps equal to a point's float64 lower radius bound lies inside that point's interval at every
    # precision short of float64, so the float64 stage runs.
    _, constants = certificate_constants(small_model)
    answers = float64_pass(float64_copy(small_model), constants, data.images[:20], data.labels[:20])
    on_edge = float(answers.low[(answers.low > 0) & (answers.top == data.labels[:20])][0])
    new = []
    result = cpl_cert.certify(small_model, data, eps=[0.1, on_edge], device="cpu", batch_size=128, on_progress=lambda *a: new.append(a))
    assert [a for a in new if a[0] == "float32"] == [("float32", d, 300) for d in (0, 128, 256, 300)]  # after each float32 batch
    later = [a for a in new if a[0] != "float32"]
    assert list(dict.fromkeys(a[0] for a in later)) == ["float64"]
    assert later[0] == ("float64", 0, later[-1][2]) and later[-1][1] == later[-1][2] <= result.rechecked
    assert [a[1] for a in later] == sorted(a[1] for a in later)


def suite(model, x, y, attack, **kw):
    return run_suite(model, x, y, [0.1, 0.5], attack=attack, batch_size=len(x), steps=10, **kw)


@pytest.mark.parametrize("attack", ["minnorm", "apgd"])
def test_attacks_report_progress_inside_a_batch_and_results_do_not_change(attack, small_model):
    """One batch of all points: without per-iteration reports the bar would sit at 0 until the end."""
    data = cpl_cert.load_dataset("fashion-mnist").subset(24)
    x = data.images.float() / 255
    with torch.no_grad():
        y = small_model(x).argmax(1)
    reports = []
    watched = suite(small_model, x, y, attack, on_progress=lambda *a: reports.append(a))
    plain = suite(small_model, x, y, attack)
    assert all(torch.equal(watched.distances[s], plain.distances[s]) and torch.equal(watched.sources[s], plain.sources[s]) for s in watched.distances)
    done = [d for _, d, total in reports]
    assert all(total == 24 for *_, total in reports) and done == sorted(done)
    assert len({d for d in done if 0 < d < 24}) >= 10 and done[-1] == pytest.approx(24)
    stages = list(dict.fromkeys(stage for stage, *_ in reports))
    expected = ["fmn"] if attack == "minnorm" else ["apgd-ce at eps 0.1", "apgd-t at eps 0.1", "apgd-ce at eps 0.5", "apgd-t at eps 0.5"]
    assert stages == expected


def test_line_times():
    line = Line("work", total=100, done=25, started=time.monotonic() - 10)
    assert line.remaining() == pytest.approx(30, rel=0.05)
    assert line.count_text() == "25/100" and line.plain().startswith("work: 25/100 (25 %) 0:00:10 elapsed, about 0:00:30 left")
    assert Line("status").remaining() is None and clock(3725) == "1:02:05" and clock(None) == "-:--:--"


def test_terminal_rendering_shows_bar_count_and_time_left():
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=100)
    with Activity(console) as activity:
        activity.stage("certifying", 200)
        activity.lines["stage"].started -= 4
        activity.update(50)
        activity._progress.refresh()
    text = out.getvalue()
    assert "certifying" in text and "━" in text and "50/200" in text and "0:00:12 left" in text


def test_plain_lines_when_not_a_terminal():
    out = io.StringIO()
    with Activity(Console(file=out, width=200), interval=0.05) as activity:
        activity.stage("loading", None)
        time.sleep(0.2)
        activity.stage("certifying", 10)
        activity.update(4)
        time.sleep(0.2)
    lines = out.getvalue().splitlines()
    assert lines and all("elapsed" in line for line in lines) and "\x1b" not in out.getvalue()
    assert any(line.startswith("loading: ") for line in lines) and any(line.startswith("certifying: 4/10 (40 %)") for line in lines)


def test_certify_command_prints_plain_progress_lines_when_not_a_terminal(small_model, tmp_path, monkeypatch):
    path = tmp_path / "m.safetensors"
    cpl_cert.save_checkpoint(small_model, path, dataset={"name": "fashion-mnist"})
    monkeypatch.setenv("CPL_CERT_PROGRESS_SECONDS", "0.05")
    result = runner.invoke(app, ["certify", str(path), "--limit", "2000", "--batch-size", "100", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "certifying (float32 convolutions, float64 dense layers): " in result.stderr and "elapsed" in result.stderr
    assert "empirical Lipschitz lower bound" in result.stderr and "left" in result.stderr.split("empirical Lipschitz lower bound")[-1]
    assert "certifying" not in result.stdout  # progress goes to stderr, results to stdout


def test_run_clock_counts_steps_and_evaluations(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    clock_ = RunClock(epochs=3, steps=10)
    for step in range(1, 11):  # 1 s per step
        clock_.step(step)
        now[0] += 1.0
    now[0] += 3.0  # evaluation and saving: 4 s after the last step
    clock_.epoch_ended()
    assert clock_.remaining(2, 0) == pytest.approx(2 * 10 * 1.0 + 2 * 4.0)
    assert clock_.remaining(3, 5) == pytest.approx(5 * 1.0 + 4.0)


def test_threads_option(small_model, tmp_path):
    path = tmp_path / "m.safetensors"
    cpl_cert.save_checkpoint(small_model, path, dataset={"name": "fashion-mnist"})
    try:
        assert runner.invoke(app, ["lipschitz", str(path), "--samples", "0", "--threads", "2"]).exit_code == 0
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)
    bad = runner.invoke(app, ["lipschitz", str(path), "--threads", "0"])
    assert bad.exit_code == 1 and bad.stderr == "Error: --threads must be a positive number, got 0\n"


def _started(epochs: int, steps: int):
    from cpl_cert.train.events import RunStarted

    return RunStarted(model="cpl-tiny", parameters=1, train_images=1, dataset="fashion-mnist", epochs=epochs, steps_per_epoch=steps,
                      loss="hinge", optimizer="adam", lr=1e-3, augmentation="none", device="cpu", world_size=1)


def test_the_run_line_counts_down_through_the_last_evaluation(monkeypatch):
    """It froze at 0:00:00 left once the last step was done, through the whole final evaluation."""
    from cpl_cert.cli.train_display import TrainDisplay
    from cpl_cert.train.events import EpochStarted, Evaluating, StepDone

    now = [100.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    quiet = Console(file=io.StringIO(), width=200)
    with TrainDisplay(quiet, quiet) as display:
        display.activity.interval = 3600.0
        display(_started(1, 10))
        display(EpochStarted(1, 10))
        for step in range(1, 11):
            now[0] += 1.0
            display(StepDone(1, step, 10))
        now[0] += 2.0
        display(Evaluating(1, "freeze", 0, 50))
        assert display.activity.lines["run"].remaining() is None  # nothing measured yet: unknown, not 0
        now[0] += 3.0
        display(Evaluating(1, "float32", 0, 100))
        display.activity.lines["stage"].started = now[0]
        now[0] += 5.0
        display(Evaluating(1, "float32", 50, 100))
        assert display.activity.lines["run"].remaining() == pytest.approx(5.0)  # the evaluation's own rate
        now[0] += 4.0
        display(Evaluating(1, "float32", 90, 100))
        assert 0 < display.activity.lines["run"].remaining() < 5.0


def test_the_two_train_lines_keep_their_order_from_epoch_to_epoch():
    out = io.StringIO()
    with Activity(Console(file=out, force_terminal=True, width=120)) as activity:
        activity.stage("epoch 1/2: training", 10)
        activity.stage("whole run", 2, key="run")
        activity.stage("epoch 1/2: certifying", 100)
        activity.stage("epoch 2/2: training", None)
        descriptions = [task.description for task in activity._progress.tasks]
        assert descriptions == ["epoch 2/2: training", "whole run"]
        assert activity._progress.tasks[0].total is None and activity._progress.tasks[0].completed == 0


def test_one_is_singular():
    from cpl_cert.cli.train_display import describe

    line = describe(_started(1, 1))
    assert "1 epoch x 1 step," in line and "on 1 fashion-mnist image," in line and "(1 parameter)" in line
    assert "10 epochs x 2 steps" in describe(_started(10, 2))


def test_attack_progress_counts_the_points_done_at_the_eps_shown(small_model, tmp_path, monkeypatch):
    """The attack line's count is the points done at the radius (or FMN) it names, not the run's overall progress."""
    import cpl_cert.cli.progress as progress_cli
    from cpl_cert.cli import app

    path = tmp_path / "m.safetensors"
    cpl_cert.save_checkpoint(small_model, path, dataset={"name": "fashion-mnist", "input_shape": [1, 28, 28], "num_classes": 10}, training={})
    seen = []
    real = progress_cli.Activity.update

    def update(self, done, total=None, description=None, key="stage", **extra):
        if description and description.startswith("attacking: "):
            seen.append((description.removeprefix("attacking: "), extra.get("count")))
        return real(self, done, total, description, key, **extra)

    monkeypatch.setattr(progress_cli.Activity, "update", update)
    args = ["attack", str(path), "--limit", "24", "--batch-size", "12", "--eps", "0.1,0.5", "--steps", "5", "--device", "cpu"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    counts: dict[str, list[float]] = {}
    for stage, count in seen:
        done, total = count.split("/")
        assert total == "24"
        counts.setdefault(stage.split(" at ")[-1], []).append(float(done))
    assert set(counts) == {"eps 0.1", "eps 0.5"}
    for done in counts.values():  # each radius counts its own points: from 0, up to all 24, batch by batch
        assert done[0] == 0 and done[-1] == 24 and done == sorted(done) and 12 in done

"""The plots of certify and attack, drawn through the command line and inspected as matplotlib figures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import make_frozen
from typer.testing import CliRunner

import cpl_cert
from cpl_cert.cli import app

pytest.importorskip("matplotlib", reason="the plots need the optional matplotlib (pip install matplotlib)")

runner = CliRunner()


@pytest.fixture
def figures(monkeypatch):
    """The figures the command draws, kept open for inspection (the PNG is still written)."""
    import cpl_cert.cli.plots as plots

    kept = []

    def save(plt, fig, path, dpi=None):
        fig.canvas.draw()
        kept.append(fig)
        return plots.atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi))

    monkeypatch.setattr(plots, "_save", save)
    yield kept
    import matplotlib.pyplot as plt

    plt.close("all")


def inside(artist, ax) -> bool:
    box, frame = artist.get_window_extent(), ax.get_window_extent()
    return frame.x0 - 1 <= box.x0 and box.x1 <= frame.x1 + 1 and frame.y0 - 1 <= box.y0 and box.y1 <= frame.y1 + 1


def test_certify_plot(tmp_path: Path, figures):
    model = make_frozen("cpl-tiny", channels=4, conv_depth=1, dense_depth=1, conv_inner=4, dense_inner=32)
    path = tmp_path / "tiny.safetensors"
    cpl_cert.save_checkpoint(model, path, dataset={"name": "fashion-mnist"})
    args = ["certify", str(path), "--limit", "300", "--eps", "0.05,0.1,0.5", "--plot", str(tmp_path / "p.png"), "--json", str(tmp_path / "r.json")]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (fig,) = figures
    (ax,) = fig.axes
    assert "tiny.safetensors on fashion-mnist" in ax.get_title()
    assert ax.get_ylim() == (0, 100) and ax.yaxis.get_major_formatter()(50, 0) == "50%"
    exact, float32, any_runtime, clean = ax.get_lines()[:4]
    assert (exact.get_linestyle(), float32.get_linestyle(), any_runtime.get_linestyle()) == ("-", "--", ":")
    assert "exact" in exact.get_label() and "cpl-cert" in float32.get_label() and "any runtime" in any_runtime.get_label()
    report = json.loads((tmp_path / "r.json").read_text())
    assert list(clean.get_xdata()) == [0] and clean.get_ydata()[0] == pytest.approx(100 * report["clean_accuracy"])
    assert [t.get_text().split(":")[0] for t in ax.texts] == ["0.05", "0.1", "0.5"]
    assert all(inside(t, ax) for t in ax.texts)
    assert len(ax.get_legend().get_texts()) == 4


def test_certify_plot_keeps_the_labels_of_close_radii_apart(tmp_path: Path, figures):
    """Radii a few thousandths apart give points on top of each other: their labels must not overlap."""
    model = make_frozen("cpl-tiny", channels=4, conv_depth=1, dense_depth=1, conv_inner=4, dense_inner=32)
    path = tmp_path / "tiny.safetensors"
    cpl_cert.save_checkpoint(model, path, dataset={"name": "fashion-mnist"})
    args = ["certify", str(path), "--limit", "100", "--eps", "0.1,0.101,0.102,0.103,0.9", "--plot", str(tmp_path / "p.png"),
            "--lower-bound-samples", "0"]
    assert runner.invoke(app, args).exit_code == 0
    (fig,) = figures
    (ax,) = fig.axes
    boxes = [t.get_window_extent() for t in ax.texts]
    assert len(boxes) == 5 and all(inside(t, ax) for t in ax.texts)
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])


def test_attack_plot(tmp_path: Path, figures):
    torch.manual_seed(0)
    model = cpl_cert.freeze(cpl_cert.build_model("cpl-tiny", input_shape=(1, 28, 28), num_classes=10, conv_depth=0, channels=1,
                                                 dense_depth=2, dense_inner=64))
    path = tmp_path / "dense.safetensors"
    cpl_cert.save_checkpoint(model, path, dataset={"name": "fashion-mnist"})
    result = runner.invoke(app, ["attack", str(path), "--attack", "minnorm", "--limit", "30", "--steps", "20", "--plot", str(tmp_path / "g.png")])
    assert result.exit_code == 0, result.output
    (fig,) = figures
    left, right = fig.axes
    assert "minnorm attack" in fig._suptitle.get_text() and "dense.safetensors" in fig._suptitle.get_text()
    assert right.get_aspect() == 1.0  # equal scales: a point's distance above the diagonal reads as it is
    radii = left.collections[1].get_offsets()[:, 1]  # every point's certified radius
    assert right.get_xlim() == pytest.approx((0, 1.05 * radii.max()))  # the radii's range, not the distances'
    for ax in (left, right):
        labels = [h.get_label() for h in ax.get_legend().legend_handles]
        assert len(labels) >= len(ax.collections) and all(not label.startswith("_") for label in labels)

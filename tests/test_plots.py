"""Figures and the run's human-readable logs: pair figures, SCI matrix, loss panels, confusion of
the worst classes, the console line and summary.csv (no training here: see test_training)."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch

from fgattn.cli import visualize
from fgattn.train import logging as L

pytest.importorskip("matplotlib")

from matplotlib.backends.backend_agg import FigureCanvasAgg

from fgattn import plots

HISTORY = [
    {"epoch": e, "lr": 0.05 * 0.7 ** (e // 2), "train_loss": 8.0 / e, "train_loss_cls": 7.0 / e,
     "train_loss_cls_o": 2.5 / e, "train_loss_center": 0.3 / e, "train_acc": 10.0 * e,
     "test_loss": 2.0 / e, "test_top1": 12.0 * e, "test_top5": 40.0 + e, "epoch_time_s": 12.3}
    for e in range(1, 6)
]  # fmt: skip


def _renderer(fig):
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return canvas.get_renderer()


def test_pair_figure_panels_are_at_least_448_px_with_titles_and_colour_bars():
    rng = np.random.default_rng(0)
    images = [rng.random((64, 64, 3)) for _ in range(2)]
    columns = [
        plots.MapColumn("heat\n(eq. 1)", [rng.random((2, 2)) for _ in range(2)], label="a"),
        plots.MapColumn(
            "signed",
            [rng.standard_normal((7, 7)) for _ in range(2)],
            kind="signed",
            limits=(-1.0, 1.0),
            label="b",
            notes=["x", "y"],
        ),
        plots.MapColumn("mask", [(rng.random((64, 64)) > 0.3).astype(float)] * 2, kind="mask"),
    ]
    fig = plots.pair_figure(images, ["A: class 1", "B: class 1"], columns, title="pair")
    renderer = _renderer(fig)
    image_axes = [ax for ax in fig.axes if ax.get_images() and ax.get_label() != "<colorbar>"]
    assert len(image_axes) == 2 * 4
    for ax in image_axes:
        box = ax.get_window_extent(renderer)
        assert box.width >= 448 and box.height >= 448
    titles = [ax.get_title() for ax in image_axes if ax.get_title()]
    assert titles == ["image", "heat\n(eq. 1)", "signed", "mask"]
    colorbars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert len(colorbars) == 3  # one per heat map, one shared by the fixed-limit column
    signed = image_axes[2].get_images()[-1]
    assert signed.norm.vmin == -1.0 and signed.norm.vmax == 1.0
    for ax, m in ((image_axes[1], columns[0].maps[0]), (image_axes[5], columns[0].maps[1])):
        norm = ax.get_images()[-1].norm  # each heat map on its own scale: none washes out
        assert (norm.vmin, norm.vmax) == pytest.approx((m.min(), m.max()))


def test_channel_matrix_figure_sorts_channels_by_energy_at_full_resolution():
    rng = np.random.default_rng(1)
    c = 512  # ResNet-18/34's channels: at least one screen pixel per matrix entry
    logits = 30 * rng.standard_normal((c, c))
    log_w = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    energy = rng.random(c)
    fig = plots.channel_matrix_figure(log_w, energy, top=8)
    ax_a, ax_b = fig.axes[:2]
    order = np.argsort(-energy)
    expected = log_w[np.ix_(order, order)] / np.log(10)
    shown = ax_a.get_images()[0]
    np.testing.assert_allclose(shown.get_array(), expected.clip(expected.max() - 6))
    assert shown.norm.vmax - shown.norm.vmin == pytest.approx(6.0)
    zoom = ax_b.get_images()[0].get_array()
    np.testing.assert_allclose(zoom, expected[:8, :8])  # unclipped: its own scale
    assert [t.get_text() for t in ax_b.get_xticklabels()][:2] == [str(order[0]), str(order[1])]
    box = ax_a.get_window_extent(_renderer(fig))
    assert box.width >= c and box.height >= c


def test_loss_figure_has_total_term_and_test_panels_with_integer_epochs():
    fig = plots.loss_figure(HISTORY)
    _renderer(fig)
    axes = fig.axes
    assert [ax.get_title() for ax in axes] == [
        "training loss (total, minimised)", "training loss terms", "test loss (cross-entropy)"
    ]  # fmt: skip
    assert len(axes[1].get_lines()) == 3  # cls, cls_o, center
    assert axes[1].get_yscale() == "log"  # their ranges differ by more than 10x
    for ax in axes:
        ticks = [t for t in ax.get_xticks() if 1 <= t <= 5]
        assert ticks and all(float(t).is_integer() for t in ticks)


def test_confusion_figure_shows_the_worst_classes_and_their_confusions():
    classes = [f"c{i}" for i in range(6)]
    confusion = np.diag([10, 9, 2, 8, 5, 0])
    confusion[2, 4] = 6  # c2 (2 of 8 right) mostly taken for c4
    confusion[4, 1] = 4  # c4 (5 of 9) sometimes for c1
    confusion[2, 0] = 0
    assert plots.worst_classes(confusion, 2) == [2, 4]  # c5 has no test images: left out
    fig = plots.confusion_figure(confusion, classes, k=2, title="run")
    cells = fig.axes[0].get_images()[0].get_array()
    labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert labels == ["c2", "c4", "c1", "all others"]
    np.testing.assert_allclose(cells[0], [25.0, 75.0, 0.0, 0.0])  # % of c2's 8 images
    np.testing.assert_allclose(cells[1], [0.0, 100 * 5 / 9, 100 * 4 / 9, 0.0])


def test_epoch_line_is_short_and_starts_with_test_top1():
    row = {**HISTORY[-1], "epoch": 180, "train_loss_cont": 0.05, "ema_test_top1": 99.61,
           "ema_test_top5": 100.0, "ema_test_loss": 0.01, "test_top1": 99.609375,
           "lr": 0.000123456789, "epoch_time_s": 12345.6}  # fmt: skip
    line = L.format_row(row)
    assert line.startswith("epoch 180 | test_top1 99.61 (ema 99.61) | top5 45.00 |"), line
    assert len(line) < 120, (len(line), line)
    assert line.endswith("| lr 0.0001235 | 12346 s")
    assert "train_loss_cls" not in line  # the loss terms are in summary.csv
    no_test = L.format_row({k: v for k, v in row.items() if "test" not in k})
    assert no_test.startswith("epoch 180 | train_loss")


def test_summary_csv_rounds_floats(tmp_path):
    L.write_summary([{"epoch": 3, "lr": 0.034999999999999996, "test_top1": 100 / 3}], tmp_path)
    header, line = (tmp_path / "summary.csv").read_text().splitlines()
    assert header == "epoch,lr,test_top1"
    epoch, lr, top1 = line.split(",")
    assert (epoch, lr) == ("3", "0.035")
    assert math.isclose(float(top1), 100 / 3, rel_tol=1e-11)


def test_write_confusion_csv_and_png(tmp_path):
    confusion = torch.tensor([[3, 1], [0, 2]])
    L.write_confusion(confusion, ["a", "b"], tmp_path, "run, epoch 1")
    rows = (tmp_path / "confusion.csv").read_text().splitlines()
    assert rows == ["true \\ predicted,a,b", "a,3,1", "b,0,2"]
    assert (tmp_path / "confusion_worst.png").stat().st_size > 0


def test_visualize_rejects_a_bad_pair_count(capsys):
    with pytest.raises(SystemExit):
        visualize.main(["best.pth", "--num-pairs", "0"])
    assert "--num-pairs: wanted an int >= 1, got '0'" in capsys.readouterr().err


def test_visualize_without_matplotlib_fails_with_one_line(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(SystemExit) as exc:
        visualize.main(["no-such-checkpoint.pth"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and 'pip install "fgattn[plots]"' in err


def test_the_confusion_files_belong_to_the_run(tmp_path):
    """A folder with only the confusion files holds a run; --overwrite removes them."""
    from fgattn.train import rundir

    run = tmp_path / "run"
    run.mkdir()
    L.write_confusion(torch.tensor([[1, 0], [0, 1]]), ["a", "b"], run, "old run")
    with pytest.raises(rundir.RunFolderError, match="already holds a run"):
        rundir.claim(run)
    rundir.claim(run, overwrite=True).release()
    assert not (run / "confusion.csv").exists() and not (run / "confusion_worst.png").exists()


@pytest.mark.parametrize("length_normalized", [False, True])
def test_cin_maps_match_the_model(length_normalized):
    import fgattn

    model = fgattn.create_model("cin", backbone="test_resnet", num_classes=3,
                                length_normalized=length_normalized).eval()  # fmt: skip
    f = torch.randn(2, model.backbone.out_channels, 3, 3).relu()
    columns, sci = visualize.cin_maps(model, f)
    expected = fgattn.functional.channel_attention_weights(
        f[:1], scale=model.sci.effective_scale(f)
    )[0]
    torch.testing.assert_close(torch.from_numpy(np.exp(sci["log_weights"])).float(), expected)
    # CCI column against the materialised matrices of eq. 5: ‖|W_A − η W_B| X_A‖ / ‖W_A X_A‖.
    w = fgattn.functional.channel_attention_weights(f, scale=model.sci.effective_scale(f))
    x = f.flatten(2)
    y = w @ x
    eta, gamma = model.cci.weights(y[:1].view_as(f[:1]), y[1:].view_as(f[1:]))
    y_ab = torch.stack([(w[0] - eta * w[1]).abs() @ x[0], (w[1] - gamma * w[0]).abs() @ x[1]])
    expected_cci = (y_ab.norm(dim=1) / y.norm(dim=1)).view(2, 3, 3).detach()
    np.testing.assert_allclose(np.stack(columns[1].maps), expected_cci.numpy(), rtol=1e-4)
    assert all(m.shape == (3, 3) for col in columns for m in col.maps)


def test_visualize_a_missing_checkpoint_is_one_line(capsys):
    with pytest.raises(SystemExit) as exc:
        visualize.main(["no-such-checkpoint.pth"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("fgattn-visualize: error:") and "no-such" in err


def test_legends_never_cover_the_curves():
    history = [{**row, "ema_test_top1": row["test_top1"] - 1} for row in HISTORY]
    for fig in (plots.loss_figure(history), plots.accuracy_figure(history)):
        renderer = _renderer(fig)
        for ax in fig.axes:
            legend = ax.get_legend()
            assert legend is not None
            inside = ax.get_window_extent(renderer)
            box = legend.get_window_extent(renderer)
            assert box.y1 <= inside.y0, (ax.get_title(), box, inside)  # below the plotting area
            assert box.y0 >= 0  # and on the figure


def test_colour_bars_have_no_offset_text_over_their_label():
    """Maps whose values differ in the 5th digit (a CCI ratio near 1) made matplotlib write its
    offset ("+1") at the end of the colour bar, over the label."""
    rng = np.random.default_rng(0)
    near_one = [1.0 + 1e-4 * rng.random((5, 5)) for _ in range(2)]
    columns = [plots.MapColumn("ratio", near_one, label="‖W_AB X_A‖ / ‖W_A X_A‖")]
    images = [rng.random((32, 32, 3)) for _ in range(2)]
    fig = plots.pair_figure(images, ["A", "B"], columns, title="pair")
    _renderer(fig)
    bars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert bars
    for bar in bars:
        assert bar.xaxis.get_offset_text().get_text() == ""
        assert all(t.get_text() for t in bar.get_xticklabels())
    log_w = np.log(np.full((4, 4), 0.25) + 1e-6 * rng.random((4, 4)))
    matrix = plots.channel_matrix_figure(log_w, rng.random(4), top=4)
    _renderer(matrix)
    for bar in [ax for ax in matrix.axes if ax.get_label() == "<colorbar>"]:
        assert bar.yaxis.get_offset_text().get_text() == ""

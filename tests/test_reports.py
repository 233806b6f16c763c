import numpy as np
from matplotlib.figure import Figure

from pneumoseg.reports.figures import draw_outline, save_figure


def test_draw_outline_draws_the_edge_of_each_region_only():
    image = np.zeros((20, 20, 3), np.uint8)
    mask = np.zeros((20, 20), bool)  # a bool mask, as the OOF report passes
    mask[4:12, 4:12] = True
    mask[15:18, 15:18] = True
    assert draw_outline(image, mask, (255, 0, 0), 1) is image
    red = (image == (255, 0, 0)).all(axis=2)
    assert red[4, 4:12].all() and red[11, 4:12].all() and red[4:12, 4].all() and red[15, 15:18].all()
    assert not red[6:10, 6:10].any()  # the inside stays as it was
    assert red.sum() == 28 + 8  # both outlines, nothing else
    assert not image[..., 1:].any()


def test_save_figure_writes_a_png_and_nothing_else(tmp_path):
    fig = Figure(figsize=(1, 1))
    fig.subplots().plot([0, 1])
    path = save_figure(fig, tmp_path / "plots" / "a.png", dpi=50)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in path.parent.iterdir()] == ["a.png"]


class _KeptFigures:
    """Patch a module's ``Figure`` so that a test can read what its plot function drew."""

    def __init__(self, monkeypatch, module):
        self.figures = []
        kept = self.figures

        class Kept(Figure):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                kept.append(self)

        monkeypatch.setattr(module, "Figure", Kept)


def test_training_curves_draw_the_numeric_metrics_only(tmp_path, monkeypatch):
    import pandas as pd

    from pneumoseg.reports import oof

    kept = _KeptFigures(monkeypatch, oof)
    log = tmp_path / "log.csv"
    pd.DataFrame(
        {
            "epoch": [1, 2],
            "train_loss": [0.9, 0.5],
            "val_loss": [1.0, 0.7],
            "val_dice": [0.70, 0.80],
            "val_postprocess": ["threshold:0.5:0", "triplet:0.6:1000:0.3:0"],
        }
    ).to_csv(log, index=False)
    oof.plot_training_curves({0: log}, tmp_path / "curves.png")
    axes = [ax for ax in kept.figures[0].axes if ax.axison]
    assert [ax.get_title() for ax in axes] == ["loss (solid: train, dashed: validation)", "val_dice"]
    loss = {line.get_label(): line.get_ydata().tolist() for line in axes[0].get_lines()}
    assert loss == {"fold 0 train": [0.9, 0.5], "fold 0 val": [1.0, 0.7]}
    assert [line.get_ydata().tolist() for line in axes[1].get_lines()] == [[0.70, 0.80]]


def test_the_search_heat_map_plots_the_surface_and_titles_the_chosen_score(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from pneumoseg.reports import oof

    kept = _KeptFigures(monkeypatch, oof)
    grid = SimpleNamespace(tops=np.array([0.5, 0.7]), min_areas=np.array([0.0, 1000.0]), bottoms=np.array([0.3, 0.6]))
    scores = np.array(
        [
            [[0.70, np.nan], [0.75, np.nan]],  # top 0.5: bottom 0.6 is above it, not a candidate
            [[0.78, 0.72], [0.7983, 0.74]],
        ]
    )
    result = SimpleNamespace(surfaces={"triplet": (grid, scores)})
    numbers = {
        "empty_baseline": 0.7792,
        "default_score": 0.76,
        "oof_score": 0.7988,
        "chosen": {"name": "triplet", "params": {}},
    }
    oof.plot_search(result, numbers, tmp_path / "search.png")
    heat_ax, curve_ax = kept.figures[0].axes[:2]
    shown = heat_ax.get_images()[0].get_array()
    assert np.allclose(shown.filled(np.nan), scores[:, :, 0], equal_nan=True)
    title = heat_ax.get_title()
    assert "bottom=0.3" in title and "0.7983" in title and "OOF dice 0.7988" in title and "white: top < bottom" in title
    star = [line for line in heat_ax.get_lines() if line.get_marker() == "*"][0]
    assert (star.get_xdata()[0], star.get_ydata()[0]) == (1, 1)  # min_area 1000, top 0.7
    curves = {line.get_label(): np.asarray(line.get_ydata()).tolist() for line in curve_ax.get_lines()}
    assert curves["triplet"] == [0.7983, 0.74]  # the best over top and min_area, per bottom
    assert curves["all empty"] == [0.7792, 0.7792] and curves["default"] == [0.76, 0.76]


def test_the_per_fold_figure_plots_each_folds_scores(tmp_path, monkeypatch):
    from pneumoseg.reports import oof

    kept = _KeptFigures(monkeypatch, oof)
    folds = [
        {"fold": 0, "n_images": 80, "score": 0.81, "nested_score": 0.79, "default_score": 0.75, "empty_baseline": 0.78},
        {"fold": 1, "n_images": 80, "score": 0.83, "nested_score": 0.80, "default_score": 0.76, "empty_baseline": 0.77},
    ]
    oof.plot_folds({"per_fold": folds}, tmp_path / "folds.png")
    ax = kept.figures[0].axes[0]
    heights = {container.get_label(): [bar.get_height() for bar in container] for container in ax.containers}
    assert heights == {
        "chosen (in-sample)": [0.81, 0.83],
        "nested": [0.79, 0.80],
        "default": [0.75, 0.76],
        "all empty": [0.78, 0.77],
    }

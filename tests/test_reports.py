import numpy as np
from matplotlib.figure import Figure

from pneumoseg.reports.figures import draw_outline, save_figure


def test_draw_outline_draws_the_edge_of_each_region_only():
    image = np.zeros((20, 20, 3), np.uint8)
    mask = np.zeros((20, 20), bool)              # a bool mask, as the OOF report passes
    mask[4:12, 4:12] = True
    mask[15:18, 15:18] = True
    assert draw_outline(image, mask, (255, 0, 0), 1) is image
    red = (image == (255, 0, 0)).all(axis=2)
    assert red[4, 4:12].all() and red[11, 4:12].all() and red[4:12, 4].all() and red[15, 15:18].all()
    assert not red[6:10, 6:10].any()             # the inside stays as it was
    assert red.sum() == 28 + 8                   # both outlines, nothing else
    assert not image[..., 1:].any()


def test_save_figure_writes_a_png_and_nothing_else(tmp_path):
    fig = Figure(figsize=(1, 1))
    fig.subplots().plot([0, 1])
    path = save_figure(fig, tmp_path / "plots" / "a.png", dpi=50)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in path.parent.iterdir()] == ["a.png"]

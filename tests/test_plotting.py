"""Plotting helpers: the figures they build, and clear errors on bad shapes."""
import math

import matplotlib
import pytest
import torch
from matplotlib.figure import Figure

from minidiff import schedules
from minidiff.course import plotting

matplotlib.use("Agg")


def _images(gen, B=6, C=1, H=8, W=8):
    return torch.rand(B, C, H, W, generator=gen) * 2 - 1


def _steps(gen, n=12, B=2):
    return [{"i": i, "sigma": torch.tensor(10.0 / (i + 1)), "sigma_next": torch.tensor(10.0 / (i + 2)),
             "x": torch.randn(B, 1, 8, 8, generator=gen), "x0_hat": torch.rand(B, 1, 8, 8, generator=gen)}
            for i in range(n)]


def test_to_grid_shape_and_placement(gen):
    x = _images(gen, B=5, C=3, H=4, W=6)
    grid = plotting.to_grid(x, nrow=3, padding=1)
    assert grid.shape == (3, 2 * 5 + 1, 3 * 7 + 1)
    assert torch.equal(grid[:, 1:5, 1:7], x[0])
    assert torch.equal(grid[:, 6:10, 8:14], x[4])  # row 1, column 1
    assert (grid[:, 6:10, 15:21] == 1).all()  # the empty sixth slot stays white


@pytest.mark.parametrize("B,nrow", [(1, 8), (6, 3), (10, 4)])
def test_show_images_one_axes(gen, B, nrow):
    fig = plotting.show_images(_images(gen, B), nrow, "title")
    assert isinstance(fig, Figure) and len(fig.axes) == 1 and len(fig.axes[0].images) == 1


def test_show_images_with_labels_one_axes_per_image(gen):
    fig = plotting.show_images(_images(gen, 5), 3, "t", labels=list("abcde"))
    assert len(fig.axes) == 5 and [a.get_title() for a in fig.axes] == list("abcde")


def test_show_images_single_image_and_rgb(gen):
    assert len(plotting.show_images(_images(gen, 1)[0]).axes) == 1
    assert len(plotting.show_images(_images(gen, 4, C=3)).axes) == 1


@pytest.mark.parametrize("bad,match", [
    (torch.zeros(2, 2, 8, 8), "C in \\(1, 3\\)"),
    (torch.zeros(8, 8), "shape \\(B, C, H, W\\)"),
    (torch.zeros(0, 1, 8, 8), "B >= 1"),
])
def test_show_images_rejects_bad_shapes(bad, match):
    with pytest.raises(ValueError, match=match):
        plotting.show_images(bad)


def test_show_images_rejects_bad_arguments(gen):
    with pytest.raises(TypeError, match="torch.Tensor"):
        plotting.show_images([[0.0]])
    with pytest.raises(ValueError, match="one entry per image"):
        plotting.show_images(_images(gen, 3), labels=["a"])
    with pytest.raises(ValueError, match="nrow must be >= 1"):
        plotting.show_images(_images(gen, 3), nrow=0)


@pytest.mark.parametrize("n,n_show,expected_cols", [(12, 8, 8), (3, 8, 3), (1, 8, 1)])
def test_plot_trajectory_two_rows(gen, n, n_show, expected_cols):
    fig = plotting.plot_trajectory(_steps(gen, n), n_show=n_show, title="reverse")
    assert len(fig.axes) == 2 * expected_cols
    assert all(len(a.images) == 1 for a in fig.axes)
    assert fig.axes[0].get_title().startswith("step 0")
    assert fig.axes[expected_cols - 1].get_title().startswith(f"step {n - 1}")


def test_plot_trajectory_rejects_bad_input(gen):
    with pytest.raises(ValueError, match="non-empty list"):
        plotting.plot_trajectory([])
    with pytest.raises(ValueError, match="missing \\['x0_hat'\\]"):
        plotting.plot_trajectory([{"x": torch.zeros(1, 1, 4, 4), "sigma": 1.0}])
    with pytest.raises(ValueError, match="batch of 2"):
        plotting.plot_trajectory(_steps(gen, 3), index=5)
    bad = _steps(gen, 3)
    bad[1]["x0_hat"] = torch.zeros(2, 4, 8, 8)
    with pytest.raises(ValueError, match="x0_hat must have shape"):
        plotting.plot_trajectory(bad)


def test_animate_trajectory_returns_html(gen):
    html = plotting.animate_trajectory(_steps(gen, 30), max_frames=4)
    assert "<script" in html.data and html.data.count("data:image/png") == 4


def test_plot_schedules_two_axes_with_markers():
    tables = {name: schedules.alphas_cumprod_from_betas(schedules.make_betas(name, T=50))
              for name in schedules.SCHEDULES}
    fig = plotting.plot_schedules(tables, t=10)
    ax_ab, ax_snr = fig.axes
    assert len(ax_ab.lines) == 2 * len(tables)  # one curve and one marker per schedule
    with pytest.raises(ValueError, match="t must lie in \\[0, 49\\]"):
        plotting.plot_schedules(tables, t=50)
    with pytest.raises(ValueError, match="1-D tensor"):
        plotting.plot_schedules({"bad": torch.zeros(2, 3)})
    with pytest.raises(ValueError, match="non-empty dict"):
        plotting.plot_schedules(torch.zeros(5))


def test_plot_sigmas_drops_final_zero():
    ab = schedules.alphas_cumprod_from_betas(schedules.linear_betas())
    fig = plotting.plot_sigmas({"leading": schedules.sampling_sigmas(ab, 10, "leading"),
                                "karras": schedules.sampling_sigmas(ab, 5, "karras", sigma_max=math.inf)})
    (ax,) = fig.axes
    assert [len(line.get_xdata()) for line in ax.lines] == [10, 5]
    assert ax.get_yscale() == "log"


def test_path_from_steps_and_plot_paths_2d(gen):
    steps = [{"i": i, "sigma": 3.0 - i, "sigma_next": 2.0 - i, "x": torch.randn(5, 2, generator=gen),
              "x0_hat": torch.zeros(5, 2)} for i in range(3)]
    path = plotting.path_from_steps(steps, torch.zeros(5, 2))
    assert path.shape == (4, 5, 2) and (path[-1] == 0).all()
    fig = plotting.plot_paths_2d({"a": path, "b": path}, data=torch.randn(50, 2, generator=gen), max_paths=3)
    (ax,) = fig.axes
    assert len(ax.lines) == 2 * (3 + 1)  # three paths and one legend entry per label
    with pytest.raises(ValueError, match="final must have the shape"):
        plotting.path_from_steps(steps, torch.zeros(4, 2))
    with pytest.raises(ValueError, match="n_states >= 2, N, 2"):
        plotting.plot_paths_2d({"a": torch.zeros(3, 5, 3)})
    with pytest.raises(ValueError, match="data must have shape"):
        plotting.plot_paths_2d({"a": path}, data=torch.zeros(5, 3))

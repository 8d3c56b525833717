"""realfake_utils.plots: grids render from tensors, arrays and PIL images."""
import numpy as np
import torch
from PIL import Image

from realfake_utils import plots


def test_image_grid_inputs_and_layout():
    x = torch.randint(0, 256, (5, 3, 8, 8), dtype=torch.uint8)
    fig = plots.image_grid(x, nrow=3, titles=list("abcde"))
    assert len(fig.axes) == 6 and fig.axes[0].get_title() == "a"
    assert np.array_equal(fig.axes[0].images[0].get_array(), x[0].permute(1, 2, 0).numpy())
    mixed = [x[0], x[1].permute(1, 2, 0).numpy(), Image.new("L", (8, 8), 7), torch.rand(3, 8, 8)]
    fig = plots.image_grid(mixed, nrow=4)
    assert len(fig.axes) == 4
    assert fig.axes[2].images[0].get_array().shape == (8, 8, 3)
    assert fig.axes[3].images[0].get_array().dtype == np.uint8


def test_per_class_grid_rows():
    x = torch.zeros((7, 3, 4, 4), dtype=torch.uint8)
    labels = [0, 0, 0, 2, 2, 0, 2]
    fig = plots.per_class_grid(x, labels, ["zero", "one", "two"], per_class=2)
    assert len(fig.axes) == 6
    assert [len(ax.images) for ax in fig.axes] == [1, 1, 0, 0, 1, 1]  # class one has no images
    assert fig.axes[0].get_ylabel() == "zero" and fig.axes[4].get_ylabel() == "two"

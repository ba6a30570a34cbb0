"""Pair figures: layout, field maps, mask outlines, PNG output and input checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from matplotlib.image import imread

from elastic_hypermorph_bundle.visualize import checkerboard, plot_pair, save_pair_png

SHAPE = (20, 16, 24)


def _ball(radius: float, center=(10, 8, 12)) -> np.ndarray:
    grid = np.stack(np.meshgrid(*(np.arange(n) for n in SHAPE), indexing="ij"), axis=-1)
    return (np.linalg.norm(grid - np.asarray(center), axis=-1) < radius).astype(np.float32)


def _scaling_ddf(factor: float) -> np.ndarray:
    """u(x) = factor * (x - c): a uniform scaling with det(I + grad u) = (1 + factor)^3."""
    grid = np.stack(np.meshgrid(*(np.arange(n, dtype=np.float64) for n in SHAPE), indexing="ij"))
    return factor * (grid - np.asarray(SHAPE)[:, None, None, None] / 2)


def test_rows_columns_and_field_values():
    fixed, moving = 1000 * _ball(6) - 500, 1000 * _ball(5) - 500
    figure = plot_pair(fixed, moving, warped=fixed, ddf=_scaling_ddf(0.1), spacing=(2.0, 1.0, 3.0), fields=("jacobian",),
                       body=False)
    image_axes = [ax for ax in figure.axes if ax.images]
    assert len(image_axes) == 15  # 5 rows (fixed, moving, warped, checkerboard, field) x 3 slices
    np.testing.assert_allclose(image_axes[-1].images[0].get_array(), 1.1**3, rtol=1e-6)
    np.testing.assert_array_equal(image_axes[0].images[0].get_array(), fixed[10].T)  # x = centre, z vertical
    assert image_axes[0].images[0].get_extent()[3] == SHAPE[2] - 0.5


def test_magnitude_is_in_mm_with_spacing():
    ddf = np.zeros((3, *SHAPE))
    ddf[0] = 2.0  # 2 voxels along x of 1.5 mm
    figure = plot_pair(_ball(5), _ball(5), ddf=ddf, spacing=(1.5, 1.0, 1.0), fields=("magnitude",), body=False)
    field_axes = [ax for ax in figure.axes if ax.images][-3:]
    for ax in field_axes:
        np.testing.assert_allclose(ax.images[0].get_array(), 3.0)
        assert "mm" in ax.get_title()


def test_mask_outlines_are_drawn_on_the_right_rows():
    figure = plot_pair(_ball(6), _ball(5), warped=_ball(6), fixed_mask=_ball(6), moving_mask=_ball(5))
    image_axes = [ax for ax in figure.axes if ax.images]
    contour_counts = [len(ax.collections) for ax in image_axes]
    # fixed outline on every row (fixed, moving, warped, checkerboard), moving outline on the moving row too
    assert contour_counts == [1, 1, 1, 2, 2, 2, 1, 1, 1, 1, 1, 1]
    legend = [text.get_text() for legend in figure.legends for text in legend.get_texts()]
    assert legend == ["fixed mask", "moving mask"]


def test_png_is_written_from_tensors(tmp_path):
    fixed = torch.as_tensor(1000 * _ball(6) - 500)
    ddf = torch.as_tensor(_scaling_ddf(0.05))
    moving = fixed.roll(2, 0)
    path = save_pair_png(tmp_path / "out" / "pair.png", fixed, moving, fixed_mask=_ball(6), ddf=ddf, title="t")
    pixels = imread(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert pixels.shape[0] > 300 and pixels.shape[1] > 300 and pixels[..., :3].std() > 0.1


def test_the_warped_row_from_the_cuts_alone_is_the_whole_warps():
    """``warped=True`` warps the moving image at the three cuts shown only: the warped and checkerboard rows hold the
    values the whole warped volume gives there (the PNG, byte for byte: tests/test_writers.py)."""
    from elastic_hypermorph_bundle.networks import warp_image

    fixed = torch.as_tensor(_ball(6))
    moving = fixed.roll(2, 0) + 0.1 * torch.rand(SHAPE, generator=torch.Generator().manual_seed(0))
    ddf = torch.as_tensor(_scaling_ddf(0.05)).float()
    ddf[0] += 2.0
    whole = warp_image(moving[None, None], ddf[None])[0, 0]
    rows = [[ax.images[0].get_array() for ax in plot_pair(fixed, moving, warped=warped, ddf=ddf, fields=()).axes]
            for warped in (whole, True)]
    assert len(rows[0]) == len(rows[1]) == 12 and all(np.array_equal(a, b) for a, b in zip(*rows))
    assert not np.array_equal(rows[0][6], rows[0][3])  # the warped row is not the moving one
    with pytest.raises(ValueError, match="warped=True warps the moving image by ddf"):
        plot_pair(_ball(5), _ball(5), warped=True)


def test_invalid_inputs_are_rejected():
    with pytest.raises(ValueError, match="field must be one of"):
        plot_pair(_ball(5), _ball(5), fields=("curl",))
    with pytest.raises(ValueError, match="moving has shape"):
        plot_pair(_ball(5), _ball(5)[:-1])
    with pytest.raises(ValueError, match="ddf must have shape"):
        plot_pair(_ball(5), _ball(5), ddf=np.zeros((2, *SHAPE)))
    with pytest.raises(ValueError, match="3 dimensions"):
        plot_pair(_ball(5)[None], _ball(5))
    with pytest.raises(ValueError, match="slices must be"):
        plot_pair(_ball(5), _ball(5), slices=(0, 0, 99))


def test_the_field_is_drawn_inside_the_body_only_and_the_cuts_go_through_a_lung():
    """Two "lungs" (air balls) in a "body" (a soft-tissue box) in air: |u| is blank (NaN) in the air outside the body
    and drawn in the lungs; the sagittal cut (axis 0) goes through one lung's centre, not the gap between them."""
    lungs = np.maximum(_ball(3, center=(5, 8, 12)), _ball(3.5, center=(14, 8, 12)))
    body = np.zeros(SHAPE, np.float32)
    body[2:18, 3:13, 4:20] = 1
    image = np.where(lungs > 0, -850.0, np.where(body > 0, 40.0, -1000.0))
    ddf = np.ones((3, *SHAPE))
    figure = plot_pair(image, image, fixed_mask=lungs, ddf=ddf, fields=("magnitude",), window=(-1000, 500))
    assert [ax.get_title().split(", ")[-1] for ax in figure.axes if ax.images][:3] == ["x = 14", "y = 8", "z = 12"]
    shown = [ax for ax in figure.axes if ax.images][-3:][2].images[0].get_array()  # |u| in the axial cut z = 12
    hidden = np.ma.getmaskarray(shown) | np.isnan(np.ma.getdata(shown))
    assert hidden[0, 0] and hidden[1, 0] and not hidden[8, 14] and not hidden[8, 10]  # air outside the body only
    assert shown[8, 14] == pytest.approx(np.sqrt(3)) and shown[8, 10] == pytest.approx(np.sqrt(3))  # lung, tissue


def test_checkerboard_alternates_tiles():
    board = checkerboard(np.zeros((16, 16, 16)), np.ones((16, 16, 16)), tiles=4)
    assert board[0, 0, 0] == 0 and board[4, 0, 0] == 1 and board[4, 4, 0] == 0 and board[4, 4, 4] == 1

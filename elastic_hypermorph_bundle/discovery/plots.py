"""Figures of parameter discovery (backend-free :class:`matplotlib.figure.Figure`, as :mod:`..visualize`; importing
this module leaves matplotlib's global backend alone): metric heatmaps over a (lam, mu) grid and curves
over alpha (in the spirit of Figures 3 and 2 of Reithmeir et al.), the elastic-vs-diffusion comparison, and a
side-by-side registration figure of one pair (Figure 4)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib
import matplotlib.colors
import matplotlib.patheffects
import numpy as np
import torch
from matplotlib.colors import LogNorm, TwoSlopeNorm
from matplotlib.figure import Figure

from ..metrics import JACOBIAN_BORDER, jacobian_determinant

__all__ = [
    "LABELS",
    "BETTER",
    "plot_grid_metric",
    "plot_pipeline_heatmaps",
    "plot_per_pair_optima",
    "plot_material_recovery",
    "plot_regularizer_comparison",
    "plot_pair_comparison",
]

#: axis and title labels of hyperparameters and metrics
LABELS = {
    "lam": "λ",
    "mu": "μ",
    "alpha": "α",
    "dice_mean": "mean Dice",
    "tre_mm": "TRE (mm)",
    "folding_percent": "% J ≤ 0",
    "sd_log_jacobian": "SD log J",
    "elastic_energy": "elastic energy R(u; λ, μ)",
    "energy_shear": "R(u; 0, 1)",
    "energy_volume": "R(u; 1, 0)",
    "lncc": "local NCC",
}


#: which way a metric is better (+1 higher, -1 lower); heatmaps draw better as brighter (viridis' yellow end).
#: Energies have no better direction and are drawn with low values dark.
BETTER = {"dice_mean": 1, "lncc": 1, "tre_mm": -1, "folding_percent": -1, "sd_log_jacobian": -1}


def _save(fig: Figure, path: str | Path, dpi: int = 120, tight: bool = True) -> Path:
    """Write ``fig`` as the PNG ``path`` (laid out tightly unless ``tight`` is false); returns the path."""
    if tight:
        fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=dpi)
    return path


def _colormap(metric: str) -> tuple[str, str]:
    """The colormap of ``metric`` (bright = better) and the phrase the colour bar states."""
    base = metric.removeprefix("network_")
    direction = BETTER.get(base)
    if direction is None:
        return "viridis", ""
    return ("viridis" if direction > 0 else "viridis_r"), " (brighter = better)"


def _edges(centres: np.ndarray) -> np.ndarray:
    """Cell edges around sorted grid centres (for pcolormesh); a single centre gets a unit-free +-0.5 cell."""
    if centres.size == 1:
        return np.array([centres[0] - 0.5, centres[0] + 0.5])
    middle = (centres[1:] + centres[:-1]) / 2
    return np.concatenate([[2 * centres[0] - middle[0]], middle, [2 * centres[-1] - middle[-1]]])


def _spans_decades(values: np.ndarray) -> bool:
    """Positive values over more than two orders of magnitude: drawn on a log scale so the optimum stays visible."""
    finite = values[np.isfinite(values)]
    return finite.size > 1 and finite.min() > 0 and finite.max() / finite.min() > 100


def plot_grid_metric(
    grid: Sequence[Mapping], names: Sequence[str], metric: str, best: Mapping, path: str | Path, criterion: str = ""
) -> Path:
    """Mean ``metric`` over the sweep grid, best point marked: a heatmap (``lam`` horizontal, ``mu`` vertical)
    for ``[lam, mu]`` grids, a curve for ``[alpha]`` grids.

    Args:
        grid: one mapping per grid point with the hyperparameters by name and the mean metrics (summary ``grid``).
        names: hyperparameter names, ``("lam", "mu")`` or ``("alpha",)``.
        metric: key of the metric to draw.
        best: mapping with the best point's hyperparameters by name.
        path: PNG to write.
        criterion: name of the criterion that chose ``best`` (shown in the title).
    """
    fig = Figure(figsize=(5.2, 4.2))
    ax = fig.subplots()
    values = np.array([np.nan if point[metric] is None else point[metric] for point in grid], dtype=float)
    if len(names) == 2:
        axes = [np.unique([point[name] for point in grid]) for name in names]
        image = np.full((axes[0].size, axes[1].size), np.nan)
        for point, value in zip(grid, values):
            image[np.searchsorted(axes[0], point[names[0]]), np.searchsorted(axes[1], point[names[1]])] = value
        norm = LogNorm() if _spans_decades(values) else None
        cmap, better = _colormap(metric)
        mesh = ax.pcolormesh(_edges(axes[0]), _edges(axes[1]), image.T, cmap=cmap, shading="flat", norm=norm)
        fig.colorbar(mesh, ax=ax, label=LABELS.get(metric, metric) + better)
        ax.plot(best[names[0]], best[names[1]], marker="*", color="red", markersize=14, markeredgecolor="white")
        ax.set_ylabel(LABELS.get(names[1], names[1]))
    elif len(names) == 1:
        order = np.argsort([point[names[0]] for point in grid])
        ax.plot(np.array([point[names[0]] for point in grid])[order], values[order], marker="o")
        best_value = values[[point[names[0]] for point in grid].index(best[names[0]])]
        ax.plot(best[names[0]], best_value, marker="*", color="red", markersize=14, linestyle="none")
        ax.set_ylabel(LABELS.get(metric, metric))
        ax.set_yscale("log" if _spans_decades(values) else "linear")
        ax.grid(alpha=0.3)
    else:
        raise ValueError(f"can plot grids of 1 or 2 hyperparameters, got {list(names)}.")
    ax.set_xlabel(LABELS.get(names[0], names[0]))
    best_text = ", ".join(f"{LABELS.get(n, n)}={best[n]:.3g}" for n in names)
    chosen = f"best by {criterion}" if criterion else "best"
    ax.set_title(f"{LABELS.get(metric, metric)} ({chosen}: {best_text})", fontsize=10)
    return _save(fig, path)


def _grid_image(grid: Sequence[Mapping], names: Sequence[str], metric: str) -> tuple[list[np.ndarray], np.ndarray]:
    """``(axes, image)``: the sorted values of both hyperparameters and the metric as a ``(len x, len y)`` array."""
    axes = [np.unique([point[name] for point in grid]) for name in names]
    image = np.full((axes[0].size, axes[1].size), np.nan)
    for point in grid:
        value = point.get(metric)
        image[np.searchsorted(axes[0], point[names[0]]), np.searchsorted(axes[1], point[names[1]])] = (
            np.nan if value is None else value)
    return axes, image


def plot_pipeline_heatmaps(
    grid: Sequence[Mapping],
    names: Sequence[str],
    metric: str,
    best: Mapping,
    path: str | Path,
    network_best: Mapping | None = None,
    steps: Sequence[int] | None = None,
) -> Path:
    """The network alone (``network_<metric>``) and the pipeline (``<metric>``: network + instance optimisation) over a
    ``[lam, mu]`` grid side by side, on one colour range (both panels' values), brighter = better; the selected
    point (``best``, chosen on the pipeline) starred on both, the network-alone optimum (``network_best``) crossed.

    Args:
        grid: the summary's ``grid`` (mean metrics of every point, ``network_`` columns included).
        names: ``("lam", "mu")``.
        steps: the sweep's optimisation steps of each level, coarsest first (shown in the right title).
    """
    fig = Figure(figsize=(10.4, 4.4), layout="constrained")
    panels = fig.subplots(1, 2, sharey=True)
    images = [_grid_image(grid, names, key) for key in (f"network_{metric}", metric)]
    values = np.concatenate([image.ravel() for _, image in images])
    finite = values[np.isfinite(values)]
    log = _spans_decades(values)
    low, high = (finite.min(), finite.max()) if finite.size else (0.0, 1.0)
    norm = LogNorm(low, high) if log else matplotlib.colors.Normalize(low, high)
    cmap, better = _colormap(metric)
    titles = ["network alone", "network + instance optimisation" + (f" ({'/'.join(map(str, steps))} steps)" if steps and any(steps) else "")]
    for ax, (axes, image), title in zip(panels, images, titles):
        mesh = ax.pcolormesh(_edges(axes[0]), _edges(axes[1]), image.T, cmap=cmap, shading="flat", norm=norm)
        below = 0.3 * np.diff(_edges(axes[1]))  # the values sit in the lower part of each cell, the markers centred
        for i, x in enumerate(axes[0]):
            for j, y in enumerate(axes[1]):
                if np.isfinite(image[i, j]):
                    ax.text(x, y - below[j], f"{image[i, j]:.3g}", ha="center", va="center", fontsize=7, color="white",
                            path_effects=[matplotlib.patheffects.withStroke(linewidth=1.5, foreground="black")])
        ax.plot(best[names[0]], best[names[1]], marker="*", color="red", markersize=13, markeredgecolor="white",
                linestyle="none", label="selected (pipeline)")
        if network_best is not None:
            ax.plot(network_best[names[0]], network_best[names[1]], marker="X", color="cyan", markersize=9,
                    markeredgecolor="black", linestyle="none", label="network-alone optimum")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(LABELS.get(names[0], names[0]))
    panels[0].set_ylabel(LABELS.get(names[1], names[1]))
    panels[0].legend(fontsize=7, loc="upper right", framealpha=0.8)
    fig.colorbar(mesh, ax=list(panels), label=LABELS.get(metric, metric) + better + ", one range for both")
    fig.suptitle(f"{LABELS.get(metric, metric)}: selected λ={best[names[0]]:.3g}, μ={best[names[1]]:.3g}",
                 fontsize=10)
    return _save(fig, path, tight=False)  # the shared colour bar spans both panels: no tight layout


def plot_per_pair_optima(
    oracle: Sequence[Mapping], chosen: Sequence[Mapping], names: Sequence[str], low, high, path: str | Path
) -> Path:
    """Each pair's optimum in the ``[lam, mu]`` plane: the TRE-best point (``oracle``, circles) and the unsupervised
    choice (``chosen``, squares), joined per pair; points shared by several pairs are spread slightly so each shows.

    Args:
        oracle, chosen: one mapping per pair with the hyperparameters by name (same pair order).
        low, high: the swept range per hyperparameter (the axes' limits).
    """
    fig = Figure(figsize=(5.4, 4.6))
    ax = fig.subplots()
    span = np.asarray(high, dtype=float) - np.asarray(low, dtype=float)
    span = np.where(span > 0, span, 1.0)
    rng = np.random.default_rng(0)
    for k, (truth, pick) in enumerate(zip(oracle, chosen)):
        jitter = rng.uniform(-0.02, 0.02, 2) * span
        a = np.array([truth[names[0]], truth[names[1]]]) + jitter
        b = np.array([pick[names[0]], pick[names[1]]]) + jitter
        ax.plot([a[0], b[0]], [a[1], b[1]], color="grey", linewidth=0.7, alpha=0.7)
        ax.plot(*a, marker="o", color="tab:blue", linestyle="none", label="TRE oracle" if k == 0 else None)
        ax.plot(*b, marker="s", color="tab:orange", linestyle="none", fillstyle="none",
                label="unsupervised choice" if k == 0 else None)
    ax.set_xlim(low[0] - 0.06 * span[0], high[0] + 0.06 * span[0])
    ax.set_ylim(low[1] - 0.06 * span[1], high[1] + 0.06 * span[1])
    ax.set_xlabel(LABELS.get(names[0], names[0]))
    ax.set_ylabel(LABELS.get(names[1], names[1]))
    ax.set_title(f"per-pair optima ({len(oracle)} pairs)", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_material_recovery(entries: Mapping[str, Mapping], path: str | Path, quantity: str = "poisson_ratio") -> Path:
    """Selected vs true material across pairs (one panel per selection, e.g. ``{"TRE oracle": ...,
    "unsupervised": ...}``, each a :func:`~.selection.material_correlation` entry of ``quantity``), Spearman's rho
    in the title; for the Poisson ratio on its whole range [0, 0.5] with the identity line."""
    fig = Figure(figsize=(4.4 * len(entries), 4.2))
    axes = np.atleast_1d(fig.subplots(1, len(entries)))
    label = {"poisson_ratio": "Poisson ratio ν", "lam_over_mu": "λ/μ"}.get(quantity, quantity)
    for ax, (name, entry) in zip(axes, entries.items()):
        true, found = np.asarray(entry.get("true", []), float), np.asarray(entry.get("discovered", []), float)
        ax.plot(true, found, marker="o", linestyle="none")
        if quantity == "poisson_ratio":  # nu of any admissible material lies in [0, 0.5)
            ax.plot([0, 0.5], [0, 0.5], color="grey", linestyle="--", linewidth=0.8, label="selected = true")
            ax.set_xlim(0, 0.5)
            ax.set_ylim(-0.02, 0.52)
            ax.legend(fontsize=8, loc="upper left")
        rho = entry.get("spearman_r")
        ax.set_title(f"{name}: Spearman {rho:.2f} (n={len(true)})" if rho is not None
                     else f"{name}: n={len(true)}, {entry.get('reason', 'undefined')}", fontsize=9)
        ax.set_xlabel(f"true {label} (simulation)")
        ax.set_ylabel(f"selected {label}")
        ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_regularizer_comparison(
    elastic: Mapping,
    diffusion: Mapping,
    per_pair: Mapping[str, Mapping[str, float]],
    metric: str,
    path: str | Path,
    baseline: str = "diffusion",
) -> Path:
    """Best elastic vs best diffusion: the diffusion model's mean ``metric`` over ``alpha`` with the best elastic
    value as a line (left), and each pair's ``metric`` at both optima (right).

    Args:
        elastic, diffusion: sweep summaries (:func:`~.selection.summarize`) of the elastic and the ``[alpha]`` model.
        per_pair: ``{pair_id: {"elastic": value, baseline: value}}`` on the common pairs.
        baseline: the ``[alpha]`` model's regularizer (``"diffusion"`` or ``"elastic_fixed"``), its label.
        metric: metric to compare (e.g. the shared criterion's).
        path: PNG to write.
    """
    fig = Figure(figsize=(10, 4))
    left, right = fig.subplots(1, 2)
    grid = sorted(diffusion["grid"], key=lambda point: point["alpha"])
    left.plot([p["alpha"] for p in grid], [p[metric] for p in grid], marker="o", label=f"{baseline} (over α)")
    left.axhline(elastic["best"]["mean"][metric], color="red", linestyle="--",
                 label=f"best elastic (λ={elastic['best']['lam']:.3g}, μ={elastic['best']['mu']:.3g})")
    left.set_xlabel("α")
    left.set_ylabel(LABELS.get(metric, metric))
    left.legend(fontsize=8)
    left.grid(alpha=0.3)
    for values in per_pair.values():
        right.plot([0, 1], [values[baseline], values["elastic"]], color="grey", alpha=0.6, marker="o")
    right.set_xticks([0, 1], [f"{baseline}\nα={diffusion['best']['alpha']:.3g}", "elastic\n(best λ, μ)"])
    right.set_xlim(-0.3, 1.3)
    right.set_ylabel(f"{LABELS.get(metric, metric)} per pair")
    right.grid(alpha=0.3)
    return _save(fig, path)


def _slice(volume: torch.Tensor, axis: int, index: int) -> np.ndarray:
    """2-D slice of a ``(*spatial)`` volume, transposed so the first remaining axis is horizontal."""
    return volume.detach().float().cpu().select(axis, index).numpy().T


def plot_pair_comparison(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    results: Sequence[Mapping],
    path: str | Path,
    fixed_mask: torch.Tensor | None = None,
    moving_mask: torch.Tensor | None = None,
    axis: int = 1,
    index: int | None = None,
    grid_step: int = 4,
) -> Path:
    """One row per registration result: fixed, moving, warped (mask contours), deformation grid, ``det J``.

    Args:
        fixed, moving: ``(1, 1, *spatial)`` images (3D) of one pair.
        results: one mapping per row with ``label`` (str), ``ddf`` ``(1, 3, *spatial)``, ``warped`` (image like
            ``moving``) and optionally ``warped_mask``; a row whose model preprocesses the pair its own way gives its
            own ``fixed``, ``moving``, ``fixed_mask``, ``moving_mask`` (default: the arguments).
        path: PNG to write.
        fixed_mask, moving_mask: ``(1, 1, *spatial)`` label maps, drawn as contours (fixed: yellow, moving/warped:
            cyan).
        axis: spatial axis the slice is taken across (1: coronal for Learn2Reg lung CT array order).
        index: slice index; default the middle.
        grid_step: spacing in voxels of the drawn grid lines.
    """
    if fixed.ndim != 5:
        raise ValueError(f"plot_pair_comparison draws 3D pairs (1, 1, X, Y, Z), got shape {tuple(fixed.shape)}.")
    chosen_index = index
    in_plane = [a for a in range(3) if a != axis]
    columns = ["fixed", "moving", "warped", "deformation grid", "det J"]
    fig = Figure(figsize=(3 * len(columns), 3.1 * len(results)))
    axes = fig.subplots(len(results), len(columns), squeeze=False)

    def show(ax, image, mask=None, warped_mask=None):
        ax.imshow(_slice(image[0, 0], axis, index), cmap="gray", origin="lower")
        if mask is not None:
            ax.contour(_slice(mask[0, 0], axis, index), levels=[0.5], colors="yellow", linewidths=0.8)
        if warped_mask is not None:
            ax.contour(_slice(warped_mask[0, 0], axis, index), levels=[0.5], colors="cyan", linewidths=0.8)

    for row, result in zip(axes, results):
        ddf = result["ddf"]
        row_fixed, row_moving = result.get("fixed", fixed), result.get("moving", moving)
        row_fixed_mask, row_moving_mask = result.get("fixed_mask", fixed_mask), result.get("moving_mask", moving_mask)
        index = row_fixed.shape[2 + axis] // 2 if chosen_index is None else int(chosen_index)
        show(row[0], row_fixed, row_fixed_mask)
        show(row[1], row_moving, None, row_moving_mask)
        show(row[2], result["warped"], row_fixed_mask, result.get("warped_mask"))
        # deformed grid x + u(x) in the slice plane
        u = [_slice(ddf[0, a], axis, index) for a in in_plane]
        h, v = np.meshgrid(np.arange(u[0].shape[1]), np.arange(u[0].shape[0]))
        points_h, points_v = h + u[0], v + u[1]
        row[3].imshow(_slice(row_fixed[0, 0], axis, index), cmap="gray", origin="lower", alpha=0.35)
        for k in range(0, points_h.shape[0], grid_step):
            row[3].plot(points_h[k], points_v[k], color="tab:red", linewidth=0.6)
        for k in range(0, points_h.shape[1], grid_step):
            row[3].plot(points_h[:, k], points_v[:, k], color="tab:red", linewidth=0.6)
        # det J on the interior (the metric's border is left blank)
        jacobian = torch.full(ddf.shape[2:], float("nan"))
        interior = (slice(JACOBIAN_BORDER, -JACOBIAN_BORDER),) * 3
        jacobian[interior] = jacobian_determinant(ddf.float())[0].cpu()
        cmap = matplotlib.colormaps["RdBu_r"].with_extremes(under="black")  # folding (J < 0) in black
        shown = row[4].imshow(_slice(jacobian, axis, index), cmap=cmap, origin="lower",
                              norm=TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=2.0))
        fig.colorbar(shown, ax=row[4], fraction=0.046, extend="both")
        row[0].set_ylabel(result["label"], fontsize=9)
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
    for ax, title in zip(axes[0], columns):
        ax.set_title(title, fontsize=10)
    return _save(fig, path, dpi=110)

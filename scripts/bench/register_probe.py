"""One registration method on a list of cached pairs, in a fresh process: DDFs, seconds per pair, peak memory.

Run as ``python -m bench.register_probe '<json job>'`` with ``{"spec": {"name", "kind", "options"}, "pairs":
[paths of .npz pairs], "scratch": folder}``; writes ``scratch/ddf_<i>.npy`` (package DDF ``(3, X, Y, Z)``, voxels)
and prints one JSON line: ``seconds`` per pair (the registration call only: from the loaded arrays to the DDF),
``baseline_rss_mib`` (``VmHWM`` after imports, model loading and the first pair's loading) and ``peak_rss_mib``
(``VmHWM`` after the last pair: the method's own peak, as every pair is about the same size), or ``{"skipped":
reason}`` when the method's package or model is not available.

Kinds (``spec["kind"]``; options in ``spec["options"]``):

* ``identity``: zero field.
* ``elastix``: :func:`bench.classical.elastix_register` with :func:`bench.classical.elastix_lung_parameters`
  (``iterations``, ``affine_stage``, ``pyramids``); ``demons``: :func:`bench.classical.demons_register`
  (``iterations``); both on the bundle's intensity window scaled to [0, 1].
* ``convex_adam``: :func:`bench.classical.convex_adam_register` on the HU images (``options`` go to
  ``convex_adam_pt``).
* ``network``: the bundle's model (``model``: path of ``model.pt`` with ``model.json`` next to it) at ``lam``,
  ``mu``; run on the model's training grid (the pair resampled to it when it differs, the field resampled back).
* ``optimize``: the bundle's test-time stages (:class:`elastic_hypermorph_bundle.workflow.instance.InstanceOptimization`
  with ``steps``, ``prealign``, ``use_mask`` and any further ``optimize_kwargs``) at ``lam``, ``mu``, as
  ``RegisterStep`` runs them: pre-alignment, then the network on the pre-aligned pair (``init: "network"``, with
  ``model``) or the identity (``init: "identity"``), then the instance optimisation; what the pre-alignment and
  the start selection decided on each pair (their similarity and objective values) goes to ``details.records``.
  With ``optimize_kwargs`` ``{"coverage_mask": true}`` (section 5b's follow-up rows, as inference runs them) a
  follow-up's similarity is restricted to where its scan has data (:func:`bench.accuracy.moving_coverage`, the
  bundle's ``moving_coverage`` of the scan's own grid).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bench import classical
from bench.accuracy import load_pair, moving_coverage, normalise
from bench.timing import max_rss_mib, synchronize

__all__ = ["load_model", "network_ddf", "register_pairs"]


def load_model(model_path: str | Path, device) -> tuple[torch.nn.Module, object, dict]:
    """The bundle model exported by training: ``model.pt`` (state dict) and ``model.json`` (card) next to it;
    returns the network (eval mode), its trained hyperparameter space and ``{"spatial_size", "training"}``."""
    from elastic_hypermorph_bundle.model_card import ModelCard, load_trained_network

    card = ModelCard.load(model_path)
    net = load_trained_network(model_path, device=device)
    return net, card.hyper_space, {"spatial_size": card.preprocessing.get("spatial_size"),
                                   "training": card.info.get("training") or {}}


def network_ddf(net, weights, fixed: torch.Tensor, moving: torch.Tensor, grid=None) -> torch.Tensor:
    """The network's DDF ``(1, 3, X, Y, Z)`` (voxels of the pair's grid) for ``(1, 1, X, Y, Z)`` images in [0, 1].

    When ``grid`` (the model's training grid) differs from the pair's, both images are resampled to it (trilinear,
    corner-aligned), and the field is resampled back with channel ``j`` scaled by ``(X_j - 1) / (grid_j - 1)``."""
    shape = tuple(fixed.shape[2:])
    from elastic_hypermorph_bundle.forward import network_input

    x = network_input(moving, fixed)
    grid = shape if grid is None else tuple(int(g) for g in grid)
    if grid != shape:
        x = F.interpolate(x, size=grid, mode="trilinear", align_corners=True)
    with torch.inference_mode():
        ddf = net(x, weights=weights).float()
    if grid != shape:
        scale = torch.tensor([(n - 1) / (g - 1) for n, g in zip(shape, grid)], device=ddf.device).view(1, 3, 1, 1, 1)
        ddf = F.interpolate(ddf, size=shape, mode="trilinear", align_corners=True) * scale
    return ddf.clone()


def register_pairs(spec: dict, pair_paths: list[str], scratch: str) -> dict:
    kind, options = spec["kind"], spec.get("options", {})
    device = torch.device(options.get("device", "cpu"))
    report: dict = {"device": str(device), "seconds": []}
    if kind == "elastix" and not classical.elastix_available():
        return {"skipped": "itk-elastix is not installed (pip install itk-elastix)"}
    if kind == "convex_adam" and not classical.convex_adam_available():
        return {"skipped": "convexAdam is not installed (pip install convexAdam)"}
    net = weights = grid = None
    if kind == "network" or (kind == "optimize" and options.get("init") == "network"):
        if not Path(options["model"]).is_file():
            return {"skipped": f"no trained model at {options['model']}"}
        net, space, card = load_model(options["model"], device)
        hyper = space.point(options["lam"], options["mu"]).to(device)
        weights = net.generate_weights(hyper)
        grid = card.get("spatial_size")
        report["details"] = {"model_spatial_size": grid, "model_training": card.get("training", {}).get("steps")}
    if kind == "optimize":
        from elastic_hypermorph_bundle.workflow.instance import InstanceOptimization

        stages = InstanceOptimization(steps=options["steps"], prealign=options.get("prealign", "none"),
                                      use_mask=bool(options.get("use_mask")), **options.get("optimize_kwargs", {}))
        row = torch.tensor([[float(options["lam"]), float(options["mu"])]], device=device)
    report["baseline_rss_mib"] = None
    for index, path in enumerate(pair_paths):
        pair = load_pair(path)
        if report["baseline_rss_mib"] is None:
            report["baseline_rss_mib"] = max_rss_mib()
        fixed, moving = normalise(pair.fixed_image), normalise(pair.moving_image)
        synchronize(device)
        start = time.perf_counter()
        if kind == "identity":
            ddf = np.zeros((3, *fixed.shape), np.float32)
        elif kind == "elastix":
            ddf = classical.elastix_register(fixed, moving, pair.spacing,
                                             classical.elastix_lung_parameters(
                                                 iterations=options["iterations"],
                                                 affine_stage=bool(options.get("affine_stage")),
                                                 pyramids=options.get("pyramids", classical.LUNG_PYRAMIDS)))
        elif kind == "demons":
            ddf = classical.demons_register(fixed, moving, pair.spacing, iterations=options["iterations"])
        elif kind == "convex_adam":
            ddf = classical.convex_adam_register(pair.fixed_image.astype(np.float32),
                                                 pair.moving_image.astype(np.float32), device=str(device),
                                                 **options.get("convex_adam_kwargs", {}))
        elif kind in ("network", "optimize"):
            fixed_t = torch.from_numpy(fixed)[None, None].to(device)
            moving_t = torch.from_numpy(moving)[None, None].to(device)
            if kind == "network":
                init = network_ddf(net, weights, fixed_t, moving_t, grid)
            else:
                fixed_mask = (torch.from_numpy(pair.fixed_mask > 0)[None, None].to(device).float()
                              if stages.use_mask else None)
                # a follow-up's coverage as the bundle's transforms give it (the cache holds the resampled scan)
                # (only where the row's options say so: they are its key in section 5b)
                coverage = moving_coverage(pair) if options.get("optimize_kwargs", {}).get("coverage_mask") else None
                coverage = None if coverage is None else torch.from_numpy(coverage)[None, None].to(device)
                mask, covered = stages.similarity_mask(fixed_mask, coverage)
                predict = None if net is None else (lambda m: network_ddf(net, weights, fixed_t, m, grid))
                init = stages.register(predict, fixed_t, moving_t, row, tuple(pair.spacing), mask, covered=covered)
                # what the pre-alignment and the start selection decided (section 5b's diagnosis)
                report.setdefault("details", {}).setdefault("records", []).append(
                    {k: torch.as_tensor(v).flatten().tolist() for k, v in stages.record.items()})
            ddf = init.detach().reshape(3, *fixed.shape).cpu().numpy()
        else:
            raise ValueError(f"unknown method kind {kind!r}")
        synchronize(device)
        report["seconds"].append(time.perf_counter() - start)
        np.save(Path(scratch) / f"ddf_{index}.npy", np.asarray(ddf, dtype=np.float32))
    report["peak_rss_mib"] = max_rss_mib()
    return report


if __name__ == "__main__":
    job = json.loads(sys.argv[1])
    print(json.dumps(register_pairs(job["spec"], job["pairs"], job["scratch"])))

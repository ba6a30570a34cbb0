"""Issue 21's cuts outside the optimisation's levels, each against the code before it, interleaved in one process.

``python -m bench.output_cuts BEFORE_DIR PAIR_DIR [ROUNDS] [--record] [--only=KEY,..] [--before_commit=SHA]`` from
``scripts/``: ``BEFORE_DIR`` holds the package before the cuts (``git archive <commit> | tar -x -C BEFORE_DIR``),
``PAIR_DIR`` a Learn2Reg folder of full-size pairs (section 7's dataset) whose first pair is used. Each candidate runs
``ROUNDS`` times (default 3), the before/after versions alternating, order reversed every other round; the median
seconds of each, and whether the two give the same values (bit for bit, the largest difference, or the same
picture). One JSON line out; ``--record`` stores it as ``speed_candidates.outputs`` in ``docs/benchmarks.json``
(rendered in benchmarks.md section 7b); with ``--only`` (the candidates' keys below) it measures those alone and
``--record`` adds their rows to the record, each with its own date, load and ``--before_commit``.

* MIND-SSC of one image (the optimisation computes both images' once per pair);
* the transform written (``write_displacement_field``) at the former default gzip level 1 and at level 0, the
  per-kind default since issue 21 for displacement fields: seconds and MB;
* the preview (``save_pair_png``) of the pair, from its images as nibabel loads them (Fortran-ordered);
* ``warp``: the moving image (the network's window) warped for the preview: by the registration step, whole, before
  the preview drew three cuts of it (issue 21: the writer warps the HU file as well), against the preview warping it
  at those cuts alone (``warped=True``); the pictures compared.

Keys: ``mind``, ``transform``, ``preview``, ``warp``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from elastic_hypermorph_bundle.displacement import write_displacement_field
from elastic_hypermorph_bundle.losses.mind import mind_ssc
from elastic_hypermorph_bundle.networks import warp_image
from elastic_hypermorph_bundle.visualize import save_pair_png


def _module(path: Path, name: str, package_relative: dict[str, str] | None = None):
    """The module at ``path`` loaded under ``name`` (its relative imports rewritten to absolute ones of today's
    package, for the modules whose before-version only imports unchanged helpers)."""
    source = path.read_text()
    for relative, absolute in (package_relative or {}).items():
        source = source.replace(relative, absolute)
    spec = importlib.util.spec_from_loader(name, loader=None)
    module = importlib.util.module_from_spec(spec)
    exec(compile(source, str(path), "exec"), module.__dict__)  # noqa: S102 - the project's own earlier code
    return module


def _median(function, rounds: int) -> list[float]:
    times = []
    for _ in range(rounds):
        begin = time.perf_counter()
        function()
        times.append(time.perf_counter() - begin)
    return times


def run(before_dir: str, pair_dir: str, rounds: int = 3, only: set[str] | None = None) -> dict:
    before = Path(before_dir) / "elastic_hypermorph_bundle"
    package = {"from .metrics import": "from elastic_hypermorph_bundle.metrics import",
               "from ..networks.spatial import": "from elastic_hypermorph_bundle.networks.spatial import",
               "from .networks.warp import": "from elastic_hypermorph_bundle.networks.warp import",
               "from .reduction import": "from elastic_hypermorph_bundle.losses.reduction import"}
    old = {"mind": _module(before / "losses" / "mind.py", "before_mind", package),
           "visualize": _module(before / "visualize.py", "before_visualize", package)}
    pair_dir = Path(pair_dir)
    fixed_path = sorted((pair_dir / "imagesTr").glob("*_0000.nii.gz"))[0]
    paths = {"fixed": fixed_path, "moving": Path(str(fixed_path).replace("_0000.nii", "_0001.nii"))}
    paths.update({f"{k}_mask": Path(str(p).replace("imagesTr", "masksTr")) for k, p in list(paths.items())})
    # as nibabel loads them (Fortran order, as the bundle's loaders hand them over), HU -> [0, 1] for MIND-SSC
    arrays = {k: torch.from_numpy(np.asarray(nib.load(p).dataobj).astype(np.float32)) for k, p in paths.items()}
    window = {k: ((arrays[k] + 1000) / 1500).clamp(0, 1) for k in ("fixed", "moving")}
    image = window["fixed"][None, None].contiguous()
    generator = torch.Generator().manual_seed(0)
    shape = tuple(arrays["fixed"].shape)
    ddf = torch.nn.functional.interpolate(torch.randn(1, 3, 6, 6, 6, generator=generator) * 4, size=shape,
                                          mode="trilinear", align_corners=True)
    affine = nib.load(paths["fixed"]).affine
    spacing = [float(s) for s in nib.load(paths["fixed"]).header.get_zooms()[:3]]
    folder = Path(tempfile.mkdtemp(prefix="output_cuts_"))
    preview = dict(warped=window["moving"], ddf=ddf[0], spacing=spacing, window=(0.0, 1.0), title="pair",
                   fixed_mask=arrays["fixed_mask"], moving_mask=arrays["moving_mask"])
    moving = window["moving"][None, None].contiguous()  # as the registration step held it
    candidates = {
        "MIND-SSC of one image": ("mind", lambda: old["mind"].mind_ssc(image), lambda: mind_ssc(image)),
        "transform.nii.gz (gzip level 1 -> stored)": (
            "transform",
            lambda: write_displacement_field(folder / "level1.nii.gz", ddf[0], affine, 1),
            lambda: write_displacement_field(folder / "level0.nii.gz", ddf[0], affine, 0)),
        "preview.png": (
            "preview",
            lambda: old["visualize"].save_pair_png(folder / "before.png", window["fixed"], window["moving"], **preview),
            lambda: save_pair_png(folder / "after.png", window["fixed"], window["moving"], **preview)),
        "moving image warped for the preview (the step's whole warp -> the preview's three cuts)": (
            "warp",
            lambda: old["visualize"].save_pair_png(folder / "warp_before.png", window["fixed"], window["moving"],
                                                   **{**preview, "warped": warp_image(moving, ddf)[0, 0]}),
            lambda: save_pair_png(folder / "warp_after.png", window["fixed"], window["moving"],
                                  **{**preview, "warped": True})),
    }
    candidates = {name: functions for name, (key, *functions) in candidates.items() if only is None or key in only}
    result = {"pair": fixed_path.name, "shape": list(shape), "rounds": rounds, "threads": torch.get_num_threads(),
              "cpus": len(os.sched_getaffinity(0)), "load_before": os.getloadavg()[0], "rows": {}}
    for name, (first, second) in candidates.items():
        outputs = [first(), second()]  # warm-up, and the values compared
        times = {"before": [], "after": []}
        for index in range(rounds):
            order = [("before", first), ("after", second)]
            for label, function in order if index % 2 == 0 else order[::-1]:
                times[label] += _median(function, 1)
        row = {label: float(np.median(values)) for label, values in times.items()}
        row["runs"] = times
        if isinstance(outputs[0], torch.Tensor):
            row["max_abs_difference"] = float((outputs[0].float() - outputs[1].float()).abs().max())
        elif isinstance(outputs[0], Path):  # pictures
            from PIL import Image

            pictures = [np.asarray(Image.open(path)) for path in outputs]
            row["same_pixels"] = bool(pictures[0].shape == pictures[1].shape and (pictures[0] == pictures[1]).all())
            row["mb"] = {which: path.stat().st_size / 1e6 for which, path in zip(("before", "after"), outputs)}
        else:
            row["mb"] = {"before": (folder / "level1.nii.gz").stat().st_size / 1e6,
                         "after": (folder / "level0.nii.gz").stat().st_size / 1e6}
        result["rows"][name] = row
        print(json.dumps({name: row}), file=sys.stderr, flush=True)
    result["load_after"] = os.getloadavg()[0]
    return result


def add_rows(measured: dict, before_commit: str, json_path: Path | None = None) -> None:
    """Add ``measured``'s rows to the record ``speed_candidates.outputs`` of ``benchmarks.json`` (the other rows and
    the notes kept), each with its own date, load, command and the commit it is measured against."""
    from bench.speed_candidates import ROOT

    json_path = json_path or ROOT / "docs" / "benchmarks.json"
    results = json.loads(json_path.read_text())
    rows = results["speed_candidates"]["outputs"]["result"]["rows"]
    stamp = {"before_commit": before_commit, "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
             "load_before": measured["load_before"], "load_after": measured["load_after"],
             "rounds": measured["rounds"], "command": "python -m bench.output_cuts " + " ".join(sys.argv[1:])}
    rows.update({name: {**row, **stamp} for name, row in measured["rows"].items()})
    json_path.write_text(json.dumps(results, indent=2, default=float) + "\n")


if __name__ == "__main__":
    arguments = [a for a in sys.argv[1:] if not a.startswith("--")]
    options = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--") and "=" in a)
    only = set(options["only"].split(",")) if "only" in options else None
    measured = run(arguments[0], arguments[1], int(arguments[2]) if len(arguments) > 2 else 3, only)
    print(json.dumps(measured), flush=True)
    if "--record" in sys.argv and only is not None:
        add_rows(measured, options.get("before_commit", "the earlier commit"))
    elif "--record" in sys.argv:
        from bench.speed_candidates import record

        record("outputs", measured, module="output_cuts")

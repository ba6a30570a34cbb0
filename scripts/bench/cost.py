"""Sections 1-4 of the benchmark: cost of hyper-conditioning, of the regularizers, of a test-time sweep, and the
peak memory of a full-size training step. Each function returns a JSON-serialisable dict of raw figures."""

from __future__ import annotations

import torch
from monai.losses import BendingEnergyLoss, DiffusionLoss

from elastic_hypermorph_bundle.losses import ElasticLoss

from .nets import build_network, count_parameters, inference, random_pair, training_step
from .timing import interleaved_medians, run_probe

__all__ = ["hyper_conditioning_cost", "regularizer_cost", "sweep_throughput", "training_memory"]

GIB = 2**30


def _ratio(times: dict, numerator: str, denominator: str) -> float:
    return times[numerator]["median_s"] / times[denominator]["median_s"]


def hyper_conditioning_cost(configs: list[dict], device: str, memory_probes: bool) -> list[dict]:
    """Hyper network vs its plain twin, per configuration ``{network, spatial_size, batch, modes, warmup, repeats}``.

    Timings interleave hyper and plain in this process; with ``memory_probes`` (CPU) each variant's peak RSS is
    measured in a fresh process (:mod:`.probe`); on CUDA the peak allocated memory is read in-process.
    """
    rows = []
    for config in configs:
        nets = {variant: build_network(config["network"], variant).to(device) for variant in ("hyper", "plain")}
        for mode in config["modes"]:
            make = inference if mode == "inference" else training_step
            candidates = {v: make(net, config["batch"], config["spatial_size"], device) for v, net in nets.items()}
            times = interleaved_medians(candidates, config["repeats"], config["warmup"], device)
            row = {
                "network": config["network"], "mode": mode, "device": device, "batch": config["batch"],
                "spatial_size": list(config["spatial_size"]), "warmup": config["warmup"],
                "repeats": config["repeats"], "times": times, "ratio": _ratio(times, "hyper", "plain"),
                "parameters": {v: count_parameters(net) for v, net in nets.items()},
            }
            if device.startswith("cuda"):
                row["peak_memory_mib"] = {}
                for variant, run in candidates.items():
                    torch.cuda.reset_peak_memory_stats(device)
                    run()
                    torch.cuda.synchronize(device)
                    row["peak_memory_mib"][variant] = torch.cuda.max_memory_allocated(device) / 2**20
                row["memory_method"] = "torch.cuda.max_memory_allocated over one call (whole process allocations)"
            rows.append(row)
            del candidates
        if memory_probes and not device.startswith("cuda"):
            probes = {
                variant: run_probe({"network": config["network"], "variant": variant,
                                    "spatial_size": list(config["spatial_size"]), "batch": config["batch"],
                                    "modes": list(config["modes"])})
                for variant in ("hyper", "plain")
            }
            for row in rows[-len(config["modes"]):]:
                key = f"{row['mode']}_peak_mib"
                row["peak_memory_mib"] = {v: p.get(key) for v, p in probes.items()}
                row["baseline_memory_mib"] = {v: p.get("baseline_mib") for v, p in probes.items()}
                row["memory_method"] = "peak RSS (VmHWM) of a fresh process per variant"
        del nets
    return rows


def regularizer_cost(sizes: list[list[int]], device: str, warmup: int, repeats: int) -> list[dict]:
    """Forward + backward of ElasticLoss vs MONAI DiffusionLoss and BendingEnergyLoss on a smooth random DDF."""
    rows = []
    losses = {
        "elastic": lambda ddf: ElasticLoss()(ddf, 0.5, 0.5),
        "diffusion": DiffusionLoss(),
        "bending_energy": BendingEnergyLoss(),
    }
    for size in sizes:
        moving, fixed = random_pair(1, size, device)
        ddf = torch.cat([moving, fixed, moving * fixed], dim=1).requires_grad_(True)

        def make(loss):
            def run():
                ddf.grad = None
                loss(ddf).backward()

            return run

        times = interleaved_medians({name: make(loss) for name, loss in losses.items()}, repeats, warmup, device)
        rows.append({
            "spatial_size": list(size), "device": device, "batch": 1, "warmup": warmup, "repeats": repeats,
            "times": times,
            "ratio_to_diffusion": {name: _ratio(times, name, "diffusion") for name in losses},
        })
    return rows


def sweep_throughput(network: str, spatial_size: list[int], pairs: int, grid: int, device: str, warmup: int,
                     repeats: int) -> dict:
    """Test-time discovery: a ``grid x grid`` sweep of ``[lam, mu]`` over ``pairs`` image pairs, one
    ``generate_weights`` per grid point reused for every pair, vs plain-twin inferences of the same pairs.

    Interleaved per grid point: the sweep's work for that point (weight generation + ``pairs`` forwards) and
    ``pairs`` plain inferences are timed back to back, in alternating order, so both see the same machine state;
    the ratio is total sweep time over total plain time for the same number of images. ``warmup`` untimed rounds
    of both come first; ``repeats`` is unused (every grid point is a repetition).
    """
    hyper_net = build_network(network, "hyper").to(device).eval()
    plain_net = build_network(network, "plain").to(device).eval()
    inputs = [torch.cat(random_pair(1, spatial_size, device, seed=i), dim=1) for i in range(pairs)]
    rows = torch.cartesian_prod(torch.linspace(0, 1, grid), torch.linspace(0, 1, grid)).to(device)
    sweep_times, plain_times = [], []
    for index in range(-warmup, len(rows)):
        row = rows[max(index, 0)]

        def sweep_point():
            with torch.inference_mode():
                weights = hyper_net.generate_weights(row[None])
                for x in inputs:
                    hyper_net(x, weights=weights)

        def plain():
            with torch.inference_mode():
                for x in inputs:
                    plain_net(x)

        times = interleaved_medians({"sweep": sweep_point, "plain": plain} if index % 2 == 0 else
                                    {"plain": plain, "sweep": sweep_point}, 1, 0, device)
        if index >= 0:
            sweep_times.append(times["sweep"]["median_s"])
            plain_times.append(times["plain"]["median_s"] / pairs)
    sweep_total, plain_total = sum(sweep_times), sum(plain_times) * pairs
    return {
        "network": network, "spatial_size": list(spatial_size), "pairs": pairs, "grid": [grid, grid],
        "device": device, "warmup": warmup, "sweep_s": sweep_total, "plain_s": plain_total,
        "per_point_pair_s": sweep_total / (len(rows) * pairs),
        "plain_inference_median_s": float(torch.tensor(plain_times).median()),
        "sweep_point_times_s": sweep_times, "plain_inference_times_s": plain_times,
        "ratio": sweep_total / plain_total,
    }


def training_memory(network: str, spatial_size: list[int], batch: int, device: str, threshold_gib: float) -> dict:
    """Peak memory of one training step at full size, what dominates it, and mixed precision when above
    ``threshold_gib``. CPU: peak RSS in fresh processes (:mod:`.probe`); CUDA: ``max_memory_allocated``."""
    spec = {"network": network, "variant": "hyper", "spatial_size": list(spatial_size), "batch": batch,
            "modes": ["training"], "breakdown": True}
    if device.startswith("cuda"):
        return _training_memory_cuda(spec, device, threshold_gib)
    result = {"device": device, "method": "peak RSS (VmHWM) of a fresh process, one training step",
              "fp32": run_probe(spec)}
    peak = result["fp32"].get("training_peak_mib")
    result["above_threshold"] = peak is not None and peak / 1024 > threshold_gib
    if result["above_threshold"]:
        result["bf16_autocast"] = run_probe({**spec, "amp": True})
    return result


def _training_memory_cuda(spec: dict, device: str, threshold_gib: float) -> dict:
    from .probe import SavedTensorTally

    net = build_network(spec["network"], "hyper").to(device)
    step = training_step(net, spec["batch"], spec["spatial_size"], device)
    result = {"device": device, "method": "torch.cuda.max_memory_allocated over one training step"}
    for name, amp in (("fp32", False), ("fp16_autocast", True)):
        tally = SavedTensorTally(net)
        torch.cuda.reset_peak_memory_stats(device)
        with torch.autocast("cuda", enabled=amp), tally.recording():
            step()
        torch.cuda.synchronize(device)
        result[name] = {"training_peak_mib": torch.cuda.max_memory_allocated(device) / 2**20, **tally.summary()}
        for handle in tally.handles:
            handle.remove()
    result["above_threshold"] = result["fp32"]["training_peak_mib"] / 1024 > threshold_gib
    return result

#!/usr/bin/env python
"""One prepared check of the CUDA path (issue 13), on simulated data at the Learn2Reg lung grid 192x192x208:

1. bundle training through ``python -m monai.bundle run training``, AMP off and on: time per step (median after
   warm-up), peak CUDA memory, losses finite;
2. ``torchrun --nproc_per_node 1`` with ``configs/multi_gpu_train.json`` (NCCL on CUDA) for a couple of iterations;
3. bundle inference at two (lam, mu) and bundle evaluation of the trained model;
4. sweep throughput per (grid point, pair) (the benchmark's ``sweep_throughput``);
5. pre-alignment + instance optimisation time per pair (``elastic_hypermorph_bundle.optimize``);
6. the benchmark's hyper-vs-plain rows (``hyper_conditioning_cost``) for HyperUNet and HyperLocalNet.

Writes ``gpu_check.json`` and ``gpu_check.md`` into ``--output_dir`` and exits 1 if any step failed or gave a
non-finite value. ``--device cpu --tiny`` is the dry run CI uses (32^3, a narrow network, one epoch).

    bash scripts/gpu_check.sh OUT                       # installs what is missing, then runs this on CUDA
    python scripts/gpu_check.py --output_dir OUT --device cpu --tiny

Training steps are timed by :class:`StepProbe`, a trainer handler added to the bundle run by a layered config file
(``train#trainer#train_handlers``): it synchronises the device after every iteration, which a normal run does not.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FULL_SIZE = [192, 192, 208]
TINY_SIZE = [32, 32, 32]
#: a narrow 4-level network for the CPU dry run
TINY_NETWORK = [
    "--network_kwargs#encoder_features", "[4, 4, 4, 4]",
    "--network_kwargs#decoder_features", "[4, 4, 4, 4, 4, 4, 4]",
    "--network_kwargs#hyper_hidden", "8",
    "--network_kwargs#hyper_layers", "2",
]  # fmt: skip
STEP_NAMES = ["training", "torchrun", "inference", "sweep", "instance_optimisation", "hyper_vs_plain"]


# ------------------------------------------------------------------------------------ probe inside bundle runs


class StepProbe:
    """Trainer handler (added by gpu_check's layered config): per-iteration wall time (device synchronised), the
    loss of every iteration, and the peak CUDA memory of the run, written as JSON to ``path`` on completion."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.times: list[float] = []
        self.losses: list[float] = []
        self._last = None

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.ITERATION_STARTED, self._iteration_started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration_completed)
        engine.add_event_handler(Events.COMPLETED, self._completed)

    def _sync(self, engine) -> None:
        import torch

        device = torch.device(engine.state.device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def _started(self, engine) -> None:
        import torch

        if torch.device(engine.state.device).type == "cuda":
            torch.cuda.reset_peak_memory_stats(engine.state.device)

    def _iteration_started(self, engine) -> None:
        self._sync(engine)
        self._last = time.perf_counter()

    def _iteration_completed(self, engine) -> None:
        self._sync(engine)
        self.times.append(time.perf_counter() - self._last)
        output = engine.state.output
        first = output[0] if isinstance(output, list) else output
        self.losses.append(float(first["loss"]))

    def _completed(self, engine) -> None:
        import torch

        device = torch.device(engine.state.device)
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        result = {"step_times_s": self.times, "losses": self.losses, "peak_memory_gib": peak,
                  "amp": bool(engine.amp), "device": str(device)}
        self.path.write_text(json.dumps(result))


# ---------------------------------------------------------------------------------------------- orchestration


def _finite(value) -> bool:
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return all(_finite(v) for v in value)
    if isinstance(value, float):
        return math.isfinite(value)
    return True


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), str(ROOT / "scripts"), env.get("PYTHONPATH")]))
    return env


def _run(command: list[str], log: Path, timeout: float) -> float:
    """Run ``command`` in the bundle root, its output to ``log``; return its wall time; raise if it fails."""
    start = time.perf_counter()
    with open(log, "w") as stream:
        completed = subprocess.run(command, cwd=ROOT, env=_env(), stdout=stream, stderr=subprocess.STDOUT,
                                   timeout=timeout)
    if completed.returncode != 0:
        tail = log.read_text()[-1500:]
        raise RuntimeError(f"{' '.join(command[:6])} ... exited with {completed.returncode}; log {log}:\n{tail}")
    return time.perf_counter() - start


class Check:
    def __init__(self, output_dir: Path, device: str, tiny: bool) -> None:
        self.out = output_dir
        self.device = device
        self.tiny = tiny
        self.size = TINY_SIZE if tiny else FULL_SIZE
        self.timeout = 600.0
        # models, fields and data are large and re-creatable: kept out of the output folder, removed at the end
        self.work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
        self.logs = output_dir / "logs"
        self.data = self.work / "data"
        self.models = self.work / "models"

    def common(self) -> list[str]:
        options = ["--dataset_dir", str(self.data), "--spatial_size", json.dumps(self.size), "--num_workers", "0"]
        if self.device == "cpu":
            options += ["--device", "$torch.device('cpu')"]
        return options + (TINY_NETWORK if self.tiny else [])

    def bundle(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "monai.bundle", "run", *args, "--meta_file", "configs/metadata.json"]

    # -- steps
    def make_data(self) -> dict:
        pairs = 3 if self.tiny else 4  # 1 (2) train, 1 val, 1 test
        seconds = _run([sys.executable, "scripts/make_synthetic.py", "--output_dir", str(self.data), "--num_pairs",
                        str(pairs), "--spatial_size", json.dumps(self.size), "--seed", "0"],
                       self.logs / "data.log", self.timeout)
        return {"pairs": pairs, "spatial_size": self.size, "seconds": seconds}

    def _train(self, name: str, amp: bool, epochs: int, torchrun: bool) -> dict:
        probe_path = self.work / f"{name}_probe.json"
        layer = self.work / f"{name}_probe_config.json"
        layer.write_text(json.dumps({
            "gpu_probe": {"_target_": "gpu_check.StepProbe", "path": str(probe_path)},
            "train#trainer#train_handlers": "$@train#handlers + [@gpu_probe]",
        }))
        configs = ["configs/train.json"] + (["configs/multi_gpu_train.json"] if torchrun else []) + [str(layer)]
        common = self.common()
        if torchrun:  # the distributed config chooses the device itself
            common = [c for c in common if c not in ("--device", "$torch.device('cpu')")]
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", "-m",
                       "monai.bundle", "run", "training", "--meta_file", "configs/metadata.json"]
        else:
            command = self.bundle("training")
        ckpt = self.models if name == "train_fp32" else self.work / f"models_{name}"
        command += ["--config_file", json.dumps(configs), *common, "--ckpt_dir", str(ckpt), "--output_dir",
                    str(self.work / name), "--epochs", str(epochs), "--val_interval", str(epochs),
                    "--amp", str(amp).lower()]
        seconds = _run(command, self.logs / f"{name}.log", self.timeout)
        probe = json.loads(probe_path.read_text())
        times = probe["step_times_s"]
        warm = times[2:] if len(times) > 3 else times[1:] or times
        return {"amp_requested": amp, "amp_effective": probe["amp"], "iterations": len(times),
                "step_median_s": statistics.median(warm), "step_times_s": times, "losses": probe["losses"],
                "peak_memory_gib": probe["peak_memory_gib"], "wall_s": seconds,
                "model_written": (ckpt / "model.pt").is_file()}

    def training(self) -> dict:
        epochs = 1 if self.tiny else 3
        result = {"fp32": self._train("train_fp32", False, epochs, False)}
        if self.device == "cuda":
            result["amp"] = self._train("train_amp", True, epochs, False)
        else:
            result["amp"] = {"skipped": "AMP runs on CUDA only (the configs disable it elsewhere)"}
        return result

    def torchrun(self) -> dict:
        return self._train("torchrun", False, 1, True)

    def inference(self) -> dict:
        result = {}
        for lam, mu in ((0.083, 0.03), (0.5, 0.5)):
            folder = self.work / f"inference_{lam}_{mu}"
            seconds = _run(self.bundle() + ["--config_file", "configs/inference.json", *self.common(), "--ckpt_dir",
                                            str(self.models), "--output_dir", str(folder), "--lam", str(lam), "--mu",
                                            str(mu), "--write_preview", "false"],
                           self.logs / f"inference_{lam}_{mu}.log", self.timeout)
            result[f"lam={lam},mu={mu}"] = {"wall_s": seconds, "ddf_finite": _ddfs_finite(folder)}
        folder = self.work / "evaluation"
        seconds = _run(self.bundle() + ["--config_file", json.dumps(["configs/inference.json", "configs/evaluate.json"]),
                                        *self.common(), "--ckpt_dir", str(self.models), "--output_dir", str(folder)],
                       self.logs / "evaluation.log", self.timeout)
        metrics = json.loads((folder / "metrics.json").read_text())
        mean = metrics.get("mean", {})
        result["evaluation"] = {"wall_s": seconds, "mean": mean,
                                "runtime_per_pair_s": mean.get("runtime_s")}
        return result

    def sweep(self) -> dict:
        from bench.cost import sweep_throughput

        size = self.size if not self.tiny else [16, 16, 16]
        return sweep_throughput("HyperUNet", size, pairs=2, grid=3, device=self.device, warmup=1, repeats=1)

    def instance_optimisation(self) -> dict:
        """Pre-alignment + instance optimisation of one simulated-like pair (a smooth random image and its shift)
        at the bundle's defaults, timed twice (the first run includes CUDA start-up)."""
        import torch

        from elastic_hypermorph_bundle.workflow.instance import InstanceOptimization

        size = self.size if not self.tiny else [16, 16, 16]
        generator = torch.Generator().manual_seed(0)
        fixed = torch.nn.functional.avg_pool3d(torch.rand(1, 1, *size, generator=generator), 5, 1, 2).to(self.device)
        moving = torch.roll(fixed, 1, dims=2)
        stages = InstanceOptimization(steps=5 if self.tiny else 50, prealign="affine")
        row = torch.tensor([[0.083, 0.03]], device=self.device)
        times = []
        for _ in range(2):
            if self.device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            affine = stages.align(fixed, moving, (1.75, 1.25, 1.75))
            field = stages.refine(fixed, moving, row, None, affine)
            if self.device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return {"per_pair_s": times[-1], "times_s": times, "steps_per_level": list(stages.steps),
                "levels": stages.levels, "ddf_finite": bool(torch.isfinite(field).all())}

    def hyper_vs_plain(self) -> list:
        from bench.cost import hyper_conditioning_cost

        size = self.size if not self.tiny else [16, 16, 16]
        configs = [{"network": name, "spatial_size": size, "batch": 1, "modes": ["inference", "training"],
                    "warmup": 1 if self.tiny else 2, "repeats": 1 if self.tiny else 5}
                   for name in ("HyperUNet", "HyperLocalNet")]
        return hyper_conditioning_cost(configs, self.device, False)

    def run(self) -> dict:
        import torch

        for folder in (self.work, self.logs):
            folder.mkdir(parents=True, exist_ok=True)
        gpu = torch.cuda.get_device_name(0) if self.device == "cuda" else None
        report = {"device": self.device, "gpu": gpu, "torch": torch.__version__, "cuda": torch.version.cuda,
                  "tiny": self.tiny, "spatial_size": self.size, "steps": {}}
        start = time.perf_counter()
        try:
            report["data"] = self.make_data()
        except Exception as error:  # without data no step can run
            report["data"] = {"error": str(error)}
        for name in STEP_NAMES:
            print(f"[gpu_check {time.perf_counter() - start:6.1f} s] {name}", flush=True)
            step_start = time.perf_counter()
            try:
                if "error" in report["data"] and name in ("training", "torchrun", "inference"):
                    raise RuntimeError("no simulated data")
                if name == "inference" and not (self.models / "model.pt").is_file():
                    raise RuntimeError("no trained model (the training step failed)")
                value = getattr(self, name)()
                ok = _finite(value) and not _false_flags(value)
                entry = {"status": "ok" if ok else "non-finite", "result": value}
                if isinstance(value, dict) and "skipped" in value:
                    entry["status"] = "skipped"
            except Exception as error:
                entry = {"status": "failed", "error": f"{type(error).__name__}: {error}",
                         "traceback": traceback.format_exc()[-3000:]}
            entry["seconds"] = time.perf_counter() - step_start
            report["steps"][name] = entry
        report["total_seconds"] = time.perf_counter() - start
        report["passed"] = "error" not in report["data"] and all(
            s["status"] in ("ok", "skipped") for s in report["steps"].values())
        return report


def _false_flags(value) -> bool:
    """True when a result reports a failed invariant (``ddf_finite``/``model_written`` false)."""
    if isinstance(value, dict):
        return any(v is False for k, v in value.items() if k in ("ddf_finite", "model_written")) or any(
            _false_flags(v) for v in value.values())
    if isinstance(value, list):
        return any(_false_flags(v) for v in value)
    return False


def _ddfs_finite(folder: Path) -> bool:
    import nibabel as nib
    import numpy as np

    files = sorted(folder.rglob("*ddf*.nii.gz")) or sorted(folder.rglob("disp_*.nii.gz")) or sorted(folder.rglob("transform.nii.gz"))
    if not files:
        raise FileNotFoundError(f"inference wrote no displacement field under {folder}")
    return all(bool(np.isfinite(np.asarray(nib.load(str(f)).dataobj)).all()) for f in files)


def _fmt(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def render(report: dict) -> str:
    """The markdown table of a gpu_check report."""
    lines = [f"# GPU check: {report['gpu'] or report['device']}", "",
             f"torch {report['torch']}, CUDA {report['cuda']}, grid {report['spatial_size']}"
             f"{' (tiny dry run)' if report['tiny'] else ''}, total {report['total_seconds']:.0f} s, "
             f"**{'passed' if report['passed'] else 'FAILED'}**", "",
             "| step | status | figure | value |", "|---|---|---|---|"]
    steps = report["steps"]

    def row(step, figure, value):
        lines.append(f"| {step} | {steps[step]['status']} | {figure} | {value} |")

    for step in STEP_NAMES:
        entry = steps[step]
        result = entry.get("result")
        if entry["status"] in ("failed", "skipped") or result is None:
            row(step, "error" if entry["status"] == "failed" else "reason",
                (entry.get("error") or (result or {}).get("skipped", "")).splitlines()[0][:160])
            continue
        try:
            _rows(step, result, row)
        except (KeyError, TypeError, AttributeError):  # an unexpected result shape must not lose the report
            row(step, "result", json.dumps(result, default=str)[:160])
    return "\n".join(lines) + "\n"


def _rows(step: str, result, row) -> None:
    """Table rows of one step's result."""
    if step == "training":
        for variant, value in result.items():
            if "skipped" in value:
                row(step, f"{variant}", value["skipped"])
            else:
                row(step, f"{variant}: step median s / peak GiB", f"{_fmt(value['step_median_s'])} / "
                    f"{_fmt(value['peak_memory_gib'])}")
    elif step == "torchrun":
        row(step, "step median s / iterations", f"{_fmt(result['step_median_s'])} / {result['iterations']}")
    elif step == "inference":
        evaluation = result["evaluation"]
        row(step, "network + warp s per pair (evaluation)", _fmt(evaluation["runtime_per_pair_s"]))
        row(step, "evaluation mean", ", ".join(f"{k} {_fmt(v)}" for k, v in evaluation["mean"].items()
                                                if isinstance(v, float)))
    elif step == "sweep":
        row(step, "s per (grid point, pair) / ratio to plain", f"{_fmt(result['per_point_pair_s'])} / "
            f"{_fmt(result['ratio'])}")
    elif step == "instance_optimisation":
        row(step, "s per pair", _fmt(result["per_pair_s"]))
    elif step == "hyper_vs_plain":
        for r in result:
            row(step, f"{r['network']} {r['mode']}: hyper / plain median s", f"{_fmt(r['times']['hyper']['median_s'])}"
                f" / {_fmt(r['times']['plain']['median_s'])}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", required=True, help="folder for gpu_check.json, gpu_check.md and logs/")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--tiny", action="store_true", help="32^3 grid, narrow network, one epoch (dry run)")
    args = parser.parse_args(argv)
    out = Path(args.output_dir).absolute()
    if (out / "gpu_check.json").exists():
        print(f"gpu_check: {out} already holds gpu_check.json; choose another --output_dir.", file=sys.stderr)
        return 2
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("gpu_check: --device cuda but torch sees no CUDA device; use --device cpu --tiny for the dry "
                  "run.", file=sys.stderr)
            return 2
    out.mkdir(parents=True, exist_ok=True)
    sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]
    check = Check(out, args.device, args.tiny)
    try:
        report = check.run()
    finally:
        shutil.rmtree(check.work, ignore_errors=True)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=float) + "\n")
    (out / "gpu_check.md").write_text(render(report))
    print(render(report))
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())

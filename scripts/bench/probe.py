"""One network configuration in a fresh process: peak resident memory of inference and of one training step.

Run as ``python -m bench.probe '<json spec>'``; prints one JSON line. The peak RSS
(``VmHWM`` of ``/proc/self/status``) of a fresh process is the configuration's own: it is read after the setup (imports,
network, inputs: ``baseline_mib``), after one inference (``inference_peak_mib``) and after one training step
(``training_peak_mib``; RSS peaks are monotonic, and a training step needs more than an inference).
With ``"breakdown": true`` the training step also records every tensor autograd saves for the backward pass
(``torch.autograd.graph.saved_tensors_hooks``), deduplicated by storage and attributed to the module that saved it.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time

import torch

from bench.nets import build_network, inference, training_step
from bench.timing import max_rss_mib

__all__ = ["probe", "SavedTensorTally"]


class SavedTensorTally:
    """Bytes of the tensors saved for backward, per (top-two-level) module name; each storage counted once."""

    def __init__(self, net: torch.nn.Module):
        self.stack: list[str] = []
        self.bytes: dict[str, int] = {}
        self.seen: set[int] = set()
        self.handles = []
        for name, module in net.named_modules():
            label = ".".join(name.split(".")[:2]) or "network"
            self.handles.append(module.register_forward_pre_hook(self._enter(label)))
            self.handles.append(module.register_forward_hook(self._leave))

    def _enter(self, label: str):
        def hook(module, args) -> None:
            self.stack.append(label)

        return hook

    def _leave(self, module, args, output) -> None:
        self.stack.pop()

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self.seen:
            self.seen.add(storage.data_ptr())
            label = self.stack[-1] if self.stack else "warp and loss"
            if label in ("network", "backbone"):
                label = "network, between layers (activations, pooling, upsampling, concatenation)"
            self.bytes[label] = self.bytes.get(label, 0) + storage.nbytes()
        return tensor

    @contextlib.contextmanager
    def recording(self):
        with torch.autograd.graph.saved_tensors_hooks(self.pack, lambda tensor: tensor):
            yield

    def summary(self, top: int = 6) -> dict:
        ranked = sorted(self.bytes.items(), key=lambda item: -item[1])
        return {
            "saved_total_mib": sum(self.bytes.values()) / 2**20,
            "saved_by_module_mib": {name: value / 2**20 for name, value in ranked[:top]},
        }


def probe(network: str, variant: str, spatial_size, batch: int, modes=("inference", "training"), amp: bool = False,
          breakdown: bool = False) -> dict:
    torch.manual_seed(0)
    net = build_network(network, variant)
    params = sum(p.numel() * p.element_size() for p in net.parameters())
    result: dict = {"parameters_mib": params / 2**20, "baseline_mib": max_rss_mib()}
    if "inference" in modes:
        run = inference(net, batch, spatial_size, "cpu")
        run()
        result["inference_peak_mib"] = max_rss_mib()
        del run
    if "training" in modes:
        step = training_step(net, batch, spatial_size, "cpu")
        tally = SavedTensorTally(net) if breakdown else None
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if amp else contextlib.nullcontext()
        recording = tally.recording() if tally else contextlib.nullcontext()
        start = time.perf_counter()
        with autocast, recording:
            step()
        result["training_step_s"] = time.perf_counter() - start
        result["training_peak_mib"] = max_rss_mib()
        if tally:
            result.update(tally.summary())
            # parameters + gradients + Adam's two moments
            result["parameters_gradients_adam_mib"] = 4 * params / 2**20
    return result


if __name__ == "__main__":
    print(json.dumps(probe(**json.loads(sys.argv[1]))))

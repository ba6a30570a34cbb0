"""Boolean settings as a config or the command line gives them: the package's bottom floor (it imports nothing of
the package), so every layer parses ``--resume false``, ``--amp true`` and the like the same way."""

from __future__ import annotations

import torch

__all__ = ["parse_flag", "amp_enabled"]


def parse_flag(name: str, value) -> bool:
    """A boolean config value as given in a config or on the command line: ``True``/``False`` or
    ``"true"``/``"false"`` in any case (``python -m monai.bundle run ... --resume false`` hands over the string
    ``"false"``, which Python would take as true).

    Raises:
        ValueError: for any other value, naming the option ``--name``.
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise ValueError(f"--{name} must be true or false, got {value!r}.")


def amp_enabled(amp, device) -> bool:
    """Whether a run uses automatic mixed precision: ``--amp`` (parsed by :func:`parse_flag`) and a CUDA device
    (autocast on the CPU would run bfloat16 and gains nothing for these networks)."""
    return parse_flag("amp", amp) and torch.device(device).type == "cuda"

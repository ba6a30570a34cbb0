"""Bundle workflows wired by the JSON configs in ``configs/``: datalists, the training iteration and handlers
(:mod:`.training`), the registration iteration (:mod:`.steps`), ignite metrics and output writers."""

from __future__ import annotations

__all__ = ["parse_flag"]


def parse_flag(name: str, value) -> bool:
    """A boolean config value as given in a config or on the command line: ``True``/``False`` or
    ``"true"``/``"false"`` (``python -m monai.bundle run ... --resume false`` hands over the string ``"false"``,
    which Python would take as true)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise ValueError(f"--{name} must be true or false, got {value!r}.")

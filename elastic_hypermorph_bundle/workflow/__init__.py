"""Bundle workflows wired by the JSON configs in ``configs/``: datalists, inference inputs, the registration
iteration (:mod:`.steps`) and its test-time stages (:mod:`.instance`), the training iteration (:mod:`.train_step`),
checkpoints, export, ignite metrics and output writers. Workflows import the layers below them, never the reverse.

``parse_flag`` and ``amp_enabled`` live in :mod:`elastic_hypermorph_bundle.flags`; they are re-exported here for the
configs (``elastic_hypermorph_bundle.workflow.amp_enabled``) and the workflow modules."""

from __future__ import annotations

from ..flags import amp_enabled, parse_flag

__all__ = ["parse_flag", "amp_enabled"]

"""The model card ``model.json``: what a trained model is, so that every later run can rebuild it and check that
its own settings match it.

Training writes the card next to the weights (``<ckpt_dir>/model.json`` beside ``model.pt``); inference,
evaluation, the sweep and the figures read it back. It holds:

* the trained hyperparameter space: ``regularizer``, ``names``, ``ranges`` (:meth:`HyperSpace.to_dict`) and
  ``hyper_sampling``;
* the network: ``network`` = ``{"name": <class in elastic_hypermorph_bundle.networks>, "kwargs": {...}}``;
* the preprocessing of the images the model was trained on: ``spatial_size`` (network grid, voxels), ``pixdim``
  (resampled voxel size in mm, or null for the file spacing) and ``hu_window`` (HU range mapped to [0, 1]);
* what training did: ``epochs``, ``weights`` (``"best"`` or ``"final"``), ``key_metric``, ``best_metric``,
  ``best_metric_epoch``, ``split_file``, ``training`` (loss weighting, learning rate, ...), ``package_version``
  (the package that wrote the card: a card read and written again keeps it).

Cards written before ``hu_window`` was recorded load with the window those trainings used, ``[-1000, 500]``,
and cards without ``hyper_rank`` as the full-map models they describe (``hyper_rank=None``). The card records
every constructor argument of the network (defaults included), so later changes of defaults do not change it.
"""

from __future__ import annotations

import inspect
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from . import __version__, networks
from .atomic import atomic_write_json, json_ready, load_checkpoint
from .hyperparams import HyperSpace
from .networks.grid import NetworkGrid
from .flags import parse_flag

__all__ = [
    "ModelCard",
    "PREPROCESSING",
    "trained_hyper_space",
    "trained_setting",
    "trained_preprocessing",
    "check_checkpoint",
    "check_run",
    "build_network",
    "network_kwargs_for",
    "parse_network_kwargs",
    "load_trained_network",
]

logger = logging.getLogger("elastic_hypermorph_bundle")

CARD_NAME = "model.json"
#: preprocessing ids recorded by training and checked by every later run
PREPROCESSING = ("spatial_size", "pixdim", "hu_window")
#: the HU window of every training before it was a config id (``registration_transforms``' default)
LEGACY_HU_WINDOW = [-1000.0, 500.0]
#: boolean keyword arguments of the networks, given as "true"/"false" strings on the command line
_NETWORK_FLAGS = ("diffeomorphic",)
#: network keyword arguments that are inference-time defaults, not trained properties
_NOT_TRAINED = ("default_hyper",)


def parse_network_kwargs(kwargs: Mapping) -> dict:
    """The network keyword arguments as JSON values, with the boolean ones parsed (``"false"`` is false)."""
    kwargs = json_ready(dict(kwargs))
    for key in _NETWORK_FLAGS:
        if key in kwargs:
            kwargs[key] = parse_flag(key, kwargs[key])
    return kwargs


def preprocessing(spatial_size=None, pixdim=None, hu_window=LEGACY_HU_WINDOW) -> dict:
    """The preprocessing settings in the card's canonical form (ints, floats, lists; None where unset)."""
    return {
        "spatial_size": None if spatial_size is None else [int(s) for s in spatial_size],
        "pixdim": None if pixdim is None else [float(s) for s in pixdim],
        "hu_window": None if hu_window is None else [float(v) for v in hu_window],
    }


def _network_class(network_name: str) -> type:
    cls = getattr(networks, str(network_name), None)
    if not isinstance(cls, type) or not issubclass(cls, torch.nn.Module):
        choices = sorted(n for n in networks.__all__ if n.startswith("Hyper") and n.endswith("Net"))
        raise ValueError(f"network_name {network_name!r} is not a network of the bundle; choose one of {choices}.")
    return cls


def complete_network_kwargs(network_name: str, network_kwargs: Mapping) -> dict:
    """Every constructor argument of the network, the given ones (parsed) and the class defaults for the rest, so
    that a card describes its model whatever later versions choose as defaults."""
    defaults = {}
    for cls in _network_class(network_name).__mro__:  # a class's ``**options`` go to its base class's constructor
        if "__init__" not in vars(cls):
            continue
        parameters = inspect.signature(cls.__init__).parameters.values()
        for param in parameters:
            if param.default is not inspect.Parameter.empty:
                defaults.setdefault(param.name, param.default)  # the subclass's default wins
        if all(param.kind is not inspect.Parameter.VAR_KEYWORD for param in parameters):
            break
    return parse_network_kwargs({**defaults, **dict(network_kwargs)})


def network_kwargs_for(
    network_kwargs: Mapping, hyper_space: HyperSpace | None = None, default_hyper: Sequence[float] | None = None
) -> dict:
    """The network keyword arguments of a model conditioned on ``hyper_space``: ``network_kwargs`` (parsed, see
    :func:`parse_network_kwargs`) completed with ``hyper_dims = hyper_space.dims`` and ``hyper_scale =
    hyper_space.high`` (the upper ends of the trained ranges) where not given, and ``default_hyper`` (a row ``(H,)``
    or ``(1, H)``, the inference-time default of ``forward``) when given."""
    kwargs = parse_network_kwargs(network_kwargs)
    if hyper_space is not None:
        kwargs.setdefault("hyper_dims", hyper_space.dims)
        kwargs.setdefault("hyper_scale", hyper_space.high.tolist())
    if default_hyper is not None:
        kwargs["default_hyper"] = torch.as_tensor(default_hyper, dtype=torch.float32).reshape(-1).tolist()
    return kwargs


def build_network(
    network_name: str,
    network_kwargs: Mapping,
    hyper_space: HyperSpace | None = None,
    default_hyper: Sequence[float] | None = None,
) -> torch.nn.Module:
    """``elastic_hypermorph_bundle.networks.<network_name>(**kwargs)`` with the keyword arguments of
    :func:`network_kwargs_for` (boolean ones parsed; ``hyper_dims``/``hyper_scale`` from ``hyper_space``).

    Raises:
        ValueError: no such network class.
    """
    return _network_class(network_name)(**network_kwargs_for(network_kwargs, hyper_space, default_hyper))


class ModelCard:
    """A trained model's card (see the module docstring for the file's keys).

    Args:
        hyper_space: the hyperparameter space the model was trained for.
        network_name, network_kwargs: the network class (in :mod:`elastic_hypermorph_bundle.networks`) and its
            constructor arguments.
        spatial_size, pixdim, hu_window: the preprocessing of training (``registration_transforms``).
        info: everything else the card records (``epochs``, ``weights``, ``training``, ``split_file``, best
            metric, ``package_version``), kept as given.
    """

    def __init__(
        self,
        hyper_space: HyperSpace,
        network_name: str,
        network_kwargs: Mapping,
        spatial_size: Sequence[int] | None = None,
        pixdim: Sequence[float] | None = None,
        hu_window: Sequence[float] | None = LEGACY_HU_WINDOW,
        **info,
    ) -> None:
        self.hyper_space = hyper_space
        self.network_name = str(network_name)
        self.network_kwargs = complete_network_kwargs(network_name, network_kwargs)
        self.preprocessing = preprocessing(spatial_size, pixdim, hu_window)
        self.info = json_ready(info)

    # ------------------------------------------------------------------ file

    def to_dict(self) -> dict:
        return {
            **self.hyper_space.to_dict(),
            "hyper_sampling": self.hyper_space.sampling,
            "network": {"name": self.network_name, "kwargs": self.network_kwargs},
            **self.preprocessing,
            "package_version": __version__,
            **self.info,
        }

    @classmethod
    def from_dict(cls, card: Mapping, source: str = "model card") -> ModelCard:
        """A card from its JSON form (also the cards of earlier versions, which lack ``hu_window``).

        Raises:
            ValueError: a required key is missing or malformed, naming ``source``.
        """
        card = dict(card)
        missing = [key for key in ("regularizer", "names", "ranges", "network") if key not in card]
        if missing:
            raise ValueError(f"{source} lacks {missing}: not a model card written by this bundle's training.")
        try:
            ranges = dict(zip(card.pop("names"), card.pop("ranges")))
            space = HyperSpace(
                regularizer=card.pop("regularizer"),
                lam_range=ranges.get("lam", (0.0, 1.0)),
                mu_range=ranges.get("mu", (0.0, 1.0)),
                alpha_range=ranges.get("alpha", (0.0, 1.0)),
                ranges=ranges,
                sampling=card.pop("hyper_sampling", "uniform"),
            )
            network = card.pop("network")
            name, kwargs = network["name"], dict(network.get("kwargs", {}))
            # cards written before the rank-limited kernel map (hyper_rank) describe full-map models
            kwargs.setdefault("hyper_rank", None)
        except (TypeError, KeyError, ValueError) as error:
            raise ValueError(f"{source} is malformed: {error}") from error
        known = {key: card.pop(key) for key in PREPROCESSING if key in card}
        known.setdefault("hu_window", LEGACY_HU_WINDOW)
        return cls(space, name, kwargs, **known, **card)

    def save(self, folder: str | Path) -> Path:
        """Write ``folder/model.json`` as strict JSON, atomically (:func:`~.atomic.atomic_write_json`: a kill never
        leaves half a card; a NaN metric is written as null)."""
        path = Path(folder) / CARD_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> ModelCard:
        """Read a card: ``path`` is the ``model.json`` itself or the checkpoint next to it.

        Raises:
            FileNotFoundError: no card there.
            ValueError: the file is not a readable card.
        """
        path = Path(path)
        if path.suffix != ".json":
            path = path.with_name(CARD_NAME)
        if not path.is_file():
            raise FileNotFoundError(f"model card not found: {path} (written by training next to model.pt).")
        try:
            return cls.from_dict(json.loads(path.read_text()), source=str(path))
        except json.JSONDecodeError as error:
            raise ValueError(f"cannot read the model card {path}: {error}") from error

    @classmethod
    def next_to(cls, ckpt_path: str | Path) -> ModelCard | None:
        """The card beside a checkpoint, or None (with a warning) when there is none."""
        path = Path(ckpt_path).with_name(CARD_NAME)
        if not path.is_file():
            logger.warning("%s not found: assuming the model was trained with this config's settings.", path)
            return None
        return cls.load(path)

    # ------------------------------------------------------------------ use

    def build_network(self, default_hyper: Sequence[float] | None = None) -> torch.nn.Module:
        """The network this card describes (untrained weights), with an optional inference-time default row."""
        kwargs = dict(self.network_kwargs)
        if default_hyper is not None:
            kwargs["default_hyper"] = json_ready(default_hyper)
        return build_network(self.network_name, kwargs)

    def check_hyper_space(self, config_space: HyperSpace) -> HyperSpace:
        """The trained space, refused when the config's ``regularizer`` differs (a model conditioned on
        ``[alpha]`` cannot take ``[lam, mu]`` and vice versa)."""
        if self.hyper_space.regularizer != config_space.regularizer:
            raise ValueError(
                f"the model was trained with regularizer={self.hyper_space.regularizer!r} (model.json), but the "
                f"config says regularizer={config_space.regularizer!r}; pass --regularizer "
                f"{self.hyper_space.regularizer}."
            )
        return self.hyper_space

    def check_network(self, network_name: str, network_kwargs: Mapping) -> None:
        """Refuse a network definition that differs from the trained one. Some differences would load without
        error and silently give wrong fields (``diffeomorphic`` adds no weights); ``default_hyper`` is an
        inference-time default and not compared."""
        if str(network_name) != self.network_name:
            raise ValueError(f"the model is a {self.network_name}; pass --network_name {self.network_name}.")
        ours = complete_network_kwargs(network_name, network_kwargs)
        ours = {k: v for k, v in ours.items() if k not in _NOT_TRAINED}
        trained = {k: v for k, v in self.network_kwargs.items() if k not in _NOT_TRAINED}
        differing = sorted(k for k in set(ours) | set(trained) if json.dumps(ours.get(k)) != json.dumps(trained.get(k)))
        if differing:
            shown = ", ".join(f"{k}={ours.get(k)!r} (trained: {trained.get(k)!r})" for k in differing)
            raise ValueError(f"the network settings differ from those the model was trained with: {shown}.")

    def check_preprocessing(
        self, spatial_size=None, pixdim=None, hu_window=LEGACY_HU_WINDOW, allow_mismatch: bool = False
    ) -> None:
        """Refuse preprocessing that departs from training's (a model trained at 32^3 run at 192x192x208, another
        voxel size or HU window sees images unlike any it learned from), naming both values; with
        ``allow_mismatch`` (``--allow_preprocessing_mismatch true``) warn instead."""
        ours = preprocessing(spatial_size, pixdim, hu_window)
        differing = [key for key in PREPROCESSING if ours[key] != self.preprocessing[key]]
        if not differing:
            return
        shown = ", ".join(f"--{k} {json.dumps(ours[k])} (trained: {json.dumps(self.preprocessing[k])})" for k in differing)
        message = f"preprocessing differs from the model's training: {shown}"
        if not parse_flag("allow_preprocessing_mismatch", allow_mismatch):
            raise ValueError(
                f"{message}. Pass the trained values, or --allow_preprocessing_mismatch true to run anyway."
            )
        logger.warning("%s; running anyway as requested (--allow_preprocessing_mismatch true).", message)


# ---------------------------------------------------------------------- config-facing helpers


def load_trained_network(
    ckpt_path: str | Path, network_def: torch.nn.Module | None = None, device: torch.device | str | None = None
) -> torch.nn.Module:
    """The trained network in eval mode: built from ``model.json`` next to ``ckpt_path`` (``network.name`` and
    ``network.kwargs``, as training wrote them: the architecture THAT model has), else ``network_def``; then the
    weights of ``ckpt_path`` (a state dict, or a checkpoint dict with ``"model"``) are loaded.

    Raises:
        FileNotFoundError: no checkpoint, or neither ``model.json`` nor ``network_def``.
    """
    ckpt_path = Path(ckpt_path)
    if not ckpt_path.is_file():
        raise FileNotFoundError(f"checkpoint {str(ckpt_path)!r} not found: train the bundle first or pass --ckpt_path.")
    card = ModelCard.next_to(ckpt_path)
    if card is not None:
        network = card.build_network()
    elif network_def is not None:
        network = network_def
    else:
        raise FileNotFoundError(f"{ckpt_path.with_name(CARD_NAME)} not found: cannot tell which network {ckpt_path} holds.")
    state = load_checkpoint(ckpt_path)
    if isinstance(state.get("model"), dict):
        state = state["model"]
    network.load_state_dict(state)
    return network.to(device).eval()


def trained_hyper_space(ckpt_path: str | Path, config_space: HyperSpace, init: str = "network") -> HyperSpace:
    """The hyperparameter space of the model at ``ckpt_path`` (its card), else the config's; with
    ``init="identity"`` (no model is used) the config's, and no card is looked for.

    Raises:
        ValueError: the card is unreadable or its regularizer differs from the config's.
    """
    if init == "identity":
        return config_space
    card = ModelCard.next_to(ckpt_path)
    return config_space if card is None else card.check_hyper_space(config_space)


def check_checkpoint(ckpt_path: str | Path) -> Path:
    """Fail clearly, before any work, if the weights to load do not exist or are not loadable as weights.

    Raises:
        FileNotFoundError: no file at ``ckpt_path``.
        UnsafeCheckpointError: the file holds pickled objects besides weights (:func:`~.atomic.load_checkpoint`).
        ValueError: a ``model_best.pt`` of an earlier version (weights and saver state in one flat dict).
    """
    path = Path(ckpt_path)
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint {str(ckpt_path)!r} not found: train the bundle first (configs/train.json writes "
            "<ckpt_dir>/model.pt), download the released weights listed in large_files.yml, or pass --ckpt_path."
        )
    state = load_checkpoint(path)  # weights only: a file holding other pickled objects is refused, by name
    if isinstance(state, Mapping) and "checkpointer" in state and "model" not in state:
        raise ValueError(
            f"{path} is a best-model checkpoint in an earlier version's layout (the weights mixed with its saver's "
            f"state); pass --ckpt_path {path.with_name('model.pt')}, the model training exported from it."
        )
    return path


def check_run(
    ckpt_path: str | Path,
    network_name: str,
    network_kwargs: Mapping,
    spatial_size=None,
    pixdim=None,
    hu_window=LEGACY_HU_WINDOW,
    allow_preprocessing_mismatch: bool = False,
    hyper_space: HyperSpace | None = None,
    init: str = "network",
) -> ModelCard | None:
    """Check, before a run loads anything, that its checkpoint exists (:func:`check_checkpoint`) and that its
    network (``network_kwargs`` completed from ``hyper_space`` as :func:`network_kwargs_for` does) and
    preprocessing match the card beside ``ckpt_path`` (nothing to compare without one). Returns the card.
    With ``init="identity"`` (registration by instance optimisation alone) no model is used: nothing to check.

    Raises:
        FileNotFoundError: no checkpoint.
        ValueError: the network or the preprocessing differs (see :meth:`ModelCard.check_network`,
            :meth:`ModelCard.check_preprocessing`).
    """
    allow = parse_flag("allow_preprocessing_mismatch", allow_preprocessing_mismatch)
    if init not in ("network", "identity"):
        raise ValueError(f"init must be 'network' (start from the model's prediction) or 'identity', got {init!r}.")
    if init == "identity":
        return None
    check_checkpoint(ckpt_path)
    card = ModelCard.next_to(ckpt_path)
    if card is not None:
        card.check_network(network_name, network_kwargs_for(network_kwargs, hyper_space))
        card.check_preprocessing(spatial_size, pixdim, hu_window, allow_mismatch=allow)
    return card


def trained_preprocessing(ckpt_path: str | Path, name: str, default=None):
    """The preprocessing value ``name`` (``spatial_size``, ``pixdim`` or ``hu_window``) recorded in the card beside
    ``ckpt_path``, or ``default`` when there is no card: the default of inference and evaluation, so that the
    shipped model runs with its own preprocessing unless the user overrides it (which :func:`check_run` checks)."""
    if name not in PREPROCESSING:
        raise ValueError(f"unknown preprocessing id {name!r}; expected one of {list(PREPROCESSING)}.")
    path = Path(ckpt_path).with_name(CARD_NAME)
    if not path.is_file():
        return default
    return ModelCard.load(path).preprocessing[name]


def trained_setting(ckpt_path: str | Path, name: str, default=None):
    """The training setting ``name`` (e.g. ``fixed_lam``, ``similarity``) that the card beside ``ckpt_path``
    records in ``training``, or ``default`` when there is no card or the card does not record it (or records
    ``None``): so that test-time stages use what the model was trained with."""
    path = Path(ckpt_path).with_name(CARD_NAME)
    if not path.is_file():
        return default
    value = ModelCard.load(path).info.get("training", {}).get(name)
    return default if value is None else value


def network_grid(spatial_size, pixdim=None, ckpt_path: str | Path | None = None):
    """The network's input grid (:class:`~elastic_hypermorph_bundle.networks.grid.NetworkGrid`) of a run whose
    network preprocessing is ``spatial_size``/``pixdim`` (by default the card's, see :func:`trained_preprocessing`,
    and checked against it by :func:`check_run`); without ``pixdim``, the training images' own voxel size
    ``data_pixdim`` from the card beside ``ckpt_path``, if it records one."""
    data_pixdim = None
    path = None if ckpt_path is None else Path(ckpt_path).with_name(CARD_NAME)
    if pixdim is None and path is not None and path.is_file():
        data_pixdim = ModelCard.load(path).info.get("data_pixdim")
    return NetworkGrid(spatial_size, pixdim, data_pixdim=data_pixdim)

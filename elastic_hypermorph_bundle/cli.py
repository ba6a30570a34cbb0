"""The bundle's command line, ``python -m monai.bundle run ...``: strict override ids and one clean error line.

MONAI's ``run`` accepts any ``--<id> <value>`` and silently adds an id that no config defines, so a misspelled
override (``--lamda 0.1``) would run with the default. :func:`check_overrides`, the first item of every run list
of the configs (``run``, and ``compare`` of ``sweep.json``), refuses such ids and names the closest valid ones. It reads the ids from ``sys.argv`` (and
from ``--args_file``) only when the process is ``python -m monai.bundle run``; programmatic use
(``ConfigWorkflow`` or ``monai.bundle.run`` from Python) is left alone.

A failing config expression reaches the user wrapped in MONAI's ``RuntimeError: Failed to evaluate
ConfigExpression`` (once per level of references), and ignite's and MONAI's handlers log it again. Under the
command line, :func:`install_clean_errors` (run when the package is imported) makes the real cause the last
line printed, once: a one-line ``<Type>: <message>`` for the bundle's input and validation errors, the cause's own
traceback (without the wrapping chain) for anything else; the engines' exception logs keep their one-line message
but lose their traceback. ``ELASTIC_HYPERMORPH_DEBUG=1`` restores Python's full traceback and the logged ones.
"""

from __future__ import annotations

import ast
import difflib
import logging
import os
import sys
import traceback
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

# DEBUG_ENV (``1``: Python's full traceback and the handlers' exception logs) and the --help text live with what the
# command line shows
from .console import DEBUG_ENV, help_text

__all__ = [
    "DEBUG_ENV",
    "UnknownOverrideError",
    "InvalidOverrideError",
    "invalid_override",
    "bundle_run_argv",
    "parse_run_arguments",
    "config_ids",
    "unknown_overrides",
    "check_overrides",
    "real_cause",
    "install_clean_errors",
]


#: the arguments of ``monai.bundle run`` / ``create_workflow`` / ``ConfigWorkflow`` themselves (not config ids)
RUN_ARGUMENTS = frozenset(
    {
        "run_id", "init_id", "final_id", "meta_file", "config_file", "logging_file", "tracking", "args_file",
        "workflow_name", "workflow_type", "properties_path",
    }
)  # fmt: skip

#: exception types whose message is the whole story (input and validation errors): printed as one line
CLEAN_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
                PermissionError, FloatingPointError)  # fmt: skip


#: loggers (name prefixes) that log an engine's exception with its traceback before it is re-raised: MONAI
#: ``StatsHandler``'s own logger, or the engine's when it is given none
EXCEPTION_LOGGERS = ("monai.handlers.StatsHandler", "ignite.engine.")


class UnknownOverrideError(ValueError):
    """A command-line override names an id that none of the loaded config files defines."""


class InvalidOverrideError(ValueError):
    """A command-line override gives a value its id cannot take (a null, a non-integer count, text for a number,
    a boolean other than true/false), or an id the loaded model does not use."""


#: ids that count something: an override must be a whole number (``--instance_steps 2.5`` is refused, not cut to 2)
INTEGER_IDS = frozenset(
    {"seed", "epochs", "val_interval", "batch_size", "num_workers", "instance_levels", "hyper_rank"}
)
#: ids of the instance optimisation's per-level settings (steps, similarity stride): a whole number (every level) or a list of them (one per level, coarsest
#: first: ``--instance_steps "[50,50,20]"``); the list's length is checked against the levels where they are known
#: (:func:`~elastic_hypermorph_bundle.optimize.level_steps`)
LEVEL_STEP_IDS = frozenset({"instance_steps", "sweep_instance_steps", "instance_similarity_stride"})
#: the hyperparameter ids; a model uses those of its regularizer only (``HyperSpace.names``)
HYPER_IDS = ("lam", "mu", "alpha")


def bundle_run_argv(argv: Sequence[str] | None = None) -> list[str] | None:
    """The arguments after ``run`` when this process is ``python -m monai.bundle run ...`` (also under
    ``torchrun -m``), else None."""
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or argv[1] != "run":
        return None
    main = Path(argv[0])
    if main.name != "__main__.py" or main.parent.parts[-2:] != ("monai", "bundle"):
        return None
    return argv[2:]


def _value(text: str):
    """A command-line value as fire hands it over: a Python literal where it parses as one, else the string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_run_arguments(args: Sequence[str]) -> dict[str, object]:
    """``--key value`` / ``--key=value`` / ``--flag`` pairs of a ``monai.bundle run`` command line, as python-fire
    reads them (hyphens in a key become underscores; the first bare word is ``run_id``); arguments after a lone
    ``--`` are fire's own flags and are skipped."""
    parsed: dict[str, object] = {}
    index = 0
    while index < len(args):
        token = args[index]
        if token == "--":
            break
        if token.startswith("-") and not _is_number(token):
            key, has_value, text = token.lstrip("-").partition("=")
            key = key.replace("-", "_")
            if has_value:
                parsed[key] = _value(text)
            elif index + 1 < len(args) and not (args[index + 1].startswith("-") and not _is_number(args[index + 1])):
                parsed[key] = _value(args[index + 1])
                index += 1
            else:
                parsed[key] = True
        elif "run_id" not in parsed:
            parsed["run_id"] = token
        index += 1
    return parsed


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _normal_id(config_id: str) -> str:
    """One spelling of a nested id: MONAI accepts ``a#b`` and ``a::b``; a leading ``+`` (merge) is not part of it."""
    return str(config_id).lstrip("+").replace("::", "#")


def config_ids(config: Mapping | Sequence, prefix: str = "") -> dict[str, object]:
    """Every id of a config, nested ids joined by ``#`` (``train#dataloader#num_workers``, list items by index),
    mapped to its value."""
    ids: dict[str, object] = {}
    items = config.items() if isinstance(config, Mapping) else enumerate(config)
    for key, value in items:
        config_id = f"{prefix}{_normal_id(str(key))}"
        ids[config_id] = value
        if isinstance(value, (Mapping, list)):
            ids.update(config_ids(value, prefix=f"{config_id}#"))
    return ids


def unknown_overrides(overrides: Iterable[str], defined: Mapping[str, object]) -> dict[str, list[str]]:
    """The override ids of ``overrides`` that ``defined`` (see :func:`config_ids`) lacks, each with up to three
    close valid ids (``difflib``). A nested id is valid if it exists, or if its parent is a dict (a new keyword
    argument of a component, e.g. ``network_kwargs#encoder_features``)."""
    unknown = {}
    top_level = [config_id for config_id in defined if "#" not in config_id]
    for override in overrides:
        config_id = _normal_id(override)
        if config_id in defined or config_id.startswith("_meta_"):
            continue
        parent, _, _ = config_id.rpartition("#")
        if parent and isinstance(defined.get(parent), Mapping):
            continue
        candidates = top_level if "#" not in config_id else list(defined)
        unknown[override] = difflib.get_close_matches(config_id, candidates, n=3, cutoff=0.6)
    return unknown


def _config_files(value) -> list[str]:
    if isinstance(value, str):
        if not Path(value).is_file() and "," in value:
            return [v.strip() for v in value.split(",") if v.strip()]
        return [value]
    return [str(v) for v in value]


def _is_reference(value) -> bool:
    """A config expression (``$...``), reference (``@...``) or macro (``%...``): its value is known only later."""
    return isinstance(value, str) and value.startswith(("$", "@", "%"))


def invalid_override(config_id: str, value, default) -> str | None:
    """Why ``--<config_id> <value>`` cannot be used, judged by the id and the config's ``default`` for it; None
    if it can. MONAI's ``run`` drops a null override without a word (the default would run); integer ids
    (:data:`INTEGER_IDS`) take whole numbers, the steps' ids (:data:`LEVEL_STEP_IDS`) a whole number or a list of them; an id whose default is a number takes a number, one whose default
    is a boolean ``true``/``false``."""
    name = f"--{config_id}"
    if value is None:
        return (
            f"{name} None: monai.bundle run ignores a null override, so the config's value ({default!r}) would run; "
            "give a value (a null itself is written '$None')"
        )
    if _is_reference(value):
        return None
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if config_id in LEVEL_STEP_IDS:
        counts = value if isinstance(value, (list, tuple)) else [value]
        if not counts or not all(isinstance(c, (int, float)) and not isinstance(c, bool) and float(c).is_integer()
                                 for c in counts):
            return (f"{name} must be a whole number or a list of whole numbers (one per level, coarsest first, e.g. "
                    f"\"[50,50,20]\"), got {value!r}")
    elif config_id in INTEGER_IDS:
        if not (number and float(value).is_integer()):
            return f"{name} must be a whole number, got {value!r}"
    elif isinstance(default, bool):
        if not (isinstance(value, bool) or (isinstance(value, str) and value.strip().lower() in ("true", "false"))):
            return f"{name} must be true or false, got {value!r}"
    elif isinstance(default, (int, float)) and not number:
        return f"{name} must be a number, got {value!r}"
    return None


def check_overrides(argv: Sequence[str] | None = None, hyper_space=None) -> None:
    """Refuse ``--<id>`` overrides of a ``python -m monai.bundle run`` command line that no loaded config file
    defines (MONAI would silently add them), naming the closest valid ids; then values an id cannot take
    (:func:`invalid_override`), and, given the run's ``hyper_space`` (the model's), a hyperparameter id it does not
    use (``--alpha`` for an elastic model would change nothing). The ids come from ``argv`` (default
    ``sys.argv``) and from ``--args_file``; outside ``monai.bundle run`` this does nothing.

    Raises:
        UnknownOverrideError: an override id is not defined by the config files (or the ``--tracking`` settings).
        InvalidOverrideError: an override's value, or a hyperparameter id the model does not use.
    """
    args = bundle_run_argv(argv)
    if args is None:
        return
    from monai.bundle import ConfigParser
    from monai.bundle.utils import DEFAULT_EXP_MGMT_SETTINGS

    given = parse_run_arguments(args)
    if given.get("args_file"):
        given = {**ConfigParser.load_config_file(str(given["args_file"])), **given}
    if not given.get("config_file"):
        return
    defined = config_ids(ConfigParser.load_config_files(_config_files(given["config_file"])))
    if "help" in given:  # --help: the ids a user changes in these configs, then stop (console.USER_IDS)
        print(help_text({k: v for k, v in defined.items() if "#" not in k}, ", ".join(_config_files(given["config_file"]))))
        raise SystemExit(0)
    tracking = given.get("tracking")
    if isinstance(tracking, str) and tracking in DEFAULT_EXP_MGMT_SETTINGS:
        defined.update(config_ids(DEFAULT_EXP_MGMT_SETTINGS[tracking].get("configs", {})))
    elif tracking:
        defined.update(config_ids(ConfigParser.load_config_files(tracking).get("configs", {})))
    overrides = [key for key in given if key not in RUN_ARGUMENTS]
    unknown = unknown_overrides(overrides, defined)
    if unknown:
        described = "; ".join(
            f"--{key}" + (f" (did you mean {', '.join('--' + m for m in close)}?)" if close else "")
            for key, close in unknown.items()
        )
        raise UnknownOverrideError(
            f"unknown override id(s): {described}. No loaded config file "
            f"({', '.join(_config_files(given['config_file']))}) defines them, so they would be ignored; the ids "
            "a user changes are listed in README.md."
        )
    for key in overrides:
        reason = invalid_override(_normal_id(key), given[key], defined.get(_normal_id(key)))
        if reason:
            raise InvalidOverrideError(f"{reason}.")
    if hyper_space is not None:
        unused = [key for key in overrides if key in HYPER_IDS and key not in hyper_space.names]
        if unused:
            used = ", ".join(f"--{name}" for name in hyper_space.names)
            raise InvalidOverrideError(
                f"--{unused[0]} is not used by this model: its regularizer {hyper_space.regularizer!r} takes {used} "
                "(the value would change nothing); leave it out."
            )


#: how MONAI wraps an error raised while it evaluates a ``$`` expression or instantiates a ``_target_``
WRAPPER_MESSAGES = ("Failed to evaluate ConfigExpression", "Failed to instantiate component")


def real_cause(error: BaseException) -> BaseException:
    """The error a user needs: ``error`` unwrapped from MONAI's ``RuntimeError("Failed to evaluate
    ConfigExpression ...")`` / ``("Failed to instantiate component ...")`` layers (one per level of references).
    An error the bundle raised ``from`` another one (adding context, e.g. which config id to change) is kept."""
    seen = set()
    while (
        isinstance(error, RuntimeError)
        and str(error).startswith(WRAPPER_MESSAGES)
        and error.__cause__ is not None
        and id(error) not in seen
    ):
        seen.add(id(error))
        error = error.__cause__
    return error


def _clean_excepthook(kind, error, trace) -> None:
    if not isinstance(error, Exception):  # KeyboardInterrupt, SystemExit: Python's own handling
        sys.__excepthook__(kind, error, trace)
        return
    cause = real_cause(error)
    stream = sys.stderr
    stream.write(f"(the run failed; set {DEBUG_ENV}=1 for the full traceback)\n")
    from .atomic import NoSpaceError  # imported here: the package's import stays light

    if isinstance(cause, (*CLEAN_ERRORS, NoSpaceError)):
        message = str(cause.args[0]) if isinstance(cause, OSError) and len(cause.args) == 1 else str(cause)
        stream.write(f"{type(cause).__name__}: {message}\n")
    else:
        traceback.print_exception(type(cause), cause, cause.__traceback__, chain=False, file=stream)
    stream.flush()


def _without_engine_tracebacks(make_record):
    """A log-record factory that drops the traceback of the exception logs engines and their handlers write
    before re-raising (MONAI ``StatsHandler``'s "Exception: ...", on its own logger or the engine's): the process
    prints the cause once when it exits. (A factory, not a filter: a logger or handler made for these records
    later, as MONAI's ``get_logger`` does, stays as MONAI sets it up.)"""

    def factory(name, level, fn, lno, msg, args, exc_info, func=None, sinfo=None, **kwargs):
        if level >= logging.ERROR and exc_info and str(name).startswith(EXCEPTION_LOGGERS):
            exc_info = None
        return make_record(name, level, fn, lno, msg, args, exc_info, func, sinfo, **kwargs)

    return factory


_INSTALLED = False


def install_clean_errors(argv: Sequence[str] | None = None) -> bool:
    """Under ``python -m monai.bundle run`` (and unless ``ELASTIC_HYPERMORPH_DEBUG`` is set), print an uncaught
    error as its real cause, once (see the module docstring). Returns whether the hook is installed."""
    global _INSTALLED
    if _INSTALLED:
        return True
    if bundle_run_argv(argv) is None or os.environ.get(DEBUG_ENV, "").strip() not in ("", "0"):
        return False
    sys.excepthook = _clean_excepthook
    logging.setLogRecordFactory(_without_engine_tracebacks(logging.getLogRecordFactory()))
    _INSTALLED = True
    return True

"""Shared test setup: the measurement code under ``scripts/`` (``bench``) is importable, as ``scripts/benchmark.py``
makes it, without being part of the installed package; the one way tests write a trained model; the one way they
find the shared real chest CTs."""

import io
import subprocess
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))


import pytest  # noqa: E402
import torch  # noqa: E402


def _save_trained_model(
    folder: Path,
    network: torch.nn.Module,
    space,
    network_kwargs: dict,
    network_name: str = "HyperUNet",
    spatial_size=None,
    pixdim=None,
    hu_window=(-1000.0, 500.0),
    **info,
) -> Path:
    """``folder/model.pt`` (the state dict) and ``folder/model.json`` written through the bundle's
    :class:`~elastic_hypermorph_bundle.model_card.ModelCard`, as training writes them. Returns the ``model.pt``."""
    from elastic_hypermorph_bundle.model_card import ModelCard

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(network.state_dict(), folder / "model.pt")
    ModelCard(space, network_name, network_kwargs, spatial_size, pixdim, hu_window, **info).save(folder)
    return folder / "model.pt"


@pytest.fixture(scope="session")
def save_model():
    """The one way tests write a trained model (weights + model card): ``save_model(folder, network, space,
    network_kwargs, spatial_size=..., pixdim=..., hu_window=...) -> model.pt path``."""
    return _save_trained_model


#: the shared real chest CTs: ``../shared/data/real_ct`` next to the bundle root (CI); a git worktree may sit deeper,
#: so the nearest ancestor's ``shared/`` counts
REAL_CT_DIR = next((parent / "shared" / "data" / "real_ct" for parent in SCRIPTS.parent.parents
                    if (parent / "shared" / "data" / "real_ct").is_dir()),
                   SCRIPTS.parent.parent / "shared" / "data" / "real_ct")


@pytest.fixture(scope="session")
def real_ct():
    """``real_ct(name="chest_ct_cropped.nii.gz") -> Path`` of a shared real chest CT (never copied into the
    repository); the test that asks for one that is absent is skipped, naming it."""

    def path(name: str = "chest_ct_cropped.nii.gz") -> Path:
        found = REAL_CT_DIR / name
        if not found.is_file():
            pytest.skip(f"no real chest CT at {found}")
        return found

    return path


def _bundle_run_in_process(args) -> subprocess.CompletedProcess:
    """``python -m monai.bundle run *args`` for a run that is to fail, in this process (a fresh interpreter spends
    seconds importing MONAI): ``sys.argv`` is that command's (the bundle reads its overrides from it), python-fire
    parses the arguments as ``monai.bundle``'s ``__main__`` does, and an error is written to ``stderr`` by the hook
    the package installs for the command line; ``returncode`` 1 when the run raised, else 0. MONAI's logging file is
    not applied (it would re-route this process's logging). The command line as a process of its own (the hook
    installed at import, the exit status) is tested by test_reliability's subprocess runs."""
    import fire
    from monai.bundle import scripts

    from elastic_hypermorph_bundle import cli

    args = [str(a) for a in args]
    argv, stderr = sys.argv, io.StringIO()
    sys.argv = [scripts.__file__.replace("scripts.py", "__main__.py"), "run", *args]
    try:
        fire.Fire({"run": scripts.run}, command=["run", *args, "--logging_file", "False"])
    except Exception as error:  # noqa: BLE001 (printed as the command line prints it)
        real, sys.stderr = sys.stderr, stderr
        try:
            cli._clean_excepthook(type(error), error, error.__traceback__)
        finally:
            sys.stderr = real
        return subprocess.CompletedProcess(["monai.bundle", "run", *args], 1, "", stderr.getvalue())
    finally:
        sys.argv = argv
    return subprocess.CompletedProcess(["monai.bundle", "run", *args], 0, "", "")


@pytest.fixture(scope="session")
def bundle_run_in_process():
    """``bundle_run_in_process(args) -> CompletedProcess``: a refused ``python -m monai.bundle run`` in this process
    (:func:`_bundle_run_in_process`)."""
    return _bundle_run_in_process

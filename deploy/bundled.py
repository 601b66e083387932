"""The example `mlfe up` serves when it is given no config: the iris model, from the package.

A wheel carries the repository's examples/ inside the package, as deploy/examples/ (the mapping is
in pyproject.toml); a source checkout has them at the top, as examples/. Site-packages is not the
user's to write into, so the state (keys, admin token) and the model trained at first start go
under the user's data directory (XDG Base Directory: `$XDG_DATA_HOME/mlfe`, else
`~/.local/share/mlfe`). A few lines: not worth a dependency.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from deploy.config_file import load_config
from mlfe.config import MlfeConfig

QUICKSTART = "quickstart.yaml"
APP_NAME = "mlfe"
# What the bundled model's replicas import (the `examples` extra).
EXAMPLE_MODULES = ("sklearn", "joblib", "numpy")
EXAMPLES_EXTRA_HINT = "pip install 'mlfe[examples]'"


def examples_dir() -> Path:
    """Where the bundled examples are: in the installed package, else in the checkout."""
    here = Path(__file__).resolve().parent
    installed = here / "examples"
    if (installed / QUICKSTART).is_file():
        return installed
    return here.parent / "examples"


def user_data_dir() -> Path:
    """`$XDG_DATA_HOME/mlfe`, else `~/.local/share/mlfe` (a relative XDG_DATA_HOME is ignored,
    as the XDG spec says)."""
    base = os.environ.get("XDG_DATA_HOME", "")
    root = Path(base) if base and Path(base).is_absolute() else Path.home() / ".local" / "share"
    return root / APP_NAME


def missing_example_modules() -> list[str]:
    """The bundled model's imports that this environment lacks."""
    return [m for m in EXAMPLE_MODULES if importlib.util.find_spec(m) is None]


def bundled_config(data_dir: Path | None = None) -> tuple[MlfeConfig, Path]:
    """The bundled quickstart, its state and trained model under the user's data directory;
    and the path of its file (for the paths relative to it)."""
    path = examples_dir() / QUICKSTART
    cfg = load_config(path)
    data = data_dir or user_data_dir()
    data.mkdir(parents=True, exist_ok=True, mode=0o700)
    router = cfg.router.model_copy(update={"state_dir": data})
    services = {
        name: svc.model_copy(update={"model_dir": data / "models" / name})
        if svc.entry_script is not None else svc
        for name, svc in cfg.services.items()
    }
    return cfg.model_copy(update={"router": router, "services": services}), path

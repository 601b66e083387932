"""What every long-running mlfe command does first: logging, then the config, refused clearly."""

from __future__ import annotations

import sys
from pathlib import Path

from deploy import logs
from deploy.config import ConfigError, MlfeConfig, load_config


def load_for_serving(config_path: str | Path, log_level: str, prog: str = "mlfe"
                     ) -> MlfeConfig | None:
    """The validated config with logging set up as it asks, or None after printing why the
    config was refused (the caller exits 2)."""
    logs.configure(log_level)
    try:
        cfg = load_config(config_path)
    except ConfigError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return None
    logs.configure(log_level, cfg.router.log_format)
    return cfg

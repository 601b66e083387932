"""What every long-running mlfe command does first: logging, then the config, refused clearly."""

from __future__ import annotations

import gc
import sys
from pathlib import Path

from deploy import logs
from deploy.config_file import load_config
from mlfe.config import ConfigError, MlfeConfig


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


def settle_heap() -> None:
    """After start-up: what exists now lives as long as the process, so move it out of the
    cyclic collector's sight. Its full passes otherwise scan every module and config object
    and pause the scoring loop for tens of milliseconds (seen as p99 spikes under load)."""
    gc.collect()
    gc.freeze()

"""Loading mlfe's configuration from a YAML file (the schema is mlfe/config.py).

Input files named in a config are resolved relative to the config file here, at the edge, so the
schema stays pure.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from mlfe.config import ConfigError, MlfeConfig, parse_config


def load_config(path: str | Path) -> MlfeConfig:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{p}: cannot read config: {e.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from None
    return resolve_paths(parse_config(data, str(p)), p.resolve().parent)


def resolve_paths(cfg: MlfeConfig, base: Path) -> MlfeConfig:
    """Input files named in a config (entry scripts, model dirs, TLS files, JWKS files) are
    relative to the config file; the state and data dirs stay relative to where mlfe runs."""

    def rel(p: Path | None) -> Path | None:
        return None if p is None else base / p  # an absolute p stays as it is

    router = cfg.router
    if router.tls is not None:
        tls = router.tls.model_copy(update={"cert_file": rel(router.tls.cert_file),
                                            "key_file": rel(router.tls.key_file)})
        router = router.model_copy(update={"tls": tls})
    if any(i.jwks_file for i in router.token_issuers):
        issuers = [i.model_copy(update=_paths(jwks_file=rel(i.jwks_file)))
                   for i in router.token_issuers]
        router = router.model_copy(update={"token_issuers": issuers})
    services = {
        name: s.model_copy(update=_paths(entry_script=rel(s.entry_script),
                                         model_dir=rel(s.model_dir)))
        for name, s in cfg.services.items()
    }
    return cfg.model_copy(update={"router": router, "services": services})


def _paths(**values: Path | None) -> dict[str, Path]:
    # Only keys that have a value: a copy must not mark unset fields as set.
    return {k: v for k, v in values.items() if v is not None}

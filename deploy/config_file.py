"""Loading mlfe's configuration from a YAML file (the schema is mlfe/config.py).

Input files named in a config are resolved relative to the config file here, at the edge, so the
schema stays pure.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from mlfe.config import ConfigError, MlfeConfig, parse_config


def load_config(path: str | Path) -> MlfeConfig:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{p}: cannot read config: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not UTF-8 text (byte {e.start})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {yaml_problem(e)}") from None
    return resolve_paths(parse_config(data, str(p)), p.resolve().parent)


# PyYAML quotes a bit of the text in some problems (an alias, a tag); keep the short ones (a
# character) and YAML's own token names, drop the rest.
_QUOTED = re.compile(r"'([^']*)'")


def _unquote(text: str) -> str:
    return _QUOTED.sub(lambda m: m[0] if len(m[1]) <= 4 or re.fullmatch(r"<[a-z ]+>", m[1])
                       else "'…'", text)


def yaml_problem(e: yaml.YAMLError) -> str:
    """Where and what, never the text: PyYAML's own message quotes the offending line, and
    that line may be `primary_key: ...`."""
    if isinstance(e, yaml.MarkedYAMLError):
        parts = []
        for what, mark in ((e.context, e.context_mark), (e.problem, e.problem_mark)):
            if what is None:
                continue
            at = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
            parts.append(at + _unquote(what))
        return "; ".join(parts) or "cannot be parsed"
    if isinstance(e, yaml.reader.ReaderError):
        return f"character {e.position}: {e.reason} (not allowed in YAML)"
    return type(e).__name__


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

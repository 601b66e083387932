"""The synthetic replica's SPEC: what a model stand-in's `run()` does (schema only).

Its server is deploy/synthetic.py, whose docstring describes each key; this module is pure data and
validation so that the configuration schema (mlfe/config.py) can hold it without importing a
server.
"""

from __future__ import annotations

from statistics import NormalDist
from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from mlfe.redact import SHOWN, shown_token, shown_value

Ms = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Z99 = NormalDist().inv_cdf(0.99)  # p99 of a lognormal is exp(mu + Z99 * sigma)
MIN_RESPONSE_BYTES = len(b'{"result":""}')
LATENCY_FIELDS: dict[str, tuple[str, ...]] = {
    "fixed": ("ms",), "uniform": ("min_ms", "max_ms"), "lognormal": ("median_ms", "p99_ms"),
}


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LatencySpec(_Model):
    """How long one `run()` takes, in milliseconds."""

    distribution: Literal["fixed", "uniform", "lognormal"] = "fixed"
    ms: Ms | None = None  # fixed
    min_ms: Ms | None = None  # uniform
    max_ms: Ms | None = None
    median_ms: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None  # lognormal
    p99_ms: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None

    @model_validator(mode="before")
    @classmethod
    def _short_forms(cls, data: Any) -> Any:
        """`50` or `"50"` -> fixed; `"fixed:50"`, `"uniform:10:50"`, `"lognormal:50:200"`."""
        if isinstance(data, bool):
            raise ValueError("expected milliseconds or a distribution")
        if isinstance(data, int | float):
            return {"distribution": "fixed", "ms": data}
        if not isinstance(data, str):
            return data
        kind, *args = [p.strip() for p in data.split(":")]
        if not args and _is_number(kind):
            return {"distribution": "fixed", "ms": kind}
        names = LATENCY_FIELDS.get(kind)
        if names is None or len(args) != len(names):
            raise ValueError(
                "expected MS, fixed:MS, uniform:MIN_MS:MAX_MS or lognormal:MEDIAN_MS:P99_MS"
            )
        return {"distribution": kind, **dict(zip(names, args, strict=True))}

    @model_validator(mode="after")
    def _fields_of_distribution(self) -> LatencySpec:
        needs = LATENCY_FIELDS[self.distribution]
        given = {k for f in LATENCY_FIELDS.values() for k in f if getattr(self, k) is not None}
        if self.distribution == "fixed" and not given:
            return self  # 0 ms
        missing = [k for k in needs if k not in given]
        stray = sorted(given - set(needs))
        if missing or stray:
            raise ValueError(
                f"a {self.distribution} latency takes {' and '.join(needs)}"
                + (f" (missing {', '.join(missing)})" if missing else "")
                + (f" (not {', '.join(stray)})" if stray else "")
            )
        if self.distribution == "uniform":
            assert self.min_ms is not None and self.max_ms is not None
            if self.min_ms > self.max_ms:
                raise ValueError(f"min_ms ({self.min_ms:g}) is greater than max_ms "
                                 f"({self.max_ms:g})")
        if self.distribution == "lognormal":
            assert self.median_ms is not None and self.p99_ms is not None
            if self.p99_ms < self.median_ms:
                raise ValueError(f"p99_ms ({self.p99_ms:g}) is less than median_ms "
                                 f"({self.median_ms:g})")
        return self


class SyntheticSpec(_Model):
    """What a synthetic replica's `run()` does (see the module's docstring)."""

    latency: Annotated[LatencySpec, SHOWN] = Field(default_factory=LatencySpec)
    concurrency: Annotated[int, Field(gt=0)] | None = None
    error_rate: Annotated[float, Field(ge=0, le=1)] = 0.0
    error_status: Annotated[int, Field(ge=400, le=599)] = 500
    response_bytes: Annotated[int, Field(ge=MIN_RESPONSE_BYTES, le=100 * 1024 * 1024)] = 64
    init_ms: Ms = 0.0
    seed: int = 0

    @model_validator(mode="before")
    @classmethod
    def _from_text(cls, data: Any) -> Any:
        return parse_spec_text(data) if isinstance(data, str) else data

    def to_arg(self) -> str:
        """The SPEC as one command-line argument (compact JSON) for `--synthetic`."""
        return self.model_dump_json(exclude_defaults=True)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _scalar(text: str) -> Any:
    try:
        return orjson.loads(text)  # numbers, true/false, null, quoted strings
    except orjson.JSONDecodeError:
        return text


def parse_spec_text(text: str) -> dict[str, Any]:
    """A SPEC string as a mapping: JSON (an object), or `k=v,k=v` with dotted keys nesting."""
    text = text.strip()
    if text.startswith("{"):
        try:
            data = orjson.loads(text)
        except orjson.JSONDecodeError as e:
            raise ValueError(f"SPEC is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise ValueError("a JSON SPEC must be an object")
        return data
    out: dict[str, Any] = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            shown = shown_token(item) if item != text else None
            raise ValueError("expected KEY=VALUE pairs separated by commas"
                             + (f" (bad pair {shown})" if shown else ""))
        *parents, leaf = key.split(".")
        node = out
        for p in parents:
            child = node.setdefault(p, {})
            if not isinstance(child, dict):
                raise ValueError(f"{key!r}: {p!r} is already set to a value")
            node = child
        node[leaf] = _scalar(value.strip())
    return out


def format_errors(err: ValidationError, prefix: str = "") -> str:
    """One line per error: the key path, the message and the value given where it cannot be a
    secret (mlfe/redact.py)."""
    lines = []
    for e in err.errors(include_url=False):
        loc = ".".join(str(p) for p in (prefix, *e["loc"]) if p != "")
        shown = shown_value(SyntheticSpec, e["loc"], e.get("input"))
        lines.append(f"{loc or '<spec>'}: {e['msg'].removeprefix('Value error, ')}{shown}")
    return "\n  ".join(lines)


def parse_spec(text: str) -> SyntheticSpec:
    """`--synthetic SPEC` -> a validated spec; ValueError names each bad key and its value."""
    try:
        return SyntheticSpec.model_validate(text)
    except ValidationError as e:
        raise ValueError(f"invalid --synthetic SPEC:\n  {format_errors(e)}") from None

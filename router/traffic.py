"""Endpoint traffic split (azureml's AksEndpoint rules), as a pure function of a random draw.

Each non-default version takes its `traffic_percentile`; the default version takes whatever is
left (so a default at 20 % beside a 10 % version serves 90 %, as azureml documents).
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol


class _Version(Protocol):
    @property
    def traffic_percentile(self) -> float: ...


class Versions(Protocol):
    """What the split needs of an endpoint (mlfe.config.EndpointConfig has it); a protocol so
    that this decider depends on no configuration module."""

    @property
    def versions(self) -> Mapping[str, _Version]: ...

    @property
    def default_version(self) -> str: ...


@dataclass(frozen=True, slots=True)
class TrafficSplit:
    versions: tuple[str, ...]  # in draw order
    bounds: tuple[float, ...]  # cumulative upper bounds in [0, 100]

    def shares(self) -> Mapping[str, float]:
        """Effective percent of traffic per version."""
        out: dict[str, float] = {}
        low = 0.0
        for name, high in zip(self.versions, self.bounds, strict=True):
            out[name] = out.get(name, 0.0) + high - low
            low = high
        return out


def build_split(ep: Versions) -> TrafficSplit:
    default = ep.default_version
    versions: list[str] = []
    bounds: list[float] = []
    total = 0.0
    for name, v in ep.versions.items():
        if name == default or v.traffic_percentile <= 0:
            continue
        total += v.traffic_percentile
        versions.append(name)
        bounds.append(total)
    versions.append(default)
    bounds.append(100.0)
    return TrafficSplit(tuple(versions), tuple(bounds))


def pick_version(split: TrafficSplit, draw: float) -> str:
    """The version for a uniform `draw` in [0, 1)."""
    i = bisect_right(split.bounds, draw * 100.0)
    return split.versions[min(i, len(split.versions) - 1)]

"""mlfe's neutral core: what the router, the autoscaler and the deployment layer all build on.

The configuration schema (config), the router's counts as one typed interface (stats), time as a
seam (clock) and supervised background tasks (supervise). Nothing here imports router/,
autoscaler/ or deploy/ (docs/architecture.md).
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("mlfe")
except PackageNotFoundError:  # running from a checkout that was never installed
    __version__ = "0+unknown"

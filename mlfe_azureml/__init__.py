"""Azure ML's entry-script API for scripts served by `mlfe score-server`, without azmlinfsrv.

Entry scripts written for Azure ML import `rawhttp`, `AMLRequest` and `AMLResponse` from
`azureml.contrib.services.aml_request` / `.aml_response`. Microsoft's inference server
(azureml-inference-server-http) makes those names importable by registering its own modules under
them in `sys.modules`; `install()` does the same with this package's modules, so scripts run
unchanged. It replaces what azmlinfsrv's server would have registered, exactly as azmlinfsrv
replaces any `azureml.contrib.services` installed on disk; scripts that import
`azureml_inference_server_http.api.*` directly keep getting azmlinfsrv's real modules (mlfe
accepts its `@rawhttp` and its flask responses too).
"""

from __future__ import annotations

import sys

from mlfe_azureml import aml_request, aml_response

ALIASES = {
    "azureml.contrib.services.aml_request": aml_request,
    "azureml.contrib.services.aml_response": aml_response,
}


def install() -> None:
    """Make `from azureml.contrib.services.aml_request import rawhttp` (etc.) work here."""
    sys.modules.update(ALIASES)


__all__ = ["aml_request", "aml_response", "install"]

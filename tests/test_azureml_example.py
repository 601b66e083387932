"""examples/azureml: an entry script written as Azure ML's documentation writes them, served by
`mlfe up --config examples/azureml/config.yaml`, scored end to end through the router."""

from __future__ import annotations

import re
import shlex
import signal
import subprocess
from pathlib import Path

import numpy as np
import yaml

from tests.support import EXAMPLES, free_port, spawn

EXAMPLE = EXAMPLES / "azureml"


def test_example_serves_through_the_router(tmp_path: Path) -> None:
    cfg = yaml.safe_load((EXAMPLE / "config.yaml").read_text())
    port, admin_port = free_port(), free_port()
    cfg["router"].update(listen=f"127.0.0.1:{port}", admin_listen=f"127.0.0.1:{admin_port}",
                         state_dir=str(tmp_path / "state"))
    service = cfg["services"]["iris-azureml"]
    # The copy lives in tmp_path: its relative paths made absolute (they are relative to the file).
    service["entry_script"] = str(EXAMPLE / service["entry_script"])
    service["model_dir"] = str(EXAMPLE / service["model_dir"])
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    up = spawn(["up", "--config", str(path)], tmp_path / "up.log", port)
    try:
        up.wait_for(lambda: "replica on port" in up.log() and "is ready" in up.log(),
                    "replica ready", timeout=120)
        m = re.search(r"try: +(curl .*)", up.log())
        assert m is not None
        out = subprocess.run(shlex.split(m.group(1)), capture_output=True, timeout=30, check=True)
        # sample_input's two flowers; run() returns a plain list, as the documentation's does.
        assert yaml.safe_load(out.stdout) == ["setosa", "virginica"]
    finally:
        up.signal(signal.SIGINT)
        assert up.wait_exit(timeout=60) == 0


def test_committed_model_is_what_make_model_builds(tmp_path: Path) -> None:
    """model_dir/iris_model.npz is reproducible from scikit-learn's bundled iris data."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_model", EXAMPLE / "make_model.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.TARGET = tmp_path / "rebuilt.npz"
    module.main()
    committed, rebuilt = np.load(EXAMPLE / "model_dir" / "iris_model.npz"), np.load(module.TARGET)
    assert list(committed["classes"]) == list(rebuilt["classes"])
    # Solvers may differ in the last digits across scikit-learn versions.
    assert np.allclose(committed["coef"], rebuilt["coef"], atol=1e-2)
    assert np.allclose(committed["intercept"], rebuilt["intercept"], atol=1e-2)

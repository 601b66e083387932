"""`pip install mlfe`, then `mlfe up`, as a new user does it: no checkout, no config argument.

The sdist is built from a copy of the checkout with the project's build backend, the wheel from
that sdist (as pip does), and the wheel installed into a fresh virtualenv. Its dependencies come
from this project's virtualenv through a path file: no download, and no import of this checkout
(a path added by a .pth file is not itself scanned for .pth files, so the editable install of the
checkout is not seen). Everything runs from a temporary directory with its own HOME.
"""

from __future__ import annotations

import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import sysconfig
import tarfile
import venv
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.support import REPO, Proc, free_port

BUILD_TIMEOUT_S = 120
_SKIP = shutil.ignore_patterns(".git", ".venv*", "__pycache__", "*.egg-info", "build", "dist",
                               ".mlfe", ".*_cache")
# Local output that a checkout may hold and a release never does.
_LOCAL = {REPO / "examples" / "iris" / "model", REPO / "benchmarks" / "results"}


def skip(directory: str, names: list[str]) -> set[str]:
    return set(_SKIP(directory, names)) | {n for n in names if Path(directory) / n in _LOCAL}


@dataclass
class Installed:
    root: Path  # the temporary directory: home/, work/, the venv
    wheel: Path
    sdist: Path
    python: Path
    mlfe: Path

    def env(self, **extra: str) -> dict[str, str]:
        """A user's environment: their own HOME, nothing of this test run's Python setup."""
        return {"PATH": f"{self.python.parent}:/usr/bin:/bin", "HOME": str(self.root / "home"),
                "LANG": "C.UTF-8", **extra}


def build_backend(hook: str, out: Path, cwd: Path) -> Path:
    code = ("import sys, setuptools.build_meta as b; "
            f"print(b.{hook}(sys.argv[1]))")
    result = subprocess.run([sys.executable, "-c", code, str(out)], cwd=cwd, capture_output=True,
                            text=True, timeout=BUILD_TIMEOUT_S, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return out / result.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    root = tmp_path_factory.mktemp("install")
    src = root / "src"
    shutil.copytree(REPO, src, ignore=skip)
    dist = root / "dist"
    sdist = build_backend("build_sdist", dist, src)
    with tarfile.open(sdist) as tar:
        tar.extractall(root / "unpacked", filter="data")
    (unpacked,) = (root / "unpacked").iterdir()
    wheel = build_backend("build_wheel", dist, unpacked)

    env_dir = root / "venv"
    venv.EnvBuilder(with_pip=False, symlinks=True).create(env_dir)
    python = env_dir / "bin" / "python"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet",
         "--no-deps", "--no-index", "--disable-pip-version-check", str(wheel)],
        capture_output=True, text=True, timeout=BUILD_TIMEOUT_S, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    purelib = Path(subprocess.run([str(python), "-c", "import sysconfig; "
                                   "print(sysconfig.get_paths()['purelib'])"],
                                  capture_output=True, text=True, check=True).stdout.strip())
    (purelib / "zz_project_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    (root / "home").mkdir()
    (root / "work").mkdir()
    return Installed(root, wheel, sdist, python, env_dir / "bin" / "mlfe")


def test_the_wheel_and_sdist_carry_the_bundled_example_and_the_observability_files(
    installed: Installed,
) -> None:
    names = set(zipfile.ZipFile(installed.wheel).namelist())
    for needed in ("deploy/examples/quickstart.yaml", "deploy/examples/iris/score.py",
                   "deploy/examples/iris/train.py", "deploy/grafana/mlfe-router.json",
                   "deploy/kubernetes/deployment.yaml",
                   "deploy/kubernetes/monitoring/servicemonitor.yaml",
                   "deploy/kubernetes/monitoring/podmonitor.yaml", "deploy/bundled.py"):
        assert needed in names, needed
    assert not [n for n in names if n.startswith("tests/") or n.endswith(".joblib")]
    with tarfile.open(installed.sdist) as tar:
        members = {m.split("/", 1)[1] for m in tar.getnames() if "/" in m}
    assert {"examples/quickstart.yaml", "examples/iris/score.py",
            "deploy/grafana/mlfe-router.json", "README.md"} <= members


def test_the_installed_package_runs_from_the_wheel_not_the_checkout(installed: Installed) -> None:
    out = subprocess.run(
        [str(installed.python), "-c",
         "import deploy, mlfe, router; from deploy.bundled import examples_dir; "
         "print(deploy.__file__); print(router.__file__); print(examples_dir())"],
        cwd=installed.root / "work", env=installed.env(), capture_output=True, text=True,
        timeout=60, check=True).stdout.split()
    venv_dir = str(installed.root / "venv")
    assert all(path.startswith(venv_dir) for path in out), out
    assert not any(path.startswith(str(REPO)) for path in out)


@pytest.fixture
def up(installed: Installed) -> Iterator[tuple[Proc, Path]]:
    """`mlfe up` of the installed package, no config, on free ports, from an empty directory."""
    port, admin_port = free_port(), free_port()
    log = installed.root / f"up-{port}.log"
    data = installed.root / "home" / ".local" / "share" / "mlfe"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(installed.mlfe), "up", "--listen", f"127.0.0.1:{port}",
             "--admin-listen", f"127.0.0.1:{admin_port}"],
            cwd=installed.root / "work", env=installed.env(PYTHONUNBUFFERED="1"), stdout=out,
            stderr=subprocess.STDOUT)
    p = Proc(proc, log, port)
    try:
        yield p, data
    finally:
        p.signal(signal.SIGINT)
        try:
            p.wait_exit(timeout=60)
        finally:
            p.stop()


def test_pip_install_then_mlfe_up_serves_the_bundled_model(
    installed: Installed, up: tuple[Proc, Path]
) -> None:
    proc, data = up
    proc.wait_for(lambda: "replica on port" in proc.log() and "is ready" in proc.log(),
                  "the iris replica ready", timeout=120)
    m = re.search(r"try: +(curl .*)", proc.log())
    assert m is not None, proc.log()
    out = subprocess.run(shlex.split(m.group(1)), capture_output=True, timeout=30, check=True)
    assert yaml.safe_load(out.stdout) == {"result": ["setosa", "virginica"]}

    # The state and the trained model are the user's (XDG data dir), owner-only; nothing is
    # written where mlfe was started or inside site-packages.
    assert (data / "models" / "iris" / "model.joblib").is_file()
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    for name in ("admin-token", "keys.json"):
        assert stat.S_IMODE((data / name).stat().st_mode) == 0o600, name
    assert list((installed.root / "work").iterdir()) == []
    site = installed.root / "venv"
    assert not list(site.rglob("model.joblib")) and not list(site.rglob("admin-token"))

    proc.signal(signal.SIGINT)  # Ctrl-C
    assert proc.wait_exit(timeout=60) == 0


def test_mlfe_stats_finds_the_token_of_mlfe_up(installed: Installed, up: tuple[Proc, Path]
                                               ) -> None:
    """The admin commands look in the same data directory: no --token or --state-dir."""
    proc, _ = up
    proc.wait_for(lambda: "admin on" in proc.log(), "the admin API")
    admin = re.search(r"admin on (http://\S+)", proc.log())
    assert admin is not None
    out = subprocess.run([str(installed.mlfe), "stats", "--admin-url", admin.group(1)],
                         cwd=installed.root / "work", env=installed.env(), capture_output=True,
                         text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    assert "iris" in out.stdout


def test_xdg_data_home_is_where_the_state_goes(installed: Installed) -> None:
    data_home = installed.root / "xdg"
    out = subprocess.run(
        [str(installed.python), "-c",
         "from deploy.bundled import bundled_config, user_data_dir; "
         "cfg, path = bundled_config(); print(user_data_dir()); print(cfg.router.state_dir); "
         "print(cfg.services['iris'].model_dir); print(cfg.services['iris'].entry_script)"],
        cwd=installed.root / "work", env=installed.env(XDG_DATA_HOME=str(data_home)),
        capture_output=True, text=True, timeout=60, check=True).stdout.split()
    assert out[:3] == [str(data_home / "mlfe")] * 2 + [str(data_home / "mlfe" / "models" / "iris")]
    assert out[3].startswith(str(installed.root / "venv")) and out[3].endswith("iris/score.py")


def test_without_scikit_learn_mlfe_up_names_the_extra(installed: Installed) -> None:
    """`pip install mlfe` alone has no scikit-learn: `mlfe up` says what to install, exits 2,
    and starts nothing."""
    out = subprocess.run(
        [str(installed.python), "-c",
         "import sys; sys.modules['sklearn'] = None; from deploy.cli import main; "
         "sys.exit(main(['up']))"],
        cwd=installed.root / "work", env=installed.env(), capture_output=True, text=True,
        timeout=60, check=False)
    assert out.returncode == 2
    assert "pip install 'mlfe[examples]'" in out.stderr and "sklearn" in out.stderr
    assert "scoring on" not in out.stdout


def test_relative_xdg_data_home_is_ignored(monkeypatch: pytest.MonkeyPatch, tmp_path: Path
                                           ) -> None:
    from deploy.bundled import user_data_dir

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("XDG_DATA_HOME", "relative/dir")
    assert user_data_dir() == tmp_path / ".local" / "share" / "mlfe"
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "abs"))
    assert user_data_dir() == tmp_path / "abs" / "mlfe"
    monkeypatch.delenv("XDG_DATA_HOME")
    assert user_data_dir() == tmp_path / ".local" / "share" / "mlfe"

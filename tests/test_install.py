"""The project works as an installed package, not only from its source tree.

The development environment installs the repository editable, so every other test imports the
source tree and would miss a file that only exists there (a config read relative to the
repository, a module left out of the package list). Here the wheel is built from a copy of the
working tree, installed with `pip install --target` into a temporary directory, and used from
another directory with only that install on PYTHONPATH. Offline: no build isolation, no index.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]

# Build outputs, environments and caches: never part of a build, and setuptools would otherwise
# pick up a stale `*.egg-info` or `build/` left in a developer's tree.
_NOT_COPIED = shutil.ignore_patterns(
    ".git",
    ".venv",
    "venv",
    "runs",
    "build",
    "dist",
    "*.egg-info",
    "__pycache__",
    ".pytest_cache",
    ".ruff_cache",
    ".hypothesis",
    ".ipynb_checkpoints",
)


def _run(cmd: list[str], cwd: pathlib.Path, env: dict[str, str] | None = None):
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def _can_build_wheels() -> bool:
    """setuptools builds wheels by itself from 70.1 on; before that it needs `wheel`."""
    if importlib.util.find_spec("wheel") is not None:
        return True
    try:
        version = importlib.metadata.version("setuptools")
    except importlib.metadata.PackageNotFoundError:
        return False
    major_minor = tuple(int(part) for part in version.split(".")[:2] if part.isdigit())
    return major_minor >= (70, 1)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> pathlib.Path:
    """The site directory holding a non-editable install of the working tree."""
    if not _can_build_wheels():
        pytest.fail(
            "this environment cannot build a wheel without build isolation (it needs setuptools "
            ">= 70.1 or the wheel package): run `make install`, whose dev extra pins setuptools"
        )
    root = tmp_path_factory.mktemp("install")
    src, dist, site = root / "src", root / "dist", root / "site"
    # Build from a copy: setuptools writes build/ and *.egg-info beside the sources.
    shutil.copytree(REPO, src, ignore=_NOT_COPIED)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    offline = ["--no-deps", "--no-build-isolation", "--no-index"]
    built = _run([*pip, "wheel", *offline, "-w", str(dist), str(src)], cwd=root)
    assert built.returncode == 0, built.stdout + built.stderr
    wheels = sorted(dist.glob("onerec_jax-*.whl"))
    assert len(wheels) == 1, sorted(p.name for p in dist.iterdir())
    done = _run([*pip, "install", *offline, "--target", str(site), str(wheels[0])], cwd=root)
    assert done.returncode == 0, done.stdout + done.stderr
    return site


def _env(site: pathlib.Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(site)  # replaces, never extends: no source tree on the path
    env.pop("PYTHONSAFEPATH", None)
    env["JAX_PLATFORMS"] = "cpu"
    return env


def test_installed_package_is_imported_not_the_source_tree(installed, tmp_path):
    code = (
        "import json, onerec_jax, scaling; "
        "print(json.dumps([onerec_jax.__file__, scaling.__file__]))"
    )
    out = _run([sys.executable, "-c", code], cwd=tmp_path, env=_env(installed))
    assert out.returncode == 0, out.stderr
    for path in json.loads(out.stdout.strip().splitlines()[-1]):
        assert pathlib.Path(path).resolve().is_relative_to(installed.resolve()), path
        assert not pathlib.Path(path).resolve().is_relative_to(REPO), path


def test_plan_runs_from_an_installed_package_in_any_directory(installed, tmp_path):
    out = _run(
        [sys.executable, "-m", "onerec_jax.cli", "plan", "--rung", "v2-1b", "--json"],
        cwd=tmp_path,
        env=_env(installed),
    )
    assert out.returncode == 0, out.stdout + out.stderr
    row = json.loads(out.stdout)
    assert row["rung"] == "v2-1b"
    assert row["params_total"] > 0

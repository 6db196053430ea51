"""The installed package, not the checkout: build the wheel, check it holds every package and its data, install it
into a fresh virtual environment and run the CLI and a small job from a folder outside the checkout.

The fresh environment takes its dependencies from this test environment's site-packages (a .pth line, which adds the
folder without running the editable install's finder), so nothing is downloaded and only scopeforge itself comes
from the wheel."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT

pytestmark = [pytest.mark.slow]

PACKAGE_ROOTS = ("shared", "ray_jobs", "operators")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """Built from a copy of the sources (an in-tree build would leave build/ in the checkout)."""
    source, dist = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("dist")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    for root in PACKAGE_ROOTS:
        shutil.copytree(ROOT / root, source / root, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(dist), str(source)], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-3000:]
    (found,) = dist.glob("scopeforge-*.whl")
    return found


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """A fresh venv with the wheel installed non-editable; returns its bin folder."""
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    site = venv / "lib" / version / "site-packages"
    (site / "test-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install",
                              "-q", "--no-deps", "--no-index", str(wheel)], capture_output=True, text=True,
                             timeout=600)
    assert install.returncode == 0, install.stderr[-3000:]
    return venv / "bin"


def _packages_in_checkout() -> set[str]:
    return {".".join(p.parent.relative_to(ROOT).parts) for root in PACKAGE_ROOTS
            for p in (ROOT / root).rglob("__init__.py") if "__pycache__" not in p.parts}


def test_the_wheel_holds_every_package_and_the_package_data(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    in_wheel = {n.rsplit("/", 1)[0].replace("/", ".") for n in names if n.endswith("/__init__.py")}
    expected = _packages_in_checkout()
    assert {"shared.curation", "shared.distill", "shared.pruning", "ray_jobs.configs"} <= expected
    assert sorted(expected - in_wheel) == []
    for data in [*(f"ray_jobs/configs/{p.name}" for p in (ROOT / "ray_jobs" / "configs").glob("*.yaml")),
                 "shared/pruning/modeling_scopeforge_pruned.py"]:
        assert data in names, data
    assert not any(n.startswith(("tests/", "benchmarks/")) for n in names)


def _outside(bin_dir: Path, tmp_path: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    cwd = tmp_path / "elsewhere"
    cwd.mkdir(exist_ok=True)
    return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env)


@pytest.mark.ray
def test_the_installed_wheel_runs_a_job_from_outside_the_checkout(installed, tmp_path):
    where = _outside(installed, tmp_path, str(installed / "python"), "-c",
                     "import shared, ray_jobs, operators, shared.curation.sae, shared.distill.teacher; "
                     "print(shared.__file__)")
    assert where.returncode == 0, where.stderr[-2000:]
    assert Path(where.stdout.strip()).is_relative_to(installed.parent)
    assert ROOT not in Path(where.stdout).parents

    jobs = _outside(installed, tmp_path, str(installed / "scopeforge"), "jobs")
    assert jobs.returncode == 0, jobs.stderr[-2000:]
    from shared.configs import JOB_CONFIGS

    assert {line.split()[0] for line in jobs.stdout.splitlines()} == set(JOB_CONFIGS)

    crd = _outside(installed, tmp_path, str(installed / "scopeforge"), "render", "crd")
    assert crd.returncode == 0, crd.stderr[-2000:]
    assert yaml.safe_load(crd.stdout) == yaml.safe_load((ROOT / "manifests" / "crds" / "pipeline.yaml").read_text())

    _write_corpus(tmp_path / "elsewhere")
    run = _outside(installed, tmp_path, str(installed / "scopeforge"), "run", "curate", "--set", "model=tiny-llama",
                   "--set", "corpus=corpus.jsonl", "--set", "seeds=[an orbit around the moon]", "--set",
                   "output_root=out", "--set", "retrieval.m=3", "--set", "max_tokens=24", "--set",
                   "coordinates.k=8", "--set", "coordinates.reference_docs=2", "--set", "sae.train_docs=8",
                   "--set", "sae.steps=5", "--set", "sae.expansion=2", "--set", "sae.k=2",
                   "--set", "baselines=[random]")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    marker = json.loads((tmp_path / "elsewhere" / "out" / "curate" / "_SUCCESS").read_text())
    assert marker["job"] == "curate"
    assert marker["outputs"]["dataset"] == "subset"


def _write_corpus(folder: Path) -> None:
    folder.mkdir(exist_ok=True)
    words = "the orbit of the moon and the launch of a rocket into space with a crew of three".split()
    rows = [{"id": f"d{i}", "text": " ".join(words[i % 5:] + words[: i % 5])} for i in range(12)]
    (folder / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

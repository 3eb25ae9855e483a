"""The wheel installs and works outside the source tree: every module of the package (strategies
included), the built-in workloads, `schedsearch workloads` and a tune.

Before: `packages = ["schedsearch"]` shipped 21 modules and no schedsearch/strategies/ (tune failed on
import), and `schedsearch workloads` globbed ../workloads beside the package: nothing from a wheel."""
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import ROOT


def _run(cmd, cwd, env, timeout=300):
    out = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{cmd}: rc {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    src = out / "src"  # a copy: setuptools writes build/ and *.egg-info into the tree it builds
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        if (ROOT / name).is_file():
            shutil.copy(ROOT / name, src / name)
    for name in ("schedsearch", "workloads"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    # --no-build-isolation: setuptools from this environment, nothing downloaded.
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", out, src],
         cwd=out, env={**os.environ, "PIP_NO_INDEX": "1"})
    (path,) = out.glob("schedsearch-*.whl")
    return path


def test_wheel_holds_every_module_and_the_workloads(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    sources = {p.relative_to(ROOT).as_posix() for p in (ROOT / "schedsearch").rglob("*.py")
               if "__pycache__" not in p.parts}
    assert "schedsearch/strategies/llm.py" in sources
    assert sources <= names, sorted(sources - names)
    workloads = {"schedsearch/" + p.relative_to(ROOT).as_posix() for p in (ROOT / "workloads").glob("level*/*.py")}
    assert "schedsearch/workloads/level1/softmax.py" in workloads
    assert workloads <= names, sorted(workloads - names)


@pytest.mark.slow
def test_wheel_installs_and_tunes_outside_the_source_tree(wheel, tmp_path):
    venv = tmp_path / "venv"
    # The system site-packages lend TVM, torch and the rest; the wheel's schedsearch comes first.
    _run([sys.executable, "-m", "venv", "--system-site-packages", venv], cwd=tmp_path, env=os.environ)
    python, exe = venv / "bin/python", venv / "bin/schedsearch"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PIP_NO_INDEX"] = "1"
    _run([python, "-m", "pip", "install", "--no-deps", "-q", wheel], cwd=tmp_path, env=env)
    work = tmp_path / "elsewhere"
    work.mkdir()
    where = _run([python, "-c", "import schedsearch, schedsearch.strategies.llm as m; print(m.__file__)"], work, env)
    assert where.strip().startswith(str(venv)), where  # the wheel's copy, not the source tree's

    listing = _run([exe, "workloads"], work, env)
    assert "schedsearch/workloads/level1/softmax.py" in listing and "Softmax over dim 1" in listing, listing
    assert len(listing.strip().splitlines()) == len(list((ROOT / "workloads").glob("level*/*.py")))

    # The README's spelling of a built-in workload works here too, where no workloads/ folder is.
    _run([exe, "tune", "workloads/level1/softmax.py", "--size", "small", "--trials", "2", "--target", "llvm",
          "--validation-seeds", "1", "--repeats", "2", "-o", work / "run"], work, env, timeout=900)
    assert (work / "run/results.json").is_file() and (work / "run/module.so").is_file()

"""The package as a user installs it: `pip install .` (not editable) ships the Hydra configs, and
`python -m t2i_rl.train` runs from any directory."""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest
from setuptools import find_packages

import t2i_rl
from tests.agents.test_train import tiny_overrides

ROOT = Path(__file__).resolve().parent.parent


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_the_package_list_holds_every_package_of_the_tree():
    """pyproject lists the packages by hand (configs/ is mapped in as t2i_rl.conf); a new package
    must be added there, or a wheel would leave it out."""
    listed = set(pyproject()["tool"]["setuptools"]["packages"])
    found = set(find_packages(str(ROOT), include=["t2i_rl*", "agents*", "envs*"]))
    assert listed == found | {"t2i_rl.conf"}
    assert pyproject()["tool"]["setuptools"]["package-dir"] == {"t2i_rl.conf": "configs"}


def test_a_source_checkout_reads_the_configs_folder():
    assert t2i_rl.CONFIG_DIR == ROOT / "configs" and (t2i_rl.CONFIG_DIR / "config.yaml").is_file()


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The python of a fresh venv into which the wheel of this tree is installed, not editable. The
    venv borrows this venv's packages for the dependencies (a .pth line: their folder is read, its
    .pth files, and so this checkout's editable hook, are not), so that nothing is downloaded."""
    root = tmp_path_factory.mktemp("wheel")
    # built from a copy: setuptools writes build/ into the tree it builds, and would reuse a stale one
    source = shutil.copytree(ROOT, root / "source", ignore=shutil.ignore_patterns(
        ".*", "build", "runs", "docs", "__pycache__", "*.egg-info"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(root / "dist"), str(source)], check=True, capture_output=True)
    (wheel,) = (root / "dist").glob("t2i_rl-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
    yaml = {str(p.relative_to(ROOT / "configs")) for p in (ROOT / "configs").rglob("*.yaml")}
    assert {f"t2i_rl/conf/{p}" for p in yaml} <= names, "the wheel lacks configs"
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    (site / "borrowed.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([python, "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)], check=True,
                   capture_output=True)
    return python


def test_an_installed_wheel_trains_from_another_directory(installed, tiny_assets, tmp_path):
    overrides, reward = tiny_overrides(tiny_assets, tmp_path / "run")
    reward_override = f"env.reward={{name:textnorm,base:{{name:clip,path:'{reward['base']['path']}'}},tau:0.05}}"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([installed, "-m", "t2i_rl.train", *overrides, reward_override, "samples.every=0"],
                          cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    where = subprocess.run([installed, "-c", "import t2i_rl; print(t2i_rl.CONFIG_DIR)"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, check=True).stdout.strip()
    site = subprocess.run([installed, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    assert Path(where) == Path(site) / "t2i_rl" / "conf"
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [0, 1]

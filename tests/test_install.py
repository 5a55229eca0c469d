"""plwlab installed from a wheel (``pip install .``, not editable) finds its configs and assets through the package:
the commands run from a directory outside the checkout."""

import json
import os
import shutil
import subprocess
import sys
import zipfile

from conftest import ROOT


def test_a_wheel_install_runs_outside_the_checkout(tmp_path):
    source = tmp_path / "source"  # a copy: building in the checkout would leave build/ behind
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", str(source),
                    "-w", str(wheels)], check=True, capture_output=True)  # fmt: skip
    (wheel,) = wheels.glob("plwlab-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"plwlab/conf/train.yaml", "plwlab/conf/evaluate.yaml", "plwlab/conf/hydra/launcher/torchrun.yaml",
            "plwlab/assets/alpaca_sample.json", "plwlab/analysis/r/fit.R",
            "hydra_plugins/plwlab_launcher/launchers.py"} <= names  # fmt: skip

    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True)  # fmt: skip
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, *args], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)

    where = run("-c", "import plwlab; print(plwlab.__file__)")
    assert where.stdout.startswith(str(site)), where.stdout + where.stderr  # the wheel's copy, not the checkout
    trained = run("-m", "plwlab.training.main", "trainer.max_steps=2", "data.limit=40", "data.val_size=8",
                  "callbacks.progress=null", "paths.output_dir=out", "hydra.run.dir=out/run")  # fmt: skip
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert json.loads((elsewhere / "out" / "run" / "metrics.json").read_text())["global_steps"] == 2
    stats = run("-m", "plwlab.cli", "stats", "data.limit=20", "--out", "stats.csv")
    assert stats.returncode == 0 and (elsewhere / "stats.csv").exists(), stats.stderr[-3000:]
    assert not (elsewhere / "conf").exists() and not list(elsewhere.glob("*.py"))  # nothing from the checkout

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


def readme_commands(prefix: str) -> list[str]:
    """The README's bash-block lines starting with ``prefix``, continuation lines joined, comments dropped."""
    text = (ROOT / "README.md").read_text()
    blocks = [b.split("```", 1)[0] for b in text.split("```bash\n")[1:]]
    joined = "\n".join(blocks).replace("\\\n", " ")
    return [line.split("  #", 1)[0].strip() for line in joined.splitlines() if line.startswith(prefix)]


def test_the_readme_data_commands_run_offline_as_written(tmp_path):
    """Every `plwlab stats / build-data / recommend` line of README.md, run as typed from the checkout (its
    ../shared/data copies; skipped where they are absent) with outputs in a temporary PLWLAB_OUTPUT_DIR."""
    import shlex

    import pytest
    from conftest import SHARED_DATA

    if not (SHARED_DATA / "tokenizer" / "llama_tokenizer.model").exists():
        pytest.skip("../shared/data is absent")
    commands = [c for c in readme_commands("plwlab ") if c.split()[1] in ("stats", "build-data", "recommend")]
    assert len(commands) >= 5 and any("model=llama2" in c for c in commands)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PLWLAB_OUTPUT_DIR": str(tmp_path)}
    plwlab = str(ROOT / ".venv" / "bin" / "plwlab") if (ROOT / ".venv" / "bin" / "plwlab").exists() else "plwlab"
    for command in commands:
        done = subprocess.run([plwlab, *shlex.split(command)[1:]], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=300)  # fmt: skip
        assert done.returncode == 0, f"{command}\n{done.stderr[-2000:]}"
    assert (tmp_path / "data_stats.csv").exists() and list((tmp_path / "data").glob("rg_target-1-*.manifest.json"))  # Medium

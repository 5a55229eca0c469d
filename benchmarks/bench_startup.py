"""Startup of a sweep point with a warm tokenized-data cache, against a bare process that imports torch and
transformers and builds the same model and tokenizer (the tiny default model, CPU):

- in a sweep (``python train.py -m plw=...``, Hydra's basic launcher: every point in one process, imports paid
  once): from the end of one point to the first training step of the next;
- as a fresh process (what the torchrun and SLURM launchers start per point): from launch to the first step.

``--repeats`` alternating rounds, medians.

    python benchmarks/bench_startup.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BARE = """
import os, time
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from omegaconf import OmegaConf
preset = OmegaConf.load("conf/model/tiny.yaml")
tokenizer = AutoTokenizer.from_pretrained("src/plwlab/assets/tiny_tokenizer")
config = AutoConfig.for_model(**OmegaConf.to_container(preset.config))
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(config)
print(time.time() - float(os.environ["T0"]))
"""


# Written beside the run and named as a callback: prints the seconds since $T0 at the first training batch, then
# ends the process (nothing after startup is measured).
CALLBACK = """import os, time
import lightning as L


class FirstStep(L.Callback):
    def on_train_batch_start(self, trainer, *args, **kwargs):
        print(f"FIRST_STEP {time.time() - float(os.environ['T0'])}", flush=True)
        if os.environ.get("BENCH_IN_SWEEP"):
            trainer.should_stop = True  # end this point; the sweep goes on to the next
        else:
            os._exit(0)


class JobEnd:  # a Hydra callback
    def on_job_end(self, config, job_return, **kwargs):
        print(f"JOB_END {time.time() - float(os.environ['T0'])}", flush=True)
"""
SWEEP_PLWS = "0,0.01,0.1,0.5,1"


def in_sweep(command: list[str], env: dict[str, str]) -> list[float]:
    """Seconds from each point's predecessor's end to its first step, for points 2..N of one sweep."""
    env = {**env, "T0": repr(time.time()), "BENCH_IN_SWEEP": "1"}
    out = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=True).stdout
    events = [(line.split()[0], float(line.split()[1])) for line in out.splitlines() if line.startswith(("FIRST_STEP ", "JOB_END "))]
    ends = [t for kind, t in events if kind == "JOB_END"]
    firsts = [t for kind, t in events if kind == "FIRST_STEP"]
    return [first - end for end, first in zip(ends, firsts[1:])]


def timed(command: list[str], env: dict[str, str]) -> float:
    env = {**env, "T0": repr(time.time())}
    out = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=True).stdout
    lines = [line for line in out.splitlines() if line.startswith("FIRST_STEP ")] or out.strip().splitlines()[-1:]
    return float(lines[-1].split()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    with tempfile.TemporaryDirectory() as tmp:
        train = [sys.executable, "train.py", f"paths.output_dir={tmp}", "hydra.run.dir=" + tmp + "/run",
                 "+callbacks.first_step._target_=bench_startup_callback.FirstStep", "resume=false",
                 "callbacks.progress=null"]  # fmt: skip
        (Path(tmp) / "bench_startup_callback.py").write_text(CALLBACK)
        env["PYTHONPATH"] = tmp
        timed(train, env)  # the sweep's first run: fills the tokenized-data cache
        sweep = [sys.executable, "train.py", "-m", f"plw={SWEEP_PLWS}", f"paths.output_dir={tmp}/sweep", "resume=false",
                 "+callbacks.first_step._target_=bench_startup_callback.FirstStep", "callbacks.progress=null",
                 "+hydra.callbacks.job_end._target_=bench_startup_callback.JobEnd"]  # fmt: skip
        times: dict[str, list[float]] = {"bare": [], "fresh": [], "sweep": []}
        for _ in range(args.repeats):
            times["bare"].append(timed([sys.executable, "-c", BARE], env))
            times["fresh"].append(timed(train, env))
            times["sweep"] += in_sweep(sweep, env)
    med = {k: statistics.median(v) for k, v in times.items()}
    for key, label in (("bare", "bare import + model build"), ("sweep", "plwlab sweep point, in -m"),
                       ("fresh", "plwlab fresh process")):  # fmt: skip
        print(f"{label:28s}: median {med[key]:.2f} s   runs: {', '.join(f'{t:.2f}' for t in times[key])}")
    print(f"RATIO plwlab warm-cache sweep point (in -m) / bare import + build: {med['sweep'] / med['bare']:.2f} (goal <= 1.2)")
    print(f"RATIO plwlab fresh process to first step / bare import + build: {med['fresh'] / med['bare']:.2f}")


if __name__ == "__main__":
    main()

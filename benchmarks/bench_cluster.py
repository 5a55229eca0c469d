"""Host memory and checkpoint blocking of a sharded run, this checkout against an earlier commit, on CPU.

A ~320M-parameter LLaMA (random weights, saved to disk as a pretrained model, fp32: 1.3 GB) is fine-tuned by
train.py on 2 FSDP ranks (gloo) for 3 optimizer steps with a checkpoint after each: 3.9 GB of fp32 weights and
AdamW state per save (half per rank). For each contender (its own process tree, rounds alternated A B A B) it reports

- the peak resident host memory (VmHWM) of each rank, read from /proc, while the model is loaded and sharded (a run
  that stops before the first step: on GPU that is what the host holds; on CPU the training state would mask it);
- ``checkpoint/save_seconds``: how long training was blocked by each save (metrics.csv), in a run with them; the
  first save of a run apart (an asynchronous save allocates its host staging memory then).

    python benchmarks/bench_cluster.py                    # this checkout vs --before (default: the layout commit)
    python benchmarks/bench_cluster.py --before 50899ae --rounds 2

The earlier commit is checked out with ``git worktree`` into a temporary folder and run with its own ``src`` first
on PYTHONPATH (the same venv).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def make_model(folder: Path) -> None:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from plwlab import ASSETS

    tokenizer = AutoTokenizer.from_pretrained(ASSETS / "tiny_tokenizer")
    config = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=20,
                         num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=512,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    model = LlamaForCausalLM(config)
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters", flush=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def descendants(pid: int) -> set[int]:
    out, todo = set(), [pid]
    while todo:
        p = todo.pop()
        try:
            children = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            continue
        for c in map(int, children):
            out.add(c)
            todo.append(c)
    return out


def peak_rss(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1e6  # kB -> GB
    except OSError:
        return None
    return None


def run(tree: Path, model: Path, out: Path, checkpoints: bool) -> dict:
    """One 2-rank run: with checkpoints (the save blocking), or without (the host memory of loading and training)."""
    # without checkpoints: no training step either (limit_train_batches=0): the ranks' memory of loading and sharding,
    # which on GPU is all the host holds (on CPU the training state, 8 B per parameter per rank here, would mask it)
    saving = (["callbacks.checkpoint.every_n_steps=1", "callbacks.checkpoint.keep=true"] if checkpoints else
              ["callbacks.checkpoint=null", "+trainer.limit_train_batches=0", "+trainer.limit_val_batches=0",
               "callbacks.hf_export=null", "callbacks.loss_rsd=null"])  # fmt: skip
    args = [sys.executable, str(tree / "train.py"), "strategy=fsdp", "trainer.devices=2", "data.batch_size=1",
            "data.max_length=64", "data.limit=24", "data.val_size=2", "trainer.max_steps=3", "global_batch_size=2",
            "callbacks.progress=null", "callbacks.param_distance=null", *saving, "model.config=null",
            f"model.name_or_path={model}", f"model.tokenizer={model}", f"hydra.run.dir={out}"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(tree / "src"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peaks: dict[int, float] = {}
    while proc.poll() is None:
        for pid in {proc.pid} | descendants(proc.pid):
            rss = peak_rss(pid)
            if rss is not None:
                peaks[pid] = max(peaks.get(pid, 0.0), rss)
        time.sleep(0.2)
    if proc.returncode != 0:
        raise SystemExit(f"{tree}: train.py failed: {proc.stderr.read()[-2000:]}")
    ranks = sorted((v for v in peaks.values() if v > 0.5), reverse=True)[:2]  # the two ranks (torch imported)
    saves = []
    if checkpoints:
        with (out / "metrics.csv").open() as f:
            saves = [float(r["checkpoint/save_seconds"]) for r in csv.DictReader(f) if r.get("checkpoint/save_seconds")]
    return {"rank_peak_rss_gb": ranks, "save_blocking_s": saves}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", default="50899ae", help="the earlier commit")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_model(tmp / "model")
        before = tmp / "before"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(before), args.before], check=True,
                       capture_output=True)  # fmt: skip
        try:
            results: dict[str, list[dict]] = {"before": [], "after": []}
            for r in range(args.rounds):
                for name, tree in (("before", before), ("after", ROOT)):
                    memory = run(tree, tmp / "model", tmp / f"{name}-{r}-m", checkpoints=False)
                    saving = run(tree, tmp / "model", tmp / f"{name}-{r}-s", checkpoints=True)
                    results[name].append({"rank_peak_rss_gb": memory["rank_peak_rss_gb"],
                                          "save_blocking_s": saving["save_blocking_s"]})  # fmt: skip
                    print(name, r, json.dumps(results[name][-1]), flush=True)
                    subprocess.run(["rm", "-rf", str(tmp / f"{name}-{r}-m"), str(tmp / f"{name}-{r}-s")])
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(before)], capture_output=True)
    for name, rows in results.items():
        ranks = [max(r["rank_peak_rss_gb"]) for r in rows], [min(r["rank_peak_rss_gb"]) for r in rows]
        first = [r["save_blocking_s"][0] for r in rows]
        later = [s for r in rows for s in r["save_blocking_s"][1:]]
        print(f"{name}: peak host RSS rank 0 {statistics.median(ranks[0]):.2f} GB, other rank "
              f"{statistics.median(ranks[1]):.2f} GB, both {statistics.median(a + b for a, b in zip(*ranks)):.2f} GB; "
              f"save blocking: first {statistics.median(first):.2f} s, later median {statistics.median(later):.2f} s "
              f"(min {min(later):.2f}, max {max(later):.2f})")  # fmt: skip
    b, a = results["before"], results["after"]

    def other(rows: list[dict]) -> float:
        return statistics.median(min(r["rank_peak_rss_gb"]) for r in rows)

    def later(rows: list[dict]) -> float:
        return statistics.median(s for r in rows for s in r["save_blocking_s"][1:])

    print(f"RATIO other-rank peak RSS after/before: {other(a) / other(b):.2f}")
    print(f"RATIO later-save blocking after/before: {later(a) / later(b):.2f}")

if __name__ == "__main__":
    main()

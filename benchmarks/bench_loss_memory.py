"""Peak extra memory of the weighted loss (forward + backward) at vocab 32000, 512 tokens, batch 8 on CPU:
naive (full fp32 logits) vs chunked (plwlab.loss.chunked_next_token_nll). Each variant runs in a fresh process
and reports its peak RSS above the RSS once inputs exist (glibc told to serve blocks >= 1 MiB by mmap, so the
RSS follows live memory); values must agree to 1e-5.

    python benchmarks/bench_loss_memory.py [--hidden 512] [--chunk 512]
"""

import argparse
import json
import os
import resource
import subprocess
import sys

import torch

from plwlab.loss import chunked_next_token_nll, next_token_nll, prompt_weighted_loss

B, L, V = 8, 512, 32000


def child(variant: str, hidden_size: int, chunk: int) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    hidden = torch.randn(B, L, hidden_size, requires_grad=True)
    head = (torch.randn(V, hidden_size) * hidden_size**-0.5).requires_grad_()
    ids = torch.randint(0, V, (B, L))
    completion = (torch.arange(L) > L // 3).long().expand(B, L)
    mask = torch.ones(B, L, dtype=torch.long)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if variant == "naive":
        nll = next_token_nll(hidden @ head.T, ids)
    else:
        nll = chunked_next_token_nll(hidden, head, ids, chunk)
    loss = prompt_weighted_loss(nll, completion, mask, 0.1).loss
    loss.backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"extra_mb": (peak - before) / 1024, "loss": loss.item(), "grad_norm": head.grad.norm().item()}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--child", choices=["naive", "chunked"])
    args = parser.parse_args()
    if args.child:
        child(args.child, args.hidden, args.chunk)
        return
    out = {}
    for variant in ("naive", "chunked"):
        cmd = [sys.executable, __file__, "--child", variant, "--hidden", str(args.hidden), "--chunk", str(args.chunk)]
        # large blocks via mmap, so freed memory leaves the RSS at once and peak RSS tracks live memory
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "1048576"}
        out[variant] = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout)
    n, c = out["naive"], out["chunked"]
    print(f"B={B} L={L} V={V} H={args.hidden} chunk={args.chunk} tokens")
    print(f"naive   : peak extra {n['extra_mb']:7.1f} MB  loss {n['loss']:.6f}")
    print(f"chunked : peak extra {c['extra_mb']:7.1f} MB  loss {c['loss']:.6f}")
    print(f"same loss to 1e-5: {abs(n['loss'] - c['loss']) <= 1e-5 * abs(n['loss'])}; same grad norm: "
          f"{abs(n['grad_norm'] - c['grad_norm']) <= 1e-4 * n['grad_norm']}")  # fmt: skip
    print(f"RATIO chunked/naive peak extra memory: {c['extra_mb'] / n['extra_mb']:.3f}")


if __name__ == "__main__":
    main()

"""Peak extra memory of the weighted loss (forward + backward) at vocab 32000, 512 tokens, batch 8 on CPU.

1. Head + loss: naive (full fp32 logits, then plwlab.training.loss.next_token_nll) vs chunked
   (plwlab.training.loss.chunked_next_token_nll).
2. The loss alone, given the logits (fp32 and bf16): plwlab's next_token_nll vs F.cross_entropy on the upcast
   logits (the usual path), as a multiple of the logits tensor itself. Backward must return a logits-sized
   gradient, so 1.0x is the floor; goal <= 1.05x.

Each variant runs in a fresh process and reports its peak RSS above the RSS once inputs exist (glibc told to serve
blocks >= 1 MiB by mmap, so the RSS follows live memory); values must agree to 1e-5.

    python benchmarks/bench_loss_memory.py [--hidden 512] [--chunk 512]
"""

import argparse
import json
import os
import resource
import subprocess
import sys

import torch
import torch.nn.functional as F

from plwlab.training.loss import chunked_next_token_nll, next_token_nll, prompt_weighted_loss

B, L, V = 8, 512, 32000
LOSS_ONLY = ["plwlab-float32", "cross_entropy-float32", "plwlab-bfloat16", "cross_entropy-bfloat16"]


def cross_entropy_nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The usual path: upcast, then F.cross_entropy on shifted targets."""
    targets = F.pad(ids[:, 1:], (0, 1), value=-100)
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none").view_as(targets)[:, :-1]


def loss_only(variant: str) -> None:
    """Peak extra memory of NLL + weighted loss + backward on given logits, as a multiple of their size."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    impl, dtype = variant.split("-")
    logits = torch.randn(B, L, V, dtype=getattr(torch, dtype)).requires_grad_()
    ids = torch.randint(0, V, (B, L))
    completion = (torch.arange(L) > L // 3).long().expand(B, L)
    mask = torch.ones(B, L, dtype=torch.long)
    fn = next_token_nll if impl == "plwlab" else cross_entropy_nll
    small = torch.randn(2, 8, 64, dtype=logits.dtype, requires_grad=True)  # warm-up: code pages, autograd threads
    prompt_weighted_loss(fn(small, ids[:2, :8] % 64), completion[:2, :8], mask[:2, :8], 0.1).loss.backward()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    nll = fn(logits, ids)
    loss = prompt_weighted_loss(nll, completion, mask, 0.1).loss
    loss.backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    size = logits.numel() * logits.element_size() / 2**20
    print(json.dumps({"extra_mb": (peak - before) / 1024, "logits_mb": size, "loss": loss.item(),
                      "grad_norm": logits.grad.float().norm().item()}))  # fmt: skip


def child(variant: str, hidden_size: int, chunk: int) -> None:
    if variant.startswith(("plwlab-", "cross_entropy-")):
        loss_only(variant)
        return
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
    parser.add_argument("--child", choices=["naive", "chunked", *LOSS_ONLY])
    args = parser.parse_args()
    if args.child:
        child(args.child, args.hidden, args.chunk)
        return
    out = {}
    for variant in ("naive", "chunked", *LOSS_ONLY):
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
    for dtype in ("float32", "bfloat16"):
        ours, usual = out[f"plwlab-{dtype}"], out[f"cross_entropy-{dtype}"]
        same = abs(ours["loss"] - usual["loss"]) <= 1e-5 * abs(usual["loss"])
        print(f"loss alone on {dtype} logits ({ours['logits_mb']:.0f} MB): plwlab peak extra {ours['extra_mb']:.0f} MB, "
              f"F.cross_entropy {usual['extra_mb']:.0f} MB; same loss to 1e-5: {same}")  # fmt: skip
        print(f"RATIO plwlab loss peak / logits ({dtype}): {ours['extra_mb'] / ours['logits_mb']:.3f}   "
              f"(F.cross_entropy: {usual['extra_mb'] / usual['logits_mb']:.3f}; goal <= 1.05)")


if __name__ == "__main__":
    main()

"""GPU training throughput: a 1.1B LLaMA (TinyLlama-1.1B shape), random weights, fp32 master weights and AdamW
state with bf16 compute (autocast, as trainer=gpu), packed 2048-token rows, the PLW loss (chunked), fused AdamW.
Reports tokens/s and MFU (model FLOPs utilisation).

    python benchmarks/bench_gpu.py [--seq 2048] [--rows 8] [--steps 20] [--peak-tflops 989]

MFU = (6 N + 12 n_layer d_model seq) x tokens/s / peak, N = parameters without embeddings (PaLM appendix B);
peak defaults to H100 SXM dense bf16 (989 TFLOP/s). Needs a CUDA GPU.
"""

import argparse
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from plwlab.training.attention import VARLEN  # registers attn_implementation=varlen
from plwlab.training.loss import chunked_next_token_nll, prompt_weighted_loss

CONFIG = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
              num_key_value_heads=4, max_position_embeddings=4096)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    parser.add_argument("--attn", default="sdpa", help="sdpa (block-diagonal mask) or varlen (document boundaries)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("skipped: no CUDA GPU")
        return
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**CONFIG, attn_implementation=args.attn)).cuda()  # fp32 master weights
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    n_params = sum(p.numel() for n, p in model.named_parameters() if "embed" not in n and "lm_head" not in n)
    ids = torch.randint(0, CONFIG["vocab_size"], (args.rows, args.seq), device="cuda")
    docs = 4  # 4 packed documents per row
    position_ids = (torch.arange(args.seq, device="cuda") % (args.seq // docs)).expand(args.rows, -1)
    completion = (position_ids > args.seq // docs // 3).long()
    token_mask = (position_ids > 0).long()
    token_mask[:, 0] = 1
    starts = (position_ids.flatten() == 0).nonzero().flatten().tolist() + [args.rows * args.seq]  # once, before timing
    bounds = {"cu_seq_lens_q": torch.tensor(starts, dtype=torch.int32, device="cuda"), "max_length_q": args.seq}
    bounds.update(cu_seq_lens_k=bounds["cu_seq_lens_q"], max_length_k=args.seq)
    varlen = bounds if args.attn == VARLEN else {}
    times = []
    for step in range(args.steps + 3):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            hidden = model.model(input_ids=ids, position_ids=position_ids, use_cache=False, **varlen).last_hidden_state
            nll = chunked_next_token_nll(hidden, model.lm_head.weight, ids, 4096)
        prompt_weighted_loss(nll, completion, token_mask, 0.1).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if step >= 3:
            times.append(time.perf_counter() - t0)
    tokens_per_s = args.rows * args.seq / (sum(times) / len(times))
    flops_per_token = 6 * n_params + 12 * CONFIG["num_hidden_layers"] * CONFIG["hidden_size"] * args.seq
    mfu = tokens_per_s * flops_per_token / (args.peak_tflops * 1e12)
    print(f"GPU {torch.cuda.get_device_name()} | {n_params / 1e9:.2f}B non-embedding params | seq {args.seq} x {args.rows}")
    print(f"{tokens_per_s:,.0f} tokens/s | MFU {mfu:.1%} (peak {args.peak_tflops} TFLOP/s) | "
          f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")  # fmt: skip


if __name__ == "__main__":
    main()

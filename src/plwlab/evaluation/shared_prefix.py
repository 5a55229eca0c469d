"""lm-eval's HF model with each shared context computed once: multiple-choice requests of one question share their
context (TruthfulQA-MC2: a 168-token preamble and the question, then ~7.4 answers; ARC-25: 25 worked examples, then
4 choices), and lm-eval's ``HFLM`` sends the whole context through the model again with every answer.

:class:`SharedPrefixHFLM` groups the loglikelihood requests by their context tokens. A group of two or more runs the
context once (all but its last token) with the KV cache on, then every continuation of the group in one batch on
that cache, right-padded: each row is the context's last token and the continuation minus its last token, so the
logits at its positions predict exactly the continuation's tokens, as in lm-eval's own computation (``inp[:, :-1]``,
the last ``len(continuation)`` positions). Scores are the same sums of log-probabilities and the same is-greedy flags;
the floating-point order differs, so they agree with lm-eval's to float rounding, and every accuracy is the same (a
test compares them). Requests whose context is not shared, or too long for the model, go to lm-eval's own code.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
from lm_eval.models.huggingface import HFLM
from rich.progress import Progress

Request = tuple[tuple[str, str], list[int], list[int]]


class SharedPrefixHFLM(HFLM):
    """``HFLM`` whose loglikelihood requests compute a context shared by several of them once (KV cache reuse)."""

    def _loglikelihood_tokens(self, requests: list[Request], disable_tqdm: bool = False,
                              override_bs: int | None = None) -> list[tuple[float, bool]]:  # fmt: skip
        groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for i, (_, context, continuation) in enumerate(requests):
            fits = len(context) + len(continuation) <= self.max_length + 1
            key = tuple(context) if fits and len(context) > 1 and self.backend == "causal" else (-1 - i,)  # own group
            groups[key].append(i)
        shared = [g for g in groups.values() if len(g) > 1]
        rest = [i for g in groups.values() if len(g) == 1 for i in g]
        out: list[Any] = [None] * len(requests)
        if rest:
            for i, answer in zip(rest, super()._loglikelihood_tokens([requests[i] for i in rest], disable_tqdm, override_bs)):
                out[i] = answer
        with Progress(disable=disable_tqdm or not shared, transient=True) as bar:
            task = bar.add_task("shared-context loglikelihoods", total=sum(map(len, shared)))
            for group in shared:
                for i, answer in zip(group, self._score_group([requests[i] for i in group])):
                    out[i] = answer
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
                bar.advance(task, len(group))
        return out

    @torch.no_grad()
    def _score_group(self, group: list[Request]) -> list[tuple[float, bool]]:
        """(log-probability, is greedy) of each continuation of ``group`` after their common context."""
        context = group[0][1]
        continuations = [c for _, _, c in group]
        prefix = torch.tensor([context[:-1]], device=self.device)
        cache = self.model(prefix, use_cache=True).past_key_values
        cache.batch_repeat_interleave(len(group))
        rows = [[context[-1], *c[:-1]] for c in continuations]
        width = max(map(len, rows))
        ids = torch.tensor([r + [0] * (width - len(r)) for r in rows], device=self.device)
        mask = torch.tensor([[1] * (len(context) - 1 + len(r)) + [0] * (width - len(r)) for r in rows], device=self.device)
        positions = torch.arange(len(context) - 1, len(context) - 1 + width, device=self.device).expand(len(rows), -1)
        logits = self.model(ids, attention_mask=mask, position_ids=positions, past_key_values=cache).logits
        logprobs = logits[..., : self.vocab_size].float().log_softmax(-1)
        out = []
        for row, continuation in enumerate(continuations):
            target = torch.tensor(continuation, device=self.device)
            scores = logprobs[row, : len(continuation)]
            greedy = bool((scores.argmax(-1) == target).all())
            out.append((float(scores.gather(-1, target[:, None]).sum()), greedy))
        return out

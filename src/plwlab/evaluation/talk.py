"""``plwlab generate``: talk to a trained run. Its exported model answers an instruction prompted as the run was
trained (the Alpaca template, the bare prompt of prompt/completion data, or its chat template:
:func:`plwlab.evaluation.runs.instruction_prompt`), greedy by default (the evaluation's decoding), tokens streamed
as they come; ``interactive`` reads one instruction after another (a chat run keeps the conversation).

    plwlab generate outputs/study/runs/data=alpaca_sample,plw=0.1 "Name three primary colours."
    plwlab generate <run> "Translate to French:" --input "Good morning" --temperature 0.7 --top-p 0.9
    plwlab generate <run> -i                      # interactive: /reset forgets the conversation, /quit ends
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, TextIO

import torch
from transformers import TextStreamer

from plwlab.data.alpaca import user_text
from plwlab.data.chat import end_of_turn_ids, render_chat
from plwlab.evaluation.generation import encode, pad_id
from plwlab.evaluation.runs import LoadedRun, instruction_prompt, is_chat_run


class _Streamer(TextStreamer):
    """Transformers' streamer, printing to ``out`` instead of stdout."""

    def __init__(self, tokenizer: Any, out: TextIO) -> None:
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.out = out

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.out.write(text + ("\n" if stream_end else ""))
        self.out.flush()


@torch.no_grad()
def reply(run: LoadedRun, prompt: str, max_new_tokens: int = 256, sampling: dict[str, Any] | None = None,
          out: TextIO | None = None) -> str:  # fmt: skip
    """The run's answer to a ``prompt`` already in its template (streamed to ``out`` when given): greedy, or
    sampled with ``sampling`` (temperature, top_p, top_k), cut at EOS or the chat template's end of turn."""
    chat = is_chat_run(run)
    tokenizer = run.tokenizer
    ids = torch.tensor([encode(tokenizer, [prompt], add_bos=not chat)[0]], device=next(run.model.parameters()).device)
    stops = end_of_turn_ids(tokenizer) if chat else [tokenizer.eos_token_id]
    generated = run.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                   do_sample=bool(sampling), pad_token_id=pad_id(tokenizer), eos_token_id=stops,
                                   streamer=_Streamer(tokenizer, out) if out is not None else None,
                                   **(sampling or {}))  # fmt: skip
    tokens = generated[0, ids.shape[1] :].tolist()
    tokens = tokens[: next((k for k, t in enumerate(tokens) if t in stops), len(tokens))]
    return tokenizer.decode(tokens, skip_special_tokens=True)


def sampling_args(temperature: float, top_p: float | None, top_k: int | None) -> dict[str, Any] | None:
    """``model.generate``'s sampling arguments; None (greedy) at temperature 0."""
    if temperature < 0:
        raise ValueError(f"--temperature must be >= 0, got {temperature}")
    if temperature == 0:
        if top_p is not None or top_k is not None:
            raise ValueError("--top-p and --top-k sample: give a --temperature above 0 with them")
        return None
    return {"temperature": temperature, **({"top_p": top_p} if top_p is not None else {}),
            **({"top_k": top_k} if top_k is not None else {})}  # fmt: skip


def answer(run: LoadedRun, instruction: str, input: str = "", max_new_tokens: int = 256,  # noqa: A002
           sampling: dict[str, Any] | None = None, out: TextIO | None = None) -> str:  # fmt: skip
    """The run's answer to one ``instruction`` (and ``input``), prompted as it was trained."""
    return reply(run, instruction_prompt(run, instruction, input), max_new_tokens, sampling, out)


def interactive(run: LoadedRun, max_new_tokens: int = 256, sampling: dict[str, Any] | None = None,
                read: Callable[[str], str] = input, out: TextIO = sys.stdout) -> None:  # fmt: skip
    """Read instructions until EOF or ``/quit``; stream each answer. A chat run keeps the conversation (``/reset``
    forgets it); an instruction-format run answers each instruction on its own, as it was trained."""
    chat = is_chat_run(run)
    messages: list[dict[str, str]] = []
    out.write(f"{run.run_id} (PLW {run.meta.get('plw')}, {run.meta.get('dataset')}); "
              + ("a chat run: the conversation is kept, /reset forgets it" if chat else "each instruction on its own")
              + "; /quit or Ctrl-D ends\n")  # fmt: skip
    while True:
        try:
            line = read(">>> ").strip()
        except EOFError:
            out.write("\n")
            return
        if line == "/quit":
            return
        if line == "/reset":
            messages = []
            continue
        if not line:
            continue
        if chat:
            messages.append({"role": "user", "content": user_text(line, "")})
            text = reply(run, render_chat(run.tokenizer, messages, True), max_new_tokens, sampling, out)
            messages.append({"role": "assistant", "content": text})
        else:
            answer(run, line, "", max_new_tokens, sampling, out)

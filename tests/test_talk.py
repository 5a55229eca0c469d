"""``plwlab generate``: a trained run answers an instruction in its own template, greedy as evaluation decodes
(the same text as the evaluation's engine), streamed, sampled on request, and interactively."""

import subprocess
import sys

import pytest
from conftest import compose_train
from test_train import QUICK, cli_env

from plwlab.evaluation.runs import instruction_prompt, load_run, run_complete
from plwlab.training.train import train

INSTRUCTION = "Name three primary colours."


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The demo run (Alpaca template) and a chat-data run (ChatML template), trained briefly."""
    root = tmp_path_factory.mktemp("talk")
    train(compose_train([*QUICK], root / "alpaca"))
    train(compose_train([*QUICK, "data=chat_sample", "model.chat_template=chatml", "data.limit=24"], root / "chat"))
    return root


def generate_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "plwlab.cli", "generate", *args], capture_output=True, text=True,
                          env=cli_env(), input=stdin, timeout=300)  # fmt: skip


@pytest.mark.parametrize("kind", ["alpaca", "chat"])
def test_the_answer_is_the_evaluations_greedy_completion_streamed_or_not(runs, kind):
    run = load_run(runs / kind)
    (expected,) = run_complete(run, [instruction_prompt(run, INSTRUCTION)], 12, "x")
    whole = generate_cli(str(runs / kind), INSTRUCTION, "--max-new-tokens", "12", "--no-stream")
    assert whole.returncode == 0, whole.stderr[-2000:]
    assert whole.stdout == expected.text + "\n"
    streamed = generate_cli(str(runs / kind), INSTRUCTION, "--max-new-tokens", "12")
    assert streamed.returncode == 0 and streamed.stdout.strip() == expected.text.strip()


def test_sampling_is_seeded_and_its_flags_are_checked(runs):
    args = [str(runs / "alpaca"), INSTRUCTION, "--max-new-tokens", "16", "--no-stream", "--temperature", "1.5"]
    first, again = generate_cli(*args, "--seed", "1"), generate_cli(*args, "--seed", "1")
    other = generate_cli(*args, "--seed", "2")
    assert first.returncode == 0 and first.stdout == again.stdout != other.stdout
    bad = generate_cli(str(runs / "alpaca"), INSTRUCTION, "--top-p", "0.9")
    assert bad.returncode == 1 and bad.stderr.strip() == (
        "error: --top-p and --top-k sample: give a --temperature above 0 with them")
    missing = generate_cli(str(runs / "alpaca"))
    assert missing.stderr.strip() == "error: give an instruction, or -i for the interactive mode"


def test_interactive_mode_keeps_a_chat_runs_conversation(runs, monkeypatch):
    import io

    import plwlab.evaluation.talk as talk
    from plwlab.data.chat import render_chat

    run = load_run(runs / "chat")
    lines = iter(["Hello", "And again?", "/reset", "Hello", "/quit"])
    prompts = []
    real = talk.reply
    monkeypatch.setattr(talk, "reply", lambda r, prompt, *a: prompts.append(prompt) or real(r, prompt, *a))
    talk.interactive(run, 6, None, read=lambda _: next(lines), out=io.StringIO())
    assert len(prompts) == 3
    assert prompts[0] == prompts[2] == render_chat(run.tokenizer, [{"role": "user", "content": "Hello"}], True)
    assert prompts[1].startswith(prompts[0]) and "And again?" in prompts[1]  # the first exchange kept
    done = generate_cli(str(runs / "alpaca"), "-i", "--max-new-tokens", "4", stdin=f"{INSTRUCTION}\n/quit\n")
    assert done.returncode == 0 and "each instruction on its own" in done.stdout

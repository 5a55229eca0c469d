import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model

from plwlab.data.batching import collate
from plwlab.data.tokenization import tokenize_examples
from plwlab.training.loss import completion_mask, next_token_nll, prompt_weighted_loss, segment_denominator

RECORDS = [
    {"instruction": "Name a colour.", "input": "", "output": "Blue."},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "2 + 3 = 5, so the answer is five."},
    {"instruction": "Write a haiku about rain.", "input": "", "output": "Soft rain on the roof\nwhispers all night long."},
]


def _batch_and_logits(dtype):
    loaded = tiny_model(dtype=dtype)
    examples, _ = tokenize_examples(RECORDS, loaded.tokenizer, max_length=512)
    batch = collate([[e] for e in examples], loaded.tokenizer.pad_token_id)
    with torch.no_grad():
        logits = loaded.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return loaded.model, batch, logits


@pytest.fixture(scope="module")
def batch_and_logits():
    return _batch_and_logits("float64")


@pytest.fixture(scope="module")
def batch_and_logits_fp32():
    """HF's loss always runs in float32: compare with it there. Its mean reduction sums in another order, so
    results agree to float32 rounding (a few ulp), not bit for bit."""
    return _batch_and_logits("float32")


def reference_loss(logits, batch, plw, normalization):
    """Token-by-token loop: the docstring's formula written out independently."""
    num, n_p, n_c = 0.0, 0, 0
    for b in range(logits.shape[0]):
        for t in range(1, logits.shape[1]):
            if not batch["attention_mask"][b, t]:
                continue
            nll = -F.log_softmax(logits[b, t - 1].double(), -1)[batch["input_ids"][b, t]].item()
            is_completion = bool(completion_mask(batch["segment_ids"])[b, t])
            num += nll * (1.0 if is_completion else plw)
            n_c += is_completion
            n_p += not is_completion
    den = {"weight_sum": plw * n_p + n_c, "nonzero": n_c + (n_p if plw > 0 else 0), "completion": n_c}[normalization]
    return num / den


@pytest.mark.parametrize("normalization", ["weight_sum", "nonzero", "completion"])
@pytest.mark.parametrize("plw", [0.0, 0.01, 0.1, 0.5, 1.0, 2.0])
def test_matches_token_loop(batch_and_logits, plw, normalization):
    _, batch, logits = batch_and_logits
    out = prompt_weighted_loss(next_token_nll(logits, batch["input_ids"]), completion_mask(batch["segment_ids"]), batch["token_mask"], plw, normalization)
    assert out.loss.item() == pytest.approx(reference_loss(logits, batch, plw, normalization), rel=1e-12)


def test_plw0_equals_hf_masked_loss(batch_and_logits_fp32):
    model, batch, logits = batch_and_logits_fp32
    labels = batch["input_ids"].masked_fill(~completion_mask(batch["segment_ids"]).bool(), -100)
    with torch.no_grad():
        hf = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).loss
    for normalization in ("weight_sum", "nonzero", "completion"):
        ours = prompt_weighted_loss(next_token_nll(logits, batch["input_ids"]), completion_mask(batch["segment_ids"]), batch["token_mask"], 0.0, normalization)
        torch.testing.assert_close(ours.loss, hf, rtol=3e-7, atol=0)


def test_plw1_equals_hf_unmasked_loss(batch_and_logits_fp32):
    model, batch, logits = batch_and_logits_fp32
    labels = batch["input_ids"].masked_fill(~batch["attention_mask"].bool(), -100)
    with torch.no_grad():
        hf = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).loss
    for normalization in ("weight_sum", "nonzero"):
        ours = prompt_weighted_loss(next_token_nll(logits, batch["input_ids"]), completion_mask(batch["segment_ids"]), batch["token_mask"], 1.0, normalization)
        torch.testing.assert_close(ours.loss, hf, rtol=3e-7, atol=0)


def test_parts_and_counts(batch_and_logits):
    _, batch, logits = batch_and_logits
    out = prompt_weighted_loss(next_token_nll(logits, batch["input_ids"]), completion_mask(batch["segment_ids"]), batch["token_mask"], 0.3)
    targets_real = batch["attention_mask"][:, 1:].sum()
    assert out.n_prompt + out.n_completion == targets_real
    assert out.n_completion == completion_mask(batch["segment_ids"]).sum()  # completion tokens are never the first token
    expected = (0.3 * out.prompt_nll + out.completion_nll) / (0.3 * out.n_prompt + out.n_completion)
    torch.testing.assert_close(out.loss, expected)
    # denominator override gives the raw weighted sum
    raw = prompt_weighted_loss(next_token_nll(logits, batch["input_ids"]), completion_mask(batch["segment_ids"]), batch["token_mask"], 0.3, denominator=1.0)
    torch.testing.assert_close(raw.loss, out.weighted_sum)


def test_all_completion_truncated_plw0_is_finite():
    loaded = tiny_model()
    examples, n_empty = tokenize_examples(RECORDS, loaded.tokenizer, max_length=8)  # prompts alone exceed 8
    assert n_empty == len(RECORDS)
    batch = collate([[e] for e in examples], loaded.tokenizer.pad_token_id)
    for normalization in ("weight_sum", "nonzero", "completion"):
        logits = loaded.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        out = prompt_weighted_loss(next_token_nll(logits, batch["input_ids"]), completion_mask(batch["segment_ids"]), batch["token_mask"], 0.0, normalization)
        assert out.loss.item() == 0.0 and out.n_completion == 0
        out.loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in loaded.model.parameters() if p.grad is not None)
        loaded.model.zero_grad()


def loss_denominator(n_prompt: float, n_completion: float, plw: float, normalization: str) -> torch.Tensor:
    """The normalizer D of prompt_weighted_loss from token counts: segment_denominator with W = (PLW, 1), C = {1}."""
    return segment_denominator(torch.tensor([n_prompt, n_completion]), (plw, 1.0), (1,), normalization)


def test_denominator_conventions_and_errors():
    # PLW leaving 0 makes the "nonzero" denominator jump by 1 + 1/Rg (here Rg = 0.1: 11x)
    assert loss_denominator(100, 10, 0.0, "nonzero").item() == 10
    assert loss_denominator(100, 10, 1e-4, "nonzero").item() == 110
    assert loss_denominator(100, 10, 0.5, "weight_sum").item() == 60
    assert loss_denominator(100, 10, 0.5, "completion").item() == 10
    assert loss_denominator(0, 0, 0.5, "weight_sum").item() == 1  # never divide by zero
    with pytest.raises(ValueError, match="normalization"):
        loss_denominator(1, 1, 0.1, "mean")
    with pytest.raises(ValueError, match="plw"):
        prompt_weighted_loss(torch.zeros(1, 1), torch.ones(1, 2), torch.ones(1, 2), -0.1)


def test_padding_token_ids_do_not_matter(batch_and_logits):
    _, batch, logits = batch_and_logits
    ids = batch["input_ids"].masked_fill(~batch["attention_mask"].bool(), 7)
    a = prompt_weighted_loss(next_token_nll(logits, batch["input_ids"]), completion_mask(batch["segment_ids"]), batch["token_mask"], 0.2)
    b = prompt_weighted_loss(next_token_nll(logits, ids), completion_mask(batch["segment_ids"]), batch["token_mask"], 0.2)
    assert math.isclose(a.loss.item(), b.loss.item(), rel_tol=0, abs_tol=0)


def test_next_token_nll_shifts_targets_not_logits():
    """Same values and gradients as slicing the logits (the old formulation), without copying them."""
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 11, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, 11, (3, 7))
    sliced = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
    (g_sliced,) = torch.autograd.grad((sliced * torch.arange(18)).sum(), logits)
    nll = next_token_nll(logits, ids)
    (g_nll,) = torch.autograd.grad((nll.flatten() * torch.arange(18)).sum(), logits)
    assert nll.shape == (3, 6)
    torch.testing.assert_close(nll.flatten(), sliced, rtol=0, atol=1e-13)
    torch.testing.assert_close(g_nll, g_sliced, rtol=0, atol=1e-13)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_next_token_nll_equals_cross_entropy_on_upcast_logits(dtype, monkeypatch):
    """The block-wise NLL (no full-size temporary) gives F.cross_entropy's values and gradients on the upcast
    logits, with ignored targets and row blocks that do not divide the rows; and it passes gradcheck in float64."""
    import plwlab.training.loss as loss_module

    monkeypatch.setattr(loss_module, "ROW_BLOCK_ELEMENTS", 3 * 50)  # 3 rows per block: 4 blocks over 10 rows
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 50).to(dtype).requires_grad_()
    ids = torch.randint(0, 50, (2, 5))
    weights = torch.rand(2, 4, dtype=torch.float64)
    nll = next_token_nll(logits, ids)
    (grad,) = torch.autograd.grad((nll.double() * weights).sum(), logits)
    targets = torch.nn.functional.pad(ids[:, 1:], (0, 1), value=-100)
    usual = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
    usual = usual.view(2, 5)[:, :-1]
    (usual_grad,) = torch.autograd.grad((usual.double() * weights).sum(), logits)
    assert nll.dtype == torch.float32 and grad.dtype == dtype
    torch.testing.assert_close(nll, usual, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad, usual_grad, rtol=1e-5, atol=1e-6)
    x = torch.randn(2, 4, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: next_token_nll(t, torch.randint(0, 7, (2, 4), generator=torch.Generator().manual_seed(1))), (x,))


def _prompt_weighted_loss_before_segments(nll, completion_mask, token_mask, plw, normalization, denominator=None):
    """prompt_weighted_loss as it was before segment weights existed (commit 2bd4de3), kept to check bit-identity."""
    real = token_mask[:, 1:].bool()
    completion = completion_mask[:, 1:].bool() & real
    prompt = real & ~completion
    nll = nll * real
    weights = completion.to(nll.dtype) + plw * prompt.to(nll.dtype)
    weighted_sum = (weights * nll).sum()
    n_prompt, n_completion = prompt.sum(), completion.sum()
    if denominator is None:
        n_p, n_c = n_prompt.double(), n_completion.double()
        d = {"weight_sum": plw * n_p + n_c, "nonzero": n_c + (n_p if plw > 0 else 0.0), "completion": n_c}[normalization]
        denominator = torch.where(d > 0, d, torch.ones_like(d))
    denominator = torch.as_tensor(denominator, dtype=nll.dtype)
    return weighted_sum / denominator, weighted_sum, denominator


@pytest.mark.parametrize("normalization", ["weight_sum", "nonzero", "completion"])
@pytest.mark.parametrize("plw", [0.0, 5e-4, 0.02463, 0.1, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_alpaca_loss_is_bit_identical_after_segment_weights(normalization, plw, dtype):
    torch.manual_seed(1)
    nll = torch.rand(4, 9, dtype=dtype, requires_grad=True)
    completion = (torch.rand(4, 10) > 0.4).long()
    mask = (torch.rand(4, 10) > 0.15).long()
    new = prompt_weighted_loss(nll, completion, mask, plw, normalization)
    (g_new,) = torch.autograd.grad(new.loss, nll)
    old = _prompt_weighted_loss_before_segments(nll, completion, mask, plw, normalization)
    (g_old,) = torch.autograd.grad(old[0], nll)
    assert torch.equal(new.loss, old[0]) and torch.equal(new.weighted_sum, old[1]) and torch.equal(new.denominator, old[2])
    assert torch.equal(g_new, g_old)
    assert torch.equal(prompt_weighted_loss(nll, completion, mask, plw, normalization, denominator=1.0).loss,
                       _prompt_weighted_loss_before_segments(nll, completion, mask, plw, normalization, 1.0)[0])


def test_segment_weights_follow_the_token_loop():
    """Per-role weights (template 0.05, system 0, user 0.1, assistant 1, reasoning 0.5) against a plain loop over
    tokens, in all three normalizations (completion segments: assistant and reasoning)."""
    from plwlab.training.loss import segment_weighted_loss

    torch.manual_seed(2)
    weights = (0.05, 0.0, 0.1, 1.0, 0.5)
    nll = torch.rand(3, 11, dtype=torch.float64)
    segments = torch.randint(0, 5, (3, 12))
    mask = (torch.rand(3, 12) > 0.1).long()
    for normalization in ("weight_sum", "nonzero", "completion"):
        out = segment_weighted_loss(nll, segments, mask, weights, (3, 4), normalization)
        total, d = 0.0, 0.0
        for b in range(3):
            for t in range(11):
                if not mask[b, t + 1]:
                    continue
                w = weights[int(segments[b, t + 1])]
                total += w * float(nll[b, t])
                d += {"weight_sum": w, "nonzero": float(w > 0), "completion": float(int(segments[b, t + 1]) in (3, 4))}[normalization]
        assert float(out.loss) == pytest.approx(total / d, rel=1e-12), normalization


def test_the_gpu_block_size_gives_the_same_nll_and_gradient(monkeypatch):
    """On CUDA the NLL upcasts blocks of GPU_BLOCK_ELEMENTS (a few kernels per micro-batch, not thousands); forced
    on CPU, the values and gradients are the CPU block size's exactly."""
    import plwlab.training.loss as loss_module

    torch.manual_seed(0)
    logits = torch.randn(2, 300, 1000, requires_grad=True)  # CPU blocks: 262 rows of 600; the GPU size: one block
    ids = torch.randint(0, 1000, (2, 300))
    results = []
    for elements in (loss_module.ROW_BLOCK_ELEMENTS, loss_module.GPU_BLOCK_ELEMENTS):
        monkeypatch.setattr(loss_module, "ROW_BLOCK_ELEMENTS", elements)
        nll = next_token_nll(logits, ids)
        (grad,) = torch.autograd.grad(nll.sum(), logits)
        results.append((nll, grad))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])

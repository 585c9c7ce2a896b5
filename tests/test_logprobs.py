import pytest
import torch

from hyla.runtime.logprobs import score_tokens, token_logprobs


def _reference(logits: torch.Tensor, target: int, top_n: int) -> dict[int, tuple[float, int]]:
    """One row scored on its own: a full sort of the vocabulary."""
    lp = torch.log_softmax(logits.double(), -1).float()
    order = torch.argsort(lp, descending=True, stable=True).tolist()
    out = {target: (float(lp[target]), int((lp > lp[target]).sum()) + 1)}
    for rank, tid in enumerate(order[:top_n], start=1):
        out.setdefault(tid, (float(lp[tid]), rank))
    return out


@pytest.mark.parametrize("seed", range(3))
def test_score_tokens_matches_a_row_by_row_sort(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    rows, vocab = 37, 1000
    logits = torch.randn(rows, vocab, generator=g) * 3
    targets = torch.randint(0, vocab, (rows,), generator=g)
    top_n = torch.randint(0, 6, (rows,), generator=g).tolist()
    got = score_tokens(logits, targets, max(top_n)).entries(top_n)
    for row, (entry, n) in enumerate(zip(got, top_n)):
        want = _reference(logits[row], int(targets[row]), n)
        assert list(entry) == list(want)
        for tid, (lp, rank) in entry.items():
            assert rank == want[tid][1] and lp == pytest.approx(want[tid][0], abs=1e-5)


def test_token_logprobs_puts_the_scored_token_first_and_keeps_its_rank() -> None:
    assert token_logprobs(3, -2.0, 4, [-0.5, -1.0], [1, 2]) == {3: (-2.0, 4), 1: (-0.5, 1), 2: (-1.0, 2)}
    assert token_logprobs(1, -0.5, 1, [-0.5, -1.0], [1, 2]) == {1: (-0.5, 1), 2: (-1.0, 2)}
    assert token_logprobs(2, -1.0, 2, [], []) == {2: (-1.0, 2)}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("seed", range(2))
def test_scoring_without_best_tokens_matches_the_log_softmax(dtype: torch.dtype, seed: int) -> None:
    """No best tokens asked for (lm-eval's log-likelihoods): on the CPU one C++ op scores the rows."""
    g = torch.Generator().manual_seed(seed)
    rows, vocab = 70, 5000
    logits = (torch.randn(rows, vocab, generator=g) * 4).to(dtype)
    targets = torch.randint(0, vocab, (rows,), generator=g)
    targets[:3] = logits[:3].float().argmax(-1)  # rank 1 exactly
    with torch.no_grad():
        got = score_tokens(logits, targets, 0)
    want = torch.log_softmax(logits.double(), -1).gather(1, targets[:, None])[:, 0]
    assert torch.allclose(got.chosen.double(), want, atol=1e-5, rtol=0)
    exact = (logits.float() > logits.float().gather(1, targets[:, None])).sum(-1) + 1
    assert torch.equal(got.ranks, exact) and got.ranks[:3].tolist() == [1, 1, 1]
    assert got.top_values.shape == got.top_ids.shape == (rows, 0)

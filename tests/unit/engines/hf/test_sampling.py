"""A decode step's sampling (`sample_rows`) against the per-row reference (`sample_row`), in process.

Plain greedy rows are chosen together; every row must get the very token, finish reason and step count that
`sample_row` gives it alone, whatever else shares the step: the EOS ban (ignore_eos, min_tokens), a row where
only the end is left, NaN rows, sampled and penalised rows beside them, and a failing row.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from app.engines.base import GenerationRequest
from app.engines.hf.sampling import Sample, Sampler, SequenceHook, plain_greedy, sample_row, sample_rows

VOCAB = 50
EOS = [3, 7]


def sampler(max_new: int = 5, hooks: tuple[SequenceHook, ...] = (), seed: int = 0, **kw: Any) -> Sampler:
    req = GenerationRequest(prompt="x", max_tokens=max_new, **{"temperature": 0.0, **kw})
    gen = torch.Generator().manual_seed(seed)
    return Sampler(req, max_new, generator=gen, eos_ids=EOS, vocab_size=VOCAB, device="cpu", hooks=hooks)


class Boom(SequenceHook):
    def process(self, row: Any) -> Any:
        raise ValueError("this row's hook failed")


def cases() -> list[dict[str, Any]]:
    return [
        {},  # EOS allowed
        {"ignore_eos": True},
        {"min_tokens": 3},
        {"ignore_eos": True},  # its row: only EOS finite
        {"temperature": 0.9, "seed": 5},
        {"presence_penalty": 1.0, "frequency_penalty": 0.5},
        {"ignore_eos": True},  # its row: NaN
        {"min_tokens": 1},
    ]


def logits_for(step: int, rows: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(100 + step)
    out = torch.randn(rows, VOCAB, generator=gen)
    out[:, EOS[step % 2]] += 6.0  # an end token is every row's favourite
    if rows > 6:
        out[3] = float("-inf")
        out[3, EOS] = 1.0
        out[6, 11] = float("nan")
    return out


def run(step_fn: Any, steps: int = 6) -> list[list[tuple[int, str | None, int]]]:
    samplers = [sampler(max_new=4, **kw) for kw in cases()]
    got: list[list[tuple[int, str | None, int]]] = [[] for _ in samplers]
    for step in range(steps):
        logits = logits_for(step, len(samplers))
        for i, result in enumerate(step_fn(logits, samplers)):
            assert isinstance(result, Sample)
            got[i].append((result.token, result.finish, samplers[i].step))
    return got


def test_a_step_gives_every_row_the_token_it_gets_alone() -> None:
    alone = run(lambda logits, samplers: [sample_row(logits[i].clone(), s) for i, s in enumerate(samplers)])
    together = run(sample_rows)
    assert together == alone
    assert alone[1][0][0] not in EOS and alone[0][0][0] in EOS  # the ban mattered
    assert alone[3][0][0] in EOS  # only the end was left: the end wins
    assert alone[6][0][0] == 11  # NaN is the maximum, as argmax has it
    assert [plain_greedy(s) for s in (sampler(), sampler(temperature=0.5), sampler(presence_penalty=1.0))] == \
        [True, False, False]


def test_a_failing_row_fails_alone_and_the_logits_stay_as_the_forward_left_them() -> None:
    samplers = [sampler(ignore_eos=True), sampler(hooks=(Boom(),)), sampler(ignore_eos=True)]
    logits = logits_for(0, 3)
    before = logits.clone()
    out = sample_rows(logits, samplers)
    assert isinstance(out[1], ValueError)
    assert [type(o) for o in (out[0], out[2])] == [Sample, Sample]
    assert torch.equal(logits[0], before[0]) and torch.equal(logits[2], before[2])
    assert [s.step for s in samplers] == [1, 0, 1]


@pytest.mark.parametrize("rows", [2, 5, 16])
@pytest.mark.parametrize("banned", ["odd rows", "every row"])
def test_many_plain_greedy_rows_agree_with_argmax(rows: int, banned: str) -> None:
    bans = [banned == "every row" or bool(i % 2) for i in range(rows)]
    samplers = [sampler(max_new=100, ignore_eos=ban) for ban in bans]
    logits = torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(rows))
    logits[:, EOS[0]] += 4.0
    expected = []
    for i in range(rows):
        row = logits[i].clone()
        if bans[i]:
            row[EOS] = float("-inf")
        expected.append(int(torch.argmax(row)))
    assert [s.token for s in sample_rows(logits, samplers) if isinstance(s, Sample)] == expected

"""Timestep-forcing pipeline: the schedule over N gloo ranks reproduces the sequential pipeline exactly.

The toy stages have what makes the real schedule delicate: per-step state that each block updates
(a KV-like history), a stateful decoder, and a feedback tensor from an early block that every
denoising rank must apply before a later one.
"""

import pytest
import torch

from engines.distributed import spawn
from engines.tpp import Feedback, PipelinePlan, run_rank, run_sequential

SHAPE = (4, 3, 6)
NUM_STEPS = 4
NUM_BLOCKS = 6
FEEDBACK = Feedback(source=0, target=4, shape=(4, 6), dtype=torch.bfloat16)


class ToyStages:
    """Per-step weights and histories, so any misrouted block or step would change the result."""

    def __init__(self, steps: list[int], decodes: bool) -> None:
        g = torch.Generator().manual_seed(123)
        weights = [torch.randn(6, 6, generator=g) / 3 for _ in range(NUM_STEPS)]
        self.weights = {s: weights[s] for s in steps}
        self.history = {s: torch.zeros(SHAPE) for s in steps}
        self.bias = torch.zeros(4, 6)
        self.decoded_sum = torch.zeros(()) if decodes else None

    def noise(self, block):
        return torch.randn(SHAPE, generator=torch.Generator().manual_seed(1000 + block)).to(torch.bfloat16)

    def denoise(self, step, block, x):
        h = torch.tanh(x.float() @ self.weights[step] + 0.5 * self.history[step] + self.bias[:, None, :])
        self.history[step] = h
        return (x.float() * 0.7 + 0.3 * h).to(torch.bfloat16)

    def decode(self, block, x):
        self.decoded_sum = self.decoded_sum + x.float().sum()
        return (x.float() * 2 + self.decoded_sum).clone()

    def feedback_out(self, block, x):
        return x[:, 0].clone()

    def feedback_in(self, value):
        self.bias = value.float()


def _rank_main(rank, world_size, decode_rank):
    plan = PipelinePlan(NUM_STEPS, world_size, decode_rank=decode_rank)
    stages = ToyStages(plan.steps_of(rank), decodes=rank == plan.decoder)
    report = run_rank(plan, rank, stages, NUM_BLOCKS, SHAPE, torch.bfloat16, torch.device("cpu"), FEEDBACK)
    return report.outputs, report.steps


def _sequential_outputs():
    return run_sequential(ToyStages(list(range(NUM_STEPS)), True), NUM_BLOCKS, NUM_STEPS, FEEDBACK).outputs


def test_plan_spreads_steps_contiguously_for_any_rank_count():
    assert PipelinePlan(4, 1).steps_of(0) == [0, 1, 2, 3]
    assert [PipelinePlan(4, 3).steps_of(r) for r in range(3)] == [[0, 1], [2], [3]]
    assert [PipelinePlan(4, 5, decode_rank=True).steps_of(r) for r in range(5)] == [[0], [1], [2], [3], []]
    with pytest.raises(ValueError):
        PipelinePlan(4, 6)


def test_balanced_plan_gives_every_rank_equal_work_counting_the_decode():
    plan = PipelinePlan(4, 4, decode_cost=0.66, parts=40)  # 4.66 steps of work: ~1.17 per rank
    spans = [plan.spans_of(r) for r in range(4)]
    work = [sum(sp.end - sp.start for sp in rank) / 40 for rank in spans]
    work[-1] += 0.66
    assert max(work) - min(work) <= 1 / 40 + 1e-9
    covered = [(sp.step, part) for rank in spans for sp in rank for part in range(sp.start, sp.end)]
    assert covered == [(s, p) for s in range(4) for p in range(40)], "every layer of every step exactly once, in order"
    assert plan.steps_of(3) == [3] and not spans[3][0].whole
    # no decode cost and whole steps: the old contiguous split
    assert [PipelinePlan(4, 2, parts=1).steps_of(r) for r in range(2)] == [[0, 1], [2, 3]]
    # a decode heavier than a rank's share still leaves the last rank one part
    assert (
        PipelinePlan(2, 2, decode_cost=10, parts=4).spans_of(1)[0].end
        - PipelinePlan(2, 2, decode_cost=10, parts=4).spans_of(1)[0].start
        >= 1
    )


@pytest.mark.parametrize("world", [2, 3])
def test_balanced_plan_counts_the_first_ranks_lead_work_too(world):
    plan = PipelinePlan(4, world, decode_cost=0.65, parts=40, lead_cost=0.1)
    work = [sum(sp.end - sp.start for sp in plan.spans_of(r)) / 40 for r in range(world)]
    work[0] += 0.1  # the audio features rank 0 computes for all
    work[-1] += 0.65
    assert max(work) - min(work) <= 1 / 40 + 1e-9
    assert sum(work) == pytest.approx(4 + 0.65 + 0.1)
    without = PipelinePlan(4, world, decode_cost=0.65, parts=40)
    first = [sum(sp.end - sp.start for sp in p.spans_of(0)) for p in (plan, without)]
    # rank 0 gives up (n-1)/n of the 4 layers its 0.1 step of lead work is worth; the others take them
    assert first[1] - first[0] == round(4 * (world - 1) / world)
    with pytest.raises(ValueError, match="lead_cost"):
        PipelinePlan(4, 2, lead_cost=-1)


@pytest.mark.parametrize(("world_size", "decode_rank"), [(1, False), (3, True)])
def test_gloo_pipeline_matches_sequential(world_size, decode_rank):
    results = spawn(world_size, _rank_main, args=(decode_rank,), backend="gloo")
    outputs, steps = results[-1]
    assert [s for _, st in results for s in st] == list(range(NUM_STEPS))
    expected = _sequential_outputs()
    assert len(outputs) == NUM_BLOCKS
    for got, want in zip(outputs, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)

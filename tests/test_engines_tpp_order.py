"""The timestep-forcing pipeline under NCCL's rules, simulated with one thread per rank.

NCCL runs one communicator's point-to-point operations strictly in the order a rank issued them,
and a send too large for NCCL to buffer (a step cut between ranks hands over the 32 MB token
stream) completes only when the peer's matching receive runs. gloo, which the other pipeline tests
use, buffers and matches out of order, so it cannot catch a schedule that deadlocks on GPUs (the
first balanced run on H200s hung exactly so). `InOrderP2P` stands in for `torch.distributed` with
the strict version of those rules: no buffering at all, which is stricter than NCCL, so a schedule
that finishes here cannot deadlock there.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque

import pytest
import torch
from test_engines_tpp import NUM_STEPS, SHAPE, ToyStages

from engines import tpp
from engines.tpp import Feedback, PipelinePlan, run_rank, run_sequential

PARTS, NUM_BLOCKS = 5, 7


class Deadlock(RuntimeError):
    """Every live rank waits on an operation that can no longer complete (or a pair did not match)."""


class _Work:
    def __init__(self, p2p: InOrderP2P, kind: str, tensor: torch.Tensor, peer: int) -> None:
        self.p2p, self.kind, self.tensor, self.peer, self.done = p2p, kind, tensor, peer, False

    def is_completed(self) -> bool:
        with self.p2p.cond:
            return self.done

    def wait(self) -> None:
        self.p2p.wait(self)


class InOrderP2P:
    """The `torch.distributed` calls `run_rank` makes, for ranks that are threads of one process."""

    def __init__(self, world_size: int) -> None:
        self.queues: list[deque[_Work]] = [deque() for _ in range(world_size)]
        self.cond = threading.Condition()
        self.local = threading.local()
        self.live = world_size
        self.waiting: dict[int, _Work] = {}  # rank -> the operation its thread waits for
        self.failure: str | None = None

    def get_backend(self) -> str:
        return "in-order"  # neither gloo (no int16 wire view) nor nccl (no host polling)

    def isend(self, tensor: torch.Tensor, dst: int) -> _Work:
        return self._issue("send", tensor, dst)

    def irecv(self, tensor: torch.Tensor, src: int) -> _Work:
        return self._issue("recv", tensor, src)

    def recv(self, tensor: torch.Tensor, src: int) -> None:
        self._issue("recv", tensor, src).wait()

    def finished(self) -> None:
        with self.cond:
            self.live -= 1
            self.cond.notify_all()

    def _issue(self, kind: str, tensor: torch.Tensor, peer: int) -> _Work:
        with self.cond:
            work = _Work(self, kind, tensor, peer)
            self.queues[self.local.rank].append(work)
            self._progress()
            return work

    def _progress(self) -> None:
        """Complete every send/receive pair that sits at the head of both ranks' queues."""
        moved = True
        while moved:
            moved = False
            for src, queue in enumerate(self.queues):
                if not queue or queue[0].kind != "send":
                    continue
                send, peer_queue = queue[0], self.queues[queue[0].peer]
                if not peer_queue or peer_queue[0].kind != "recv" or peer_queue[0].peer != src:
                    continue
                recv = peer_queue[0]
                if recv.tensor.shape != send.tensor.shape or recv.tensor.dtype != send.tensor.dtype:
                    # NCCL would hang or corrupt here; the pair stays unmatched and the waiters fail
                    self.failure = (
                        f"rank {src} sends {tuple(send.tensor.shape)} {send.tensor.dtype} but rank {send.peer} "
                        f"receives {tuple(recv.tensor.shape)} {recv.tensor.dtype}"
                    )
                    continue
                peer_queue.popleft()
                queue.popleft()
                recv.tensor.copy_(send.tensor)
                send.done = recv.done = moved = True
        self.cond.notify_all()

    def wait(self, work: _Work) -> None:
        """Block until `work` is matched. The detector sees only ranks blocked here, which is why
        `get_backend` is not "nccl" (`run_rank` would poll `is_completed` instead of waiting)."""
        with self.cond:
            self.waiting[self.local.rank] = work
            try:
                while not work.done:
                    stuck = len(self.waiting) == self.live and not any(w.done for w in self.waiting.values())
                    if self.failure is None and stuck:
                        heads = {r: (q[0].kind, q[0].peer) if q else None for r, q in enumerate(self.queues)}
                        self.failure = f"deadlock: every rank waits; queue heads (op, peer) {heads}"
                        self.cond.notify_all()
                    if self.failure is not None:
                        raise Deadlock(self.failure)
                    self.cond.wait(timeout=5.0)
            finally:
                del self.waiting[self.local.rank]


def run_threads(p2p: InOrderP2P, world_size: int, body) -> list:
    results: list = [None] * world_size
    errors: list[BaseException] = []

    def main(rank: int) -> None:
        p2p.local.rank = rank
        try:
            results[rank] = body(rank)
        except BaseException as exc:  # reported by the test's thread
            errors.append(exc)
            with p2p.cond:
                p2p.failure = p2p.failure or f"rank {rank} failed: {exc!r}"
                p2p.cond.notify_all()
        finally:
            p2p.finished()

    threads = [threading.Thread(target=main, args=(r,), daemon=True) for r in range(world_size)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    for t in threads:
        t.join(timeout=max(0.0, deadline - time.monotonic()))
    if any(t.is_alive() for t in threads):
        with p2p.cond:  # wake the stuck ranks so they end instead of lingering into later tests
            p2p.failure = p2p.failure or "a rank thread hung outside the transport"
            p2p.cond.notify_all()
        raise AssertionError("a rank thread hung")
    if errors:
        raise errors[0]
    if p2p.failure is not None:
        raise Deadlock(p2p.failure)
    return results


class PartStages(ToyStages):
    """`test_engines_tpp`'s toy stages with steps cut into `PARTS` parts, each with its own history."""

    def __init__(self, decodes: bool) -> None:
        super().__init__(list(range(NUM_STEPS)), decodes)
        g = torch.Generator().manual_seed(7)
        self.weights = [[torch.randn(6, 6, generator=g) / 3 for _ in range(PARTS)] for _ in range(NUM_STEPS)]
        self.history: dict[tuple[int, int], torch.Tensor] = {}

    def denoise(self, step: int, block: int, x: torch.Tensor) -> torch.Tensor:
        return self.denoise_part(step, block, x, None, 0, PARTS)[0]

    def denoise_part(self, step, block, x, hidden, start, end):
        h = x.float() if start == 0 else hidden.float()
        for part in range(start, end):
            h = torch.tanh(
                h @ self.weights[step][part] + 0.5 * self.history.get((step, part), 0) + self.bias[:, None, :]
            )
            self.history[(step, part)] = h
            h = h.to(torch.bfloat16).float()  # the hand-off dtype at every part, wherever the cut falls
        if end == PARTS:
            x = (x.float() * 0.7 + 0.3 * h).to(torch.bfloat16)
        return x, h.to(torch.bfloat16)


def test_the_simulated_transport_reports_a_deadlock_gloo_would_let_pass() -> None:
    p2p = InOrderP2P(2)

    def both_send_first(rank: int) -> None:
        p2p.isend(torch.ones(3), 1 - rank)
        p2p.recv(torch.empty(3), 1 - rank)

    with pytest.raises(Deadlock, match="every rank waits"):
        run_threads(p2p, 2, both_send_first)


def test_a_mismatched_pair_is_reported_not_passed() -> None:
    p2p = InOrderP2P(2)

    def mismatched(rank: int) -> None:
        if rank == 0:
            p2p.isend(torch.ones(3), 1).wait()
        else:
            p2p.recv(torch.empty(4), 0)

    with pytest.raises(Deadlock, match=r"sends \(3,\).*receives \(4,\)"):
        run_threads(p2p, 2, mismatched)


FEEDBACKS = [(0, 4), (0, 1), (2, 3), (1, NUM_BLOCKS + 2)]  # the last one's target never comes
PLANS = [  # (world size, decode rank, decode cost, parts)
    (world, decode_rank, cost, parts)
    for world, decode_rank, (cost, parts) in itertools.product(
        (2, 3, 4), (False, True), ((0.0, 1), (0.7, PARTS), (2.0, PARTS))
    )
]


def test_the_plans_under_test_include_steps_cut_between_ranks() -> None:
    cuts = [
        PipelinePlan(NUM_STEPS, world, decode_rank=dr, decode_cost=cost, parts=parts)
        for world, dr, cost, parts in PLANS
    ]
    assert sum(any(not sp.whole for r in range(p.world_size) for sp in p.spans_of(r)) for p in cuts) >= 6


@pytest.mark.parametrize("feedback", FEEDBACKS, ids=lambda f: f"feedback{f[0]}to{f[1]}")
@pytest.mark.parametrize(("world_size", "decode_rank", "decode_cost", "parts"), PLANS)
def test_every_plan_finishes_under_in_order_unbuffered_p2p_and_matches_one_process(
    monkeypatch: pytest.MonkeyPatch, world_size: int, decode_rank: bool, decode_cost: float, parts: int, feedback
) -> None:
    plan = PipelinePlan(NUM_STEPS, world_size, decode_rank=decode_rank, decode_cost=decode_cost, parts=parts)
    fb = Feedback(source=feedback[0], target=feedback[1], shape=(4, 6), dtype=torch.bfloat16)
    p2p = InOrderP2P(world_size)
    monkeypatch.setattr(tpp, "dist", p2p)

    def rank_main(rank: int) -> list:
        stages = PartStages(decodes=rank == plan.decoder)
        report = run_rank(
            plan, rank, stages, NUM_BLOCKS, SHAPE, torch.bfloat16, torch.device("cpu"), fb, hidden_shape=SHAPE
        )
        return report.outputs

    outputs = run_threads(p2p, world_size, rank_main)[plan.decoder]
    expected = run_sequential(PartStages(decodes=True), NUM_BLOCKS, NUM_STEPS, fb).outputs
    assert len(outputs) == NUM_BLOCKS
    for got, want in zip(outputs, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert all(not q for q in p2p.queues), "every operation was matched"

"""Timestep-forcing pipeline parallelism: denoising steps spread over ranks, blocks flow through.

Each block of latents is denoised by `num_steps` sequential steps, and step s of every block reads
and writes only step s's own state (its KV caches). So step s can live on its own rank: rank r owns
a contiguous range of steps and their caches, receives a block's latents from rank r−1, runs its
steps, and sends the latents on. Ranks work on consecutive blocks at the same time, like an assembly
line, and only the small block latents ever cross between GPUs. The decoder (VAE) runs on the last
rank, or on a rank of its own (`decode_rank=True`) so decoding block b overlaps denoising block b+1.

With one rank and no decode rank this is exactly the sequential loop (`run_sequential`), which is
also the reference the parallel schedule must reproduce bit for bit.

Balancing (`decode_cost`, `parts`): whole steps per rank leave the decoding rank with a step *and*
the decode, and the pipeline runs at the pace of that rank. When the stages can cut a step into
`parts` (the DiT: its layers), the rank boundaries are placed so every rank has the same work,
counting the decode on the last one; a boundary inside a step hands over the step's input latents
and the hidden state after the last part done (`BlockStages.denoise_part`). Each part's caches still
live on exactly one rank.

Generic: the caller supplies `BlockStages` (noise, one denoising step, decode); nothing here knows
what the latents mean.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Feedback:
    """A tensor derived from block `source`'s final latents that every denoising rank needs before
    block `target` (e.g. a refreshed conditioning frame). It travels point to point, early, so no
    rank waits for it unless it is truly not ready."""

    source: int
    target: int
    shape: tuple[int, ...]
    dtype: torch.dtype

    def __post_init__(self) -> None:
        if self.target <= self.source:
            raise ValueError(f"feedback from block {self.source} must be used by a later block, not {self.target}")


class BlockStages(Protocol):
    """What one rank needs to do its share; build it per rank so each holds only its own steps' state."""

    def noise(self, block: int) -> torch.Tensor:
        """Initial latents of `block` (called on the first rank only)."""

    def denoise(self, step: int, block: int, x: torch.Tensor) -> torch.Tensor:
        """Denoising step `step` of `block`; reads and updates that step's own caches."""

    def denoise_part(
        self, step: int, block: int, x: torch.Tensor, hidden: torch.Tensor | None, start: int, end: int
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Parts [start, end) of step `step` (only for plans with `parts` > 1): `x` is the step's input,
        `hidden` the state after part start−1 (None when start is 0). Returns (x, hidden after end−1)
        while the step is unfinished, (the step's output, None) once end is the last part."""

    def decode(self, block: int, x: torch.Tensor) -> Any:
        """Final latents → output (called on the decoding rank, blocks in order)."""

    def feedback_out(self, block: int, x: torch.Tensor) -> torch.Tensor:
        """Feedback tensor from the final latents of `Feedback.source` (only if feedback is used)."""

    def feedback_in(self, value: torch.Tensor) -> None:
        """Apply the feedback before denoising `Feedback.target` (only if feedback is used)."""


@dataclass(frozen=True)
class Span:
    """Parts [start, end) of denoising step `step` (a step has `parts` parts)."""

    step: int
    start: int
    end: int
    parts: int

    @property
    def whole(self) -> bool:
        return self.start == 0 and self.end == self.parts


@dataclass(frozen=True)
class PipelinePlan:
    """Which rank runs which steps (or parts of steps), and who decodes."""

    num_steps: int
    world_size: int
    decode_rank: bool = False
    decode_cost: float = 0.0
    """The decode's time in units of one step's; > 0 balances the ranks with the decode counted."""
    parts: int = 1
    """Pieces a step may be cut into (1: rank boundaries only between whole steps)."""
    lead_cost: float = 0.0
    """Work only the first rank does per block, in units of one step's (the live audio features it
    computes for every rank, `RankPipe.share`); counted like `decode_cost` when balancing."""

    def __post_init__(self) -> None:
        if self.num_steps < 1 or self.denoise_ranks < 1:
            raise ValueError(f"need ≥1 step and ≥1 denoising rank (steps={self.num_steps}, world={self.world_size})")
        if self.denoise_ranks > self.num_steps * self.parts:
            raise ValueError(
                f"{self.denoise_ranks} denoising ranks but only {self.num_steps} steps of {self.parts} part(s)"
            )
        if self.decode_cost < 0 or self.lead_cost < 0:
            raise ValueError("decode_cost and lead_cost must be ≥ 0")

    @property
    def denoise_ranks(self) -> int:
        return self.world_size - 1 if self.decode_rank else self.world_size

    @property
    def decoder(self) -> int:
        return self.world_size - 1

    def steps_of(self, rank: int) -> list[int]:
        """The steps this rank runs all or part of."""
        return sorted({span.step for span in self.spans_of(rank)})

    def spans_of(self, rank: int) -> list[Span]:
        """This rank's contiguous share of the block's work, in order."""
        if rank >= self.denoise_ranks:
            return []
        bounds, p = self._bounds(), self.parts
        lo, hi = bounds[rank], bounds[rank + 1]
        spans = []
        for step in range(lo // p, -(-hi // p)):
            start, end = max(lo, step * p) - step * p, min(hi, (step + 1) * p) - step * p
            spans.append(Span(step, start, end, p))
        return spans

    def _bounds(self) -> list[int]:
        """Rank boundaries in parts, from 0 to num_steps·parts. Unbalanced: whole steps, earlier ranks
        take the extra ones. Balanced: equal work with the decode on the last denoising rank and the
        lead work on the first."""
        n, total = self.denoise_ranks, self.num_steps * self.parts
        if self.decode_cost == 0 and self.lead_cost == 0 and self.parts == 1:
            base, extra = divmod(self.num_steps, n)
            return [(r * base + min(r, extra)) * self.parts for r in range(n + 1)]
        decode = 0.0 if self.decode_rank else self.decode_cost
        share = (self.num_steps + decode + self.lead_cost) / n * self.parts
        lead = self.lead_cost * self.parts
        bounds = [0] + [min(round(r * share - lead), total - (n - r)) for r in range(1, n)] + [total]
        for r in range(1, n):  # every rank keeps at least one part
            bounds[r] = max(bounds[r], bounds[r - 1] + 1)
        return bounds


@dataclass
class RankReport:
    """Per-rank timings. `started_at` (first rank) and `decoded_at` (decoding rank) are wall-clock
    `time.time()` stamps, comparable across the processes of one host."""

    rank: int
    steps: list[int]
    step_ms: dict[int, list[float]] = field(default_factory=dict)
    decode_ms: list[float] = field(default_factory=list)
    started_at: list[float] = field(default_factory=list)
    decoded_at: list[float] = field(default_factory=list)
    wait_ms: list[float] = field(default_factory=list)
    """Per block, the wait for the rank before (its latents)."""
    hold_ms: list[float] = field(default_factory=list)
    """Per block, the wait for the next rank to take this rank's previous block (back-pressure)."""
    outputs: list[Any] = field(default_factory=list)


# `fn` is called with no arguments; Callable[..., Any] because the callers bind loop variables as lambda
# defaults, which mypy cannot match to Callable[[], Any] (python/mypy#15459)
def _timed(fn: Callable[..., Any], sync: Callable[[], None]) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    sync()
    return out, (time.perf_counter() - start) * 1e3


def run_sequential(
    stages: BlockStages,
    num_blocks: int,
    num_steps: int,
    feedback: Feedback | None = None,
    sync: Callable[[], None] = lambda: None,
) -> RankReport:
    """All steps and the decode in one process, block after block: the reference schedule."""
    report = RankReport(rank=0, steps=list(range(num_steps)))
    pending: Any = None  # set at feedback.source, which comes before feedback.target
    for block in range(num_blocks):
        report.started_at.append(time.time())
        if feedback is not None and block == feedback.target:
            stages.feedback_in(pending)
        x = stages.noise(block)
        for s in range(num_steps):
            x, ms = _timed(lambda s=s, x=x, b=block: stages.denoise(s, b, x), sync)
            report.step_ms.setdefault(s, []).append(ms)
        if feedback is not None and block == feedback.source:
            pending = stages.feedback_out(block, x)
        out, ms = _timed(lambda x=x, b=block: stages.decode(b, x), sync)
        report.decode_ms.append(ms)
        report.decoded_at.append(time.time())
        report.outputs.append(out)
    return report


def run_rank(
    plan: PipelinePlan,
    rank: int,
    stages: BlockStages,
    num_blocks: int,
    latent_shape: tuple[int, ...],
    latent_dtype: torch.dtype,
    device: torch.device,
    feedback: Feedback | None = None,
    sync: Callable[[], None] = lambda: None,
    hidden_shape: tuple[int, ...] | None = None,
) -> RankReport:
    """This rank's share of the pipeline; every rank of `plan.world_size` calls it (process group up).

    `hidden_shape` (in `latent_dtype`) is what crosses a boundary inside a step, with the latents."""
    pipe = RankPipe(plan, rank, latent_dtype, device, sync)
    report = RankReport(rank=rank, steps=pipe.steps)
    link = FeedbackLink(feedback, num_blocks)
    for block in range(num_blocks):
        out = pipe.block(stages, block, latent_shape, hidden_shape, link, report)
        if pipe.decodes:
            report.outputs.append(out)
    pipe.finish()
    return report


@dataclass(eq=False)
class FeedbackLink:
    """One stream's feedback on this rank (`Feedback`): the value the last denoising rank keeps, the
    receive the others posted. A server rank keeps one per session, since sessions interleave."""

    feedback: Feedback | None
    num_blocks: int | None = None
    """Blocks the stream will have (None: open-ended, a live session): no feedback for a target past it."""
    pending: torch.Tensor | None = None
    recv: tuple[Any, torch.Tensor] | None = None

    def wanted(self, block: int) -> bool:
        fb = self.feedback
        return fb is not None and block == fb.source and (self.num_blocks is None or fb.target < self.num_blocks)


class RankPipe:
    """This rank's end of the pipeline, one block at a time: receive the block's latents (and the
    hidden state when a step is cut here), run this rank's spans, send them on or decode.

    `run_rank` calls `block` for consecutive blocks of one stream; a server rank calls it for the
    blocks of several streams as they come, each with its own stages and `FeedbackLink`. Every rank
    must see the same sequence of blocks: NCCL matches point-to-point operations in order.
    """

    def __init__(
        self, plan: PipelinePlan, rank: int, latent_dtype: torch.dtype, device: torch.device,
        sync: Callable[[], None] = lambda: None,
    ) -> None:  # fmt: skip
        self.plan, self.rank, self.dtype, self.device, self.sync = plan, rank, latent_dtype, device, sync
        self.spans = plan.spans_of(rank)
        self.steps = plan.steps_of(rank)
        spans = self.spans
        self.cut_in = bool(spans) and spans[0].start > 0
        self.cut_out = bool(spans) and spans[-1].end < spans[-1].parts and rank + 1 < plan.denoise_ranks
        self.last_denoiser = plan.denoise_ranks - 1
        self.decodes = rank == plan.decoder
        self._sends: list[Any] = []  # in-flight isends; their tensors must stay alive until completed
        self._last_send: list[Any] | None = None
        self._side: torch.Tensor | None = None  # `share`'s value, to send on with this block

    def block(
        self,
        stages: BlockStages,
        block: int,
        latent_shape: tuple[int, ...],
        hidden_shape: tuple[int, ...] | None = None,
        link: FeedbackLink | None = None,
        report: RankReport | None = None,
    ) -> Any:
        """Run this rank's share of `block`; returns the decoded output on the decoding rank, else None.
        Raises ValueError when the plan cuts a step here and `hidden_shape` is missing."""
        if (self.cut_in or self.cut_out) and hidden_shape is None:
            raise ValueError("this plan cuts a step between ranks: the block needs hidden_shape")
        rank, sync = self.rank, self.sync
        report = report if report is not None else RankReport(rank=rank, steps=self.steps)
        link = link if link is not None else FeedbackLink(None)
        feedback = link.feedback
        if rank == 0:
            report.started_at.append(time.time())
        if self.steps and feedback is not None and block == feedback.target:
            if rank != self.last_denoiser and link.recv is not None:
                work, value = link.recv
                work.wait()
                link.recv = None
                stages.feedback_in(value)
            elif rank == self.last_denoiser:
                assert link.pending is not None  # kept at feedback.source, an earlier block
                stages.feedback_in(link.pending)
        wait_start = time.perf_counter()
        hidden = None
        if rank == 0:
            x = stages.noise(block)
        else:
            x = torch.empty(latent_shape, dtype=self.dtype, device=self.device)
            _recv(x, rank - 1)
            if self.cut_in:
                assert hidden_shape is not None  # checked above
                hidden = torch.empty(hidden_shape, dtype=self.dtype, device=self.device)
                _recv(hidden, rank - 1)
            sync()
        report.wait_ms.append((time.perf_counter() - wait_start) * 1e3)
        for span in self.spans:
            if span.whole:
                x, ms = _timed(lambda s=span.step, x=x, b=block: stages.denoise(s, b, x), sync)
            else:
                (x, hidden), ms = _timed(
                    lambda sp=span, x=x, h=hidden, b=block: stages.denoise_part(sp.step, b, x, h, sp.start, sp.end),
                    sync,
                )
            report.step_ms.setdefault(span.step, []).append(ms)
        if rank == self.last_denoiser and link.wanted(block):
            link.pending = stages.feedback_out(block, x)
            self._sends += [_isend(link.pending, r) for r in range(self.last_denoiser)]
        if self.decodes:
            self._sends = [w for w in self._sends if not w[0].is_completed()]  # let done feedback sends go
            out, ms = _timed(lambda x=x, b=block: stages.decode(b, x), sync)
            report.decode_ms.append(ms)
            report.decoded_at.append(time.time())
            return out
        # at most one block in flight per link: without this back-pressure a fast rank runs
        # ahead of a slow one and blocks pile up between them, so latency grows without bound
        held = time.perf_counter()
        if self._last_send is not None:
            _wait(self._last_send[-1][0])
        report.hold_ms.append((time.perf_counter() - held) * 1e3)
        side, self._side = self._side, None
        self._last_send = ([_isend(side, rank + 1)] if side is not None else []) + [_isend(x, rank + 1)]
        if self.cut_out:
            assert hidden is not None  # a step cut at this rank's end hands on its hidden state
            self._last_send.append(_isend(hidden, rank + 1))
        self._sends += self._last_send
        self._sends = [w for w in self._sends if not w[0].is_completed()]
        if rank < self.last_denoiser and link.wanted(block):
            # Post the feedback receive now, in the order the last rank sends it (right after this
            # block). NCCL runs one communicator's point-to-point ops in order: a receive posted
            # only at the target block would sit behind this rank's later block sends, which wait
            # for ranks that wait for the feedback send: a deadlock once hand-offs are too large
            # for NCCL to buffer (a step cut between ranks sends the token stream, 32 MB).
            assert feedback is not None
            value = torch.empty(feedback.shape, dtype=feedback.dtype, device=self.device)
            link.recv = (dist.irecv(_wire(value), self.last_denoiser), value)
        return None

    def share(self, value: torch.Tensor | None, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor | None:
        """A per-block input that only the first rank computes (`value`; the others pass None), passed
        down the chain of denoising ranks with the block: rank r receives it here from r-1, and its
        `block` sends it on to r+1 just before the latents. Every hand-off thus stays between neighbours,
        in the order of the latents: a process's point-to-point ops run one after another on NCCL's
        stream, so a send from rank 0 straight to rank 2 would hold rank 0's next send to rank 1 until
        rank 2 was free. Call it on every rank before that block's `block`. Returns the value on
        denoising ranks, None on a decode-only rank."""
        if not self.steps:
            return None
        if self.rank == 0:
            assert value is not None  # the first rank computes it
            out = value
        else:
            out = torch.empty(shape, dtype=dtype, device=self.device)
            _recv(out, self.rank - 1)
        self._side = out if self.rank < self.last_denoiser else None
        return out

    def finish(self) -> None:
        """Wait until every send of this rank is out (before tearing the process group down)."""
        for work, _ in self._sends:
            work.wait()
        self._sends = []


def _wait(work: Any) -> None:
    """Block the host until a send is done. NCCL's `wait` only orders streams, so poll its event;
    gloo marks a send complete only inside `wait`, which blocks until the bytes are out."""
    if dist.get_backend() != "nccl":
        work.wait()
        return
    while not work.is_completed():
        time.sleep(2e-4)


def _wire(t: torch.Tensor) -> torch.Tensor:
    """gloo has no bfloat16 transport; the bits travel as int16 and are viewed back on arrival."""
    return t.view(torch.int16) if t.dtype == torch.bfloat16 and dist.get_backend() == "gloo" else t


def _isend(t: torch.Tensor, dst: int) -> tuple[Any, torch.Tensor]:
    t = _wire(t.contiguous())
    return dist.isend(t, dst), t


def _recv(t: torch.Tensor, src: int) -> None:
    dist.recv(_wire(t), src)

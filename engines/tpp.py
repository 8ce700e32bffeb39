"""Timestep-forcing pipeline parallelism: denoising steps spread over ranks, blocks flow through.

Each block of latents is denoised by `num_steps` sequential steps, and step s of every block reads
and writes only step s's own state (its KV caches). So step s can live on its own rank: rank r owns
a contiguous range of steps and their caches, receives a block's latents from rank r−1, runs its
steps, and sends the latents on. Ranks work on consecutive blocks at the same time, like an assembly
line, and only the small block latents ever cross between GPUs. The decoder (VAE) runs on the last
rank, or on a rank of its own (`decode_rank=True`) so decoding block b overlaps denoising block b+1.

With one rank and no decode rank this is exactly the sequential loop (`run_sequential`), which is
also the reference the parallel schedule must reproduce bit for bit.

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


class BlockStages(Protocol):
    """What one rank needs to do its share; build it per rank so each holds only its own steps' state."""

    def noise(self, block: int) -> torch.Tensor:
        """Initial latents of `block` (called on the first rank only)."""

    def denoise(self, step: int, block: int, x: torch.Tensor) -> torch.Tensor:
        """Denoising step `step` of `block`; reads and updates that step's own caches."""

    def decode(self, block: int, x: torch.Tensor) -> Any:
        """Final latents → output (called on the decoding rank, blocks in order)."""

    def feedback_out(self, block: int, x: torch.Tensor) -> torch.Tensor:
        """Feedback tensor from the final latents of `Feedback.source` (only if feedback is used)."""

    def feedback_in(self, value: torch.Tensor) -> None:
        """Apply the feedback before denoising `Feedback.target` (only if feedback is used)."""


@dataclass(frozen=True)
class PipelinePlan:
    """Which rank runs which steps, and who decodes."""

    num_steps: int
    world_size: int
    decode_rank: bool = False

    def __post_init__(self) -> None:
        if self.num_steps < 1 or self.denoise_ranks < 1:
            raise ValueError(f"need ≥1 step and ≥1 denoising rank (steps={self.num_steps}, world={self.world_size})")
        if self.denoise_ranks > self.num_steps:
            raise ValueError(f"{self.denoise_ranks} denoising ranks but only {self.num_steps} steps")

    @property
    def denoise_ranks(self) -> int:
        return self.world_size - 1 if self.decode_rank else self.world_size

    @property
    def decoder(self) -> int:
        return self.world_size - 1

    def steps_of(self, rank: int) -> list[int]:
        """Contiguous split; earlier ranks take the extra steps when they do not divide evenly."""
        if rank >= self.denoise_ranks:
            return []
        base, extra = divmod(self.num_steps, self.denoise_ranks)
        start = rank * base + min(rank, extra)
        return list(range(start, start + base + (rank < extra)))


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
    outputs: list[Any] = field(default_factory=list)


def _timed(fn: Callable[[], Any], sync: Callable[[], None]) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    sync()
    return out, (time.perf_counter() - start) * 1e3


def run_sequential(
    stages: BlockStages, num_blocks: int, num_steps: int, feedback: Feedback | None = None, sync: Callable[[], None] = lambda: None
) -> RankReport:
    """All steps and the decode in one process, block after block: the reference schedule."""
    report = RankReport(rank=0, steps=list(range(num_steps)))
    pending = None
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
) -> RankReport:
    """This rank's share of the pipeline; every rank of `plan.world_size` calls it (process group up)."""
    steps = plan.steps_of(rank)
    report = RankReport(rank=rank, steps=steps)
    last_denoiser = plan.denoise_ranks - 1
    decodes = rank == plan.decoder
    sends: list[Any] = []  # in-flight isends; their tensors must stay alive until completed
    fb_pending: Any = None
    last_send = None
    for block in range(num_blocks):
        if rank == 0:
            report.started_at.append(time.time())
        if steps and feedback is not None and block == feedback.target:
            if rank != last_denoiser:
                value = torch.empty(feedback.shape, dtype=feedback.dtype, device=device)
                _recv(value, last_denoiser)
                stages.feedback_in(value)
            else:
                stages.feedback_in(fb_pending)
        wait_start = time.perf_counter()
        if rank == 0:
            x = stages.noise(block)
        else:
            x = torch.empty(latent_shape, dtype=latent_dtype, device=device)
            _recv(x, rank - 1)
            sync()
        report.wait_ms.append((time.perf_counter() - wait_start) * 1e3)
        for s in steps:
            x, ms = _timed(lambda s=s, x=x, b=block: stages.denoise(s, b, x), sync)
            report.step_ms.setdefault(s, []).append(ms)
        if rank == last_denoiser and feedback is not None and block == feedback.source and feedback.target < num_blocks:
            fb_pending = stages.feedback_out(block, x)
            sends += [_isend(fb_pending, r) for r in range(last_denoiser)]
        if decodes:
            out, ms = _timed(lambda x=x, b=block: stages.decode(b, x), sync)
            report.decode_ms.append(ms)
            report.decoded_at.append(time.time())
            report.outputs.append(out)
        else:
            # at most one block in flight per link: without this back-pressure a fast rank runs
            # ahead of a slow one and blocks pile up between them, so latency grows without bound
            if last_send is not None:
                _wait(last_send[0])
            last_send = _isend(x, rank + 1)
            sends.append(last_send)
            sends = [w for w in sends if not w[0].is_completed()]
    for work, _ in sends:
        work.wait()
    return report


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

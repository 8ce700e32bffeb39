"""Warm the `liveavatar` backend up before serving and measure what a block costs.

torch.compile's graph capture and autotuning (a minute or more for the 14B DiT and the VAE) happen in
throw-away sessions at start-up, not in the first viewer's session; the warm-up's steady blocks then
say what a block costs (`BlockCosts`), from which the server plans whether a session keeps real time.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from liveavatar.backends.base import BlockCosts
from liveavatar.generator import AudioWindow, AvatarSpec, Generator
from liveavatar.media_io import default_portrait_path, load_image

log = logging.getLogger(__name__)

PIPELINED_WARM_UP_BLOCKS = 5
"""A pipelined set's warm-up: the shapes (blocks 1..5, docs of `warm_up`) without the steady blocks,
which `measure_pipeline` then runs with blocks in flight."""

_WARM_UP_STAGES = {
    1: "compiling the DiT blocks, RoPE and the VAE decoder, or loading them from the compile cache",
    2: "KV window of 6 frames", 3: "KV window of 9 frames", 4: "full KV window",
    5: "adaptive-sink prefill",
}  # fmt: skip
"""What each warm-up block compiles, for the start-up log."""


def warm_up(generator: Generator, blocks: int = 8) -> list[Any]:
    """Run a throw-away session at the default size before serving, so torch.compile's graph capture
    and autotuning (a minute or more for the 14B DiT and the VAE) happen at start-up, not in the first
    viewer's session. Five blocks cover every shape a stream goes through: the KV window growing over
    the first clip (3, 6, 9, 12 frames) and the adaptive-sink prefill at block 5; the compiled VAE
    meets its one compiled variant while the session opens (`StreamingDecoder.new_state`). Blocks 6..8
    run the steady state and measure the block costs that say whether a session keeps real time. (Until
    2026-11-30 the decoder's caches kept non-canonical strides and the VAE recompiled up to block 8, so
    the warm-up ran 10 blocks.) A second, two-block session checks that a fresh session compiles nothing.
    Returns the steady blocks' stage profiles (`BlockProfile`s; empty for a generator that keeps none)."""
    began = time.perf_counter()
    steady: list[Any] = []
    image = load_image(default_portrait_path())
    total, done = blocks + 2, 0
    for session, n in enumerate((blocks, 2)):
        state = generator.open(AvatarSpec(image, f"warm-up {session}", seed=session), generator.default_size)
        try:
            for i in range(n):
                silence = np.zeros(generator.audio_samples_per_block, np.float32)
                block_began = time.perf_counter()
                generator.step(state, AudioWindow(silence, index=i))
                done += 1
                log.info(
                    "warm-up block %d/%d at %s: %.1f s (%s)", done, total, generator.default_size,
                    time.perf_counter() - block_began,
                    "a second session: fresh decoder cache" if session else _WARM_UP_STAGES.get(done, "steady state"),
                )  # fmt: skip
            if session == 0:  # its last blocks run the steady state: the block costs of real time
                steady = generator.block_profiles(state)[-3:]  # the compiler has met every shape by then
        finally:
            generator.close(state)
    if generator.max_batch > 1:
        warm_up_batching(generator, image)
    seconds = time.perf_counter() - began
    log.info("warm-up: %d + 2 blocks at %s in %.1f s (compiled kernels ready)", blocks, generator.default_size, seconds)
    return steady


def warm_up_batching(generator: Any, image: np.ndarray, batched: int = 3) -> bool:
    """Where the generator batches sessions' blocks (`step_batch`) at its default size: compile and capture
    the batched forward now, not in the first two viewers' sessions, and measure whether it pays here.
    Two throw-away sessions make 6 blocks each alone (ring full, adaptive sink done, the last one steady
    alone), then `batched` blocks together (the first compiles and captures, the others are timed). The
    DiT time of a block in a batch (its share) against alone decides; batching is turned off where it is
    not faster (`LiveAvatarGenerator.disable_batching`). Returns whether batching stays on."""
    size = generator.default_size
    states = [generator.open(AvatarSpec(image, f"warm-up batch {i}", seed=20 + i), size) for i in range(2)]
    try:
        silence = np.zeros(generator.audio_samples_per_block, np.float32)
        for i in range(6):
            for state in states:
                generator.step(state, AudioWindow(silence, index=i))
        windows = [AudioWindow(silence, index=6) for _ in states]
        keys = {generator.batch_key(state, w) for state, w in zip(states, windows, strict=True)}
        if None in keys or len(keys) > 1:
            log.info("batching: not at %s (the generator does not batch this size)", size)
            return False
        alone = [_dit_ms(generator.block_profiles(state)[-1]) for state in states]
        shares = []
        for i in range(6, 6 + batched):
            began = time.perf_counter()
            results = generator.step_batch([(state, AudioWindow(silence, index=i)) for state in states])
            failed = next((r for r in results if isinstance(r, BaseException)), None)
            if failed is not None or generator.batch_off is not None:  # it fell back to one by one
                if generator.batch_off is None:
                    generator.disable_batching(f"a batched warm-up block failed: {failed!r}")
                log.warning("batching: off (%s)", generator.batch_off)
                return False
            log.info("warm-up batch block %d/%d at %s: %.1f s", i - 5, batched, size, time.perf_counter() - began)
            if i > 6:
                shares += [_dit_ms(generator.block_profiles(state)[-1]) for state in states]
        one, share = sorted(alone)[0], sorted(shares)[len(shares) // 2]
        verdict = f"{share:.0f} ms of DiT per block in a batch of 2 against {one:.0f} ms alone at {size}"
        if share >= one:
            generator.disable_batching(f"slower than one by one here ({verdict})")
            return False
        log.info("batching: on (%s, %.2f)", verdict, share / one)
        return True
    finally:
        for state in states:
            generator.close(state)


def _dit_ms(profile: Any) -> float:
    """A block's DiT time: on the GPU's timeline where measured (the host returns before the kernels end)."""
    return profile.gpu_dit_ms if profile.gpu_dit_ms is not None else profile.dit_ms


def steady_costs(profile: list[Any], generator: Generator) -> BlockCosts:
    """The block costs from the warm-up's steady blocks (`BlockProfile`s): the median block of the last
    three (a late recompile only ever adds time). Measured with no session streaming, so where the step
    is launch-bound a live session can be slower than this."""
    block = sorted(profile, key=lambda p: p.total_ms)[len(profile) // 2]
    return BlockCosts(
        generator.default_size, generator.sample_steps,
        fixed_s=(block.audio_ms + block.vae_ms) / 1e3, per_step_s=block.dit_ms / block.steps / 1e3,
    )  # fmt: skip


def measure_pipeline(generator: Any, blocks: int = 10) -> float:
    """The block interval of a pipelined set when full: a throw-away session submits `blocks` blocks of
    silence at once and the median gap between consecutive blocks coming back is the answer, seconds.
    Run after `warm_up` (every shape compiled)."""
    state = generator.open(
        AvatarSpec(load_image(default_portrait_path()), "pipeline measure", seed=7), generator.default_size
    )
    try:
        silence = np.zeros(generator.audio_samples_per_block, np.float32)
        futures = [generator.submit(state, AudioWindow(silence, index=i)) for i in range(blocks)]
        arrivals = []
        for future in futures:
            future.result(timeout=600)
            arrivals.append(time.perf_counter())
    finally:
        generator.close(state)
    gaps = sorted(b - a for a, b in zip(arrivals[1:], arrivals[2:], strict=False))  # the first one fills the pipe
    interval = gaps[len(gaps) // 2]
    ranks = generator.rank_seconds() or []
    log.info(
        "pipelined set %s: one block every %.0f ms when full (%d blocks submitted at once; busy per rank %s ms, "
        "plan %s)",
        "+".join(generator.devices),
        interval * 1e3,
        blocks,
        " / ".join(f"{r * 1e3:.0f}" for r in ranks),
        generator.plan,
    )
    return interval

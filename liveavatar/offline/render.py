"""The offline render loop: audio in, MP4 out, through any `Generator`, one block at a time.

It drives a backend exactly as the live server does (one `AudioWindow` per block, with context), so an
offline video is what a live session would have shown. Several segments make one continuous stream:
each segment's audio is padded to a whole block, so every identity switch falls on a block boundary and
the session state (caches, motion, RNG) carries straight on; nothing is re-initialised at the seam.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from liveavatar.generator import AudioWindow, AvatarSpec, Generator, Size
from liveavatar.offline.mux import Mp4Writer

log = logging.getLogger(__name__)

CONTEXT_SECONDS = 2.0
"""Audio before each block handed to the backend, as the live segmenter does."""
SPEECH_DBFS = -45.0


class OutputError(Exception):
    """The video cannot be written (disk full, no permission, a read-only folder): one line naming the
    output and the cause, for the CLI to print as-is; nothing is left behind."""

    def __init__(self, output: Path, exc: OSError) -> None:
        cause = exc.strerror or (os.strerror(exc.errno) if exc.errno else str(exc))
        super().__init__(f"cannot write {output}: {cause}")


@dataclass(frozen=True, eq=False)
class RenderSegment:
    spec: AvatarSpec
    audio: np.ndarray
    """Mono float32 at the generator's sample rate."""
    transition: int = 0
    """Frames over which the previous segment's last frame fades into this one (0: a clean cut)."""


@dataclass
class RenderResult:
    output: Path
    frames: int
    blocks: int
    seconds: float
    audio_seconds: float
    switch_frames: list[int] = field(default_factory=list)

    @property
    def fps(self) -> float:
        """Generation speed: frames produced per wall-clock second (25 would be real time)."""
        return self.frames / self.seconds if self.seconds else 0.0


def is_speech(samples: np.ndarray, rate: int) -> bool:
    """A cheap stand-in for the live VAD: does a tenth of the block's 20 ms frames carry sound?"""
    frame = rate // 50
    n = len(samples) // frame
    if n == 0:
        return False
    level = 10 * np.log10(np.mean(samples[: n * frame].reshape(n, frame) ** 2, axis=1) + 1e-12)
    return bool(np.mean(level > SPEECH_DBFS) >= 0.1)


def render(
    generator: Generator,
    segments: list[RenderSegment],
    size: Size,
    output: str | Path,
    max_frames: int | None = None,
    progress: bool = True,
    label: str = "generate",
    online_decode: bool = True,
) -> RenderResult:
    """Generate the whole video into `output` (written to a temporary name, renamed when complete).

    With `online_decode` off, a backend that can split a block into DiT and VAE halves (`step_latents`
    / `decode_latents`, the diffusion backend) makes every block's latents first and decodes them all
    afterwards, as the original does without `--enable_online_decode`: the decode is causal and
    chunk-exact, so the video is the same; only when memory is used (and, with model offloading, how
    often the stages swap) differs. Backends without the split (preview) always decode online."""
    if not segments:
        raise ValueError("nothing to render: no segments")
    rate, fps, fpb = generator.sample_rate, generator.fps, generator.frames_per_block
    block = generator.audio_samples_per_block
    per_frame = rate / fps
    # Every segment but the last is padded to whole blocks so the next one starts on a block boundary.
    parts = [np.pad(s.audio, (0, -len(s.audio) % block)) for s in segments[:-1]] + [segments[-1].audio]
    starts = np.cumsum([0] + [len(p) // block for p in parts[:-1]]).tolist()
    stream = np.concatenate(parts).astype(np.float32)
    frames_total = math.ceil(len(stream) / per_frame)
    if max_frames is not None:
        frames_total = min(frames_total, max_frames)
    if frames_total <= 0:
        raise ValueError("the audio is too short to make a single frame")
    blocks = math.ceil(frames_total / fpb)
    audio_total = min(len(stream), round(frames_total * per_frame))
    padded = np.pad(stream, (0, max(0, blocks * block - len(stream))))
    context = int(CONTEXT_SECONDS * rate)

    output = Path(output)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(output, exc) from None
    partial = output.with_name(output.stem + ".partial" + output.suffix)
    segment_at_block = {b: i for i, b in enumerate(starts)}
    result = RenderResult(output, 0, blocks, 0.0, audio_total / rate)
    state = generator.open(segments[0].spec, size)
    deferred = not online_decode and generator.defers_decode
    began = time.perf_counter()
    bar = tqdm(total=blocks, unit="block", desc=label, disable=not progress, leave=False, dynamic_ncols=True)
    transitions = {b: segments[i].transition for b, i in segment_at_block.items() if i > 0}
    fade_from: np.ndarray | None = None
    fade_len = 0
    last_frame: np.ndarray | None = None
    latents: list = []

    def emit(writer: Mp4Writer, b: int, frames: np.ndarray) -> None:
        nonlocal fade_from, fade_len, last_frame
        if b in transitions:
            fade_from, fade_len = last_frame, transitions[b]
        if fade_from is not None and fade_len > 0:
            frames = _cross_fade(fade_from, frames, b * fpb - result.switch_frames[-1], fade_len)
        keep = min(fpb, frames_total - result.frames)
        writer.write_frames(frames[:keep])
        a0, a1 = round(result.frames * per_frame), min(audio_total, round((result.frames + keep) * per_frame))
        writer.write_audio(stream[a0:a1])
        result.frames += keep
        last_frame = frames[keep - 1]
        bar.set_postfix_str(f"{result.frames / max(time.perf_counter() - began, 1e-9):.1f} fps")

    try:
        with Mp4Writer(partial, size.width, size.height, fps=fps, sample_rate=rate) as writer:
            for b in range(blocks):
                if b in transitions:
                    generator.switch(state, segments[segment_at_block[b]].spec)
                    result.switch_frames.append(b * fpb)
                lo = b * block
                window = AudioWindow(
                    samples=padded[lo : lo + block],
                    context=padded[max(0, lo - context) : lo],
                    speech=is_speech(padded[lo : lo + block], rate),
                    index=b,
                )
                if deferred:
                    latents.append(generator.step_latents(state, window))
                    bar.set_postfix_str(f"denoised {b + 1}/{blocks}, decoding after the last")
                else:
                    emit(writer, b, generator.step(state, window))
                bar.update(1)
            for b, block_latents in enumerate(latents):
                emit(writer, b, generator.decode_latents(state, block_latents))
    except BaseException as exc:
        partial.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise OutputError(output, exc) from None
        raise
    finally:
        bar.close()
        generator.close(state)
    try:
        partial.replace(output)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise OutputError(output, exc) from None
    result.seconds = time.perf_counter() - began
    log.info(
        "%s: %d frames (%.2f s) in %.1f s, %.1f fps with the %s backend",
        output,
        result.frames,
        result.frames / fps,
        result.seconds,
        result.fps,
        generator.name,
    )
    return result


def _cross_fade(previous: np.ndarray, frames: np.ndarray, offset: int, length: int) -> np.ndarray:
    """Blend the last frame before a switch into the first `length` frames after it."""
    out = frames.copy()
    for i in range(len(frames)):
        k = offset + i
        if k >= length:
            break
        alpha = (k + 1) / (length + 1)
        out[i] = (previous.astype(np.float32) * (1 - alpha) + frames[i].astype(np.float32) * alpha).astype(np.uint8)
    return out

"""The `liveavatar` backend: the diffusion model as a block-by-block `Generator`.

One `step` turns 0.48 s of 16 kHz audio into 12 RGB frames:
wav2vec2 features of the block (+ context) -> `StreamingDiT.step` (4 denoising forwards against the
session's KV rings and condition cache) -> 3 latent frames -> causal VAE decode with the session's
decoder cache -> 12 uint8 frames.

Per-avatar work (portrait -> reference + motion latents, prompt -> umT5 features) is cached by content,
so sessions and switches with the same avatar share it. Everything else a session owns lives in
`LiveAvatarSession`; the models are shared and hold no session state.

Sessions sharing a GPU at a small size can have their blocks made together (`step_batch`): one DiT
forward per denoising step over all of them (`StreamingDiT.denoise_batch`), the same frames each would
get alone; audio features and VAE decode stay per session. See `BATCH_FRAME_TOKENS` for when.

Exactly 12 frames per block, including the first: before the first block the decoder is warmed up on
the avatar's first 7 motion latents (the TPP reference does the same, docs/model.md §7.3), so the first
generated latent is not the stream's first and decodes to 4 frames like all others. Unlike the
reference, which then drops the first 3 frames of the video (shifting lips 3 frames ahead of the
sound), all 12 are kept: frame k of a block shows the content generated for audio frame k.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
import torch

from liveavatar.generator import AudioWindow, AvatarSpec, Generator, Size
from liveavatar.models.audio_features import AudioStats
from liveavatar.models.config import check_dit_size
from liveavatar.models.loading import Pipeline, load_pipeline
from liveavatar.models.transformer_liveavatar import frame_tokens
from liveavatar.models.vae import StreamingDecoder, VAEStreamState
from liveavatar.streaming.dit import LATENT_FRAMES_PER_BLOCK, KVRing, LatentBlock, StreamingDiT, StreamState

log = logging.getLogger(__name__)

MOTION_FRAMES = 73
"""Pixel frames of the static motion video (TPP mode, docs/model.md §6.2): 73 frames -> 19 latents."""
BATCH_FRAME_TOKENS = 512
"""Batch sessions' blocks (`step_batch`) on a GPU at this many DiT tokens per latent frame or fewer
((W/16)·(H/16): 384 at 384*256, 512 at 512*256, 1056 at 704*384). Source: bench/batching.py on an H200
(14B, compile + FP8 + fused RoPE, CUDA graphs; bench/results/2026-11-30_h200/batching.json): one
forward over two sessions' 3-frame blocks took 108.1 ms against 2 x 59.8 ms interleaved at 384*256
(0.90), 145.1 against 2 x 75.0 at 512*256 (0.97); at 704*384 the step is GPU-bound and batching gains
nothing. The warm-up measures it again at the served size and turns batching off where it does not pay
(`liveavatar.backends.liveavatar.warmup`). On the CPU nothing was measured: off unless asked for."""
DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
}


def frame_portrait(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """RGB uint8 [h0, w0, 3] -> uint8 [height, width, 3] framed as the reference does (docs/model.md §6.1): shorter
    side resized to min(height, width), then a centre crop that zero-pads where too small."""
    h0, w0 = image.shape[:2]
    short = min(height, width)
    if h0 <= w0:
        nh, nw = short, int(short * w0 / h0)
    else:
        nh, nw = int(short * h0 / w0), short
    interp = cv2.INTER_AREA if nh < h0 else cv2.INTER_LINEAR
    resized = cv2.resize(image, (nw, nh), interpolation=interp)
    pad_y, pad_x = max(0, height - nh), max(0, width - nw)
    if pad_y or pad_x:
        resized = np.pad(resized, ((pad_y // 2, pad_y - pad_y // 2), (pad_x // 2, pad_x - pad_x // 2), (0, 0)))
    top = int(round((resized.shape[0] - height) / 2.0))
    left = int(round((resized.shape[1] - width) / 2.0))
    return np.ascontiguousarray(resized[top : top + height, left : left + width])


def prepare_reference(image: np.ndarray, width: int, height: int) -> torch.Tensor:
    """RGB uint8 [h0, w0, 3] -> [3, 1, height, width] in [-1, 1]: the framed portrait (`frame_portrait`)."""
    x = torch.from_numpy(frame_portrait(image, width, height)).permute(2, 0, 1).float() / 255.0
    return (x * 2 - 1).unsqueeze(1)


def to_uint8_frames(video: torch.Tensor) -> np.ndarray:
    """[3, T, H, W] in [-1, 1] -> [T, H, W, 3] uint8 with the reference's trunc(255·(x+1)/2)."""
    x = (video.float().clamp(-1, 1) + 1) * 127.5
    return x.to(torch.uint8).permute(1, 2, 3, 0).cpu().numpy()


@dataclass(eq=False)
class AvatarLatents:
    """What the DiT is conditioned on for one portrait at one size (docs/model.md §6.2, TPP variant)."""

    ref_latent: torch.Tensor  # [16, 1, h, w]: encode(the single frame), a causal first-frame latent
    motion_latents: torch.Tensor  # [16, 19, h, w]: encode(73 copies of the frame)


@dataclass
class BlockProfile:
    """Where one block's time went, in milliseconds: host (wall) time per stage, and on CUDA the time
    between events recorded on the stream at the stage boundaries (GPU timeline, gaps included: it is
    not busy time, so equal host and GPU spans fit a GPU-bound stage and a launch-bound one alike)."""

    audio_ms: float
    dit_ms: float
    vae_ms: float
    total_ms: float
    steps: int
    gpu_audio_ms: float | None = None
    gpu_dit_ms: float | None = None
    gpu_vae_ms: float | None = None
    batch: int = 1
    """Sessions whose blocks shared this block's DiT forwards; `dit_ms` is then this block's share."""


class _StageClock:
    """Marks stage boundaries on the host clock and, on CUDA, with events on the current stream."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.host: list[float] = []
        self.events: list[Any] = []

    def mark(self) -> None:
        event = torch.cuda.Event(enable_timing=True) if self.cuda else None
        if event is not None:
            event.record()
            self.events.append(event)
        self.host.append(time.perf_counter())

    def spans(self) -> tuple[list[float], list[float] | None]:
        host = [(b - a) * 1e3 for a, b in zip(self.host, self.host[1:], strict=False)]
        if not self.cuda:
            return host, None
        try:  # the last event may still wait behind other threads' work on the stream
            self.events[-1].synchronize()
            return host, [a.elapsed_time(b) for a, b in zip(self.events, self.events[1:], strict=False)]
        except RuntimeError as exc:  # profiling must never fail a block
            log.debug("block profile without GPU times: %s", exc)
            return host, None


@dataclass(eq=False)
class LiveAvatarSession:
    """Everything one session owns: DiT stream state, VAE decoder cache, audio statistics."""

    spec: AvatarSpec
    size: Size
    stream: StreamState
    vae: VAEStreamState
    audio_stats: AudioStats = field(default_factory=AudioStats)
    pending: AvatarSpec | None = None
    blocks: int = 0
    closed: bool = False
    steps: int | None = None
    """Denoising steps for the next blocks; None: the generator's full count (see `set_sample_steps`)."""
    profile: deque[BlockProfile] = field(default_factory=lambda: deque(maxlen=64))
    """The last blocks' stage times (`step` only; offline deferred decoding is not profiled)."""

    def nbytes(self) -> int:
        return 0 if self.closed else self.stream.nbytes() + self.vae.nbytes()


class LiveAvatarGenerator(Generator):
    """LiveAvatar diffusion backend; one instance serves any number of interleaved sessions."""

    name = "liveavatar"
    step_control = True
    defers_decode = True

    def __init__(
        self,
        pipeline: Pipeline,
        sample_steps: int = 4,
        guide_scale: float = 0.0,
        default_size: Size | None = None,
        cache_entries: int = 16,
        motion_frames: int = MOTION_FRAMES,
        offload_model: bool = False,
        cuda_graphs: bool = False,
        batch_sessions: int = 1,
        batch_frame_tokens: int | None = None,
    ) -> None:
        """`cuda_graphs`: replay steady-state DiT forwards from per-session CUDA graphs
        (`StreamingDiT`); the caller must drive all sessions from one thread.

        `batch_sessions`: the most sessions whose blocks `step_batch` makes together (1, the default: never;
        the server passes 2 with `--batch-sessions`);
        `batch_frame_tokens`: only at sizes of at most this many DiT tokens per latent frame (None:
        `BATCH_FRAME_TOKENS` on a GPU, 0 = off on the CPU).

        `motion_frames` is the length of the static motion video (73 in the reference); CPU tests
        pass fewer (1 + 4k) to save VAE time, FramePack zero-fills the missing motion latents.

        `offload_model` keeps only the stage in use (DiT or VAE) on the GPU and parks the other in CPU
        memory, like the original's `--offload_model`: it fits smaller GPUs at the cost of a transfer
        at every stage change, so it pays off offline with deferred decoding (all latents first, then
        all decodes: two transfers in all) and is far too slow for live use."""
        if motion_frames < 1 or (motion_frames - 1) % 4:
            raise ValueError(f"motion_frames must be 1 + 4k, got {motion_frames}")
        self.pipeline = pipeline
        self.dit = StreamingDiT(
            pipeline.dit, sample_steps=sample_steps, guide_scale=guide_scale, cuda_graphs=cuda_graphs
        )
        self.decoder = StreamingDecoder(pipeline.vae)
        self.default_size = default_size or Size(704, 384)
        self.cache_entries = cache_entries
        self.motion_frames = motion_frames
        self.offload_model = offload_model
        self.resident: str | None = None
        """Which stage ("dit" or "vae") was last placed on the compute device by offloading."""
        self._compute_device = next(pipeline.dit.parameters()).device
        self._vae_bytes: dict[Size, int] = {}  # largest decoder cache + CUDA-graph pools seen per size, for admission
        self._latents: OrderedDict[tuple, AvatarLatents] = OrderedDict()
        self._texts: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()  # the caches are shared by worker threads
        if batch_frame_tokens is None:
            batch_frame_tokens = BATCH_FRAME_TOKENS if self._compute_device.type == "cuda" else 0
        self.batch_frame_tokens = batch_frame_tokens
        self.max_batch = max(1, batch_sessions) if batch_frame_tokens > 0 and not offload_model else 1
        self.batch_off: str | None = None
        """Why batching was turned off (a failed batched forward, or the warm-up found it slower); None: on."""

    @classmethod
    def from_options(
        cls,
        ckpt_dir: str | None = None,
        lora_path: str | None = None,
        random_weights: str | None = None,
        device: str | None = None,
        dtype: str | torch.dtype | None = None,
        sample_steps: int = 4,
        guide_scale: float = 0.0,
        size: str | Size | None = None,
        seed: int = 0,
        text_device: str | None = None,
        motion_frames: int = MOTION_FRAMES,
        offload_model: bool = False,
        cuda_graphs: bool = False,
        batch_sessions: int = 1,
        batch_frame_tokens: int | None = None,
    ) -> LiveAvatarGenerator:
        """Build from CLI-style options: real weights from `ckpt_dir` (+ `lora_path`), or random ones
        (`random_weights` "tiny": CPU tests, no files; "14b": full-size model for GPU benchmarks)."""
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if dtype is None:
            dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
        elif isinstance(dtype, str):
            if dtype not in DTYPES:
                raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
            dtype = DTYPES[dtype]
        if random_weights:
            from liveavatar.models.random_weights import random_pipeline

            pipeline = random_pipeline(random_weights, device=device, dtype=dtype, seed=seed)
            default = Size(128, 128) if random_weights == "tiny" else None
        elif ckpt_dir:
            pipeline = load_pipeline(ckpt_dir, lora_path, device=device, dtype=dtype, text_device=text_device)
            default = None
        else:
            raise ValueError("the liveavatar backend needs ckpt_dir (a checkpoint folder) or random_weights")
        if offload_model and text_device is None:
            text_device = "cpu"  # the prompt is encoded once per avatar: umT5 need never sit on the GPU
        if isinstance(size, str):
            size = Size.parse(size)
        return cls(
            pipeline,
            sample_steps=sample_steps,
            guide_scale=guide_scale,
            default_size=size or default,
            motion_frames=motion_frames,
            offload_model=offload_model,
            cuda_graphs=cuda_graphs,
            batch_sessions=batch_sessions,
            batch_frame_tokens=batch_frame_tokens,
        )

    # --- Generator ------------------------------------------------------------------------------------

    def open(self, spec: AvatarSpec, size: Size) -> LiveAvatarSession:
        check_dit_size(size.width, size.height)
        cond = self.avatar_latents(spec.image, size)
        stream = self.dit.new_state(cond.ref_latent, cond.motion_latents, self.prompt_features(spec.prompt), spec.seed)
        self._use("vae")  # the decoder warm-up runs the VAE even when the latents came from the cache
        vae_state = self.decoder.new_state(cond.motion_latents)
        log.info("liveavatar session opened at %s (seed %d)", size, spec.seed)
        return LiveAvatarSession(spec=spec, size=size, stream=stream, vae=vae_state)

    def poster(self, state: LiveAvatarSession) -> np.ndarray:
        return frame_portrait(state.spec.image, state.size.width, state.size.height)

    def step(self, state: LiveAvatarSession, window: AudioWindow) -> np.ndarray:
        clock = _StageClock(self._compute_device)
        clock.mark()
        latents = self.step_latents(state, window, clock)
        clock.mark()
        frames = self.decode_latents(state, latents)
        clock.mark()
        host, gpu = clock.spans()
        state.profile.append(
            BlockProfile(
                audio_ms=host[0],
                dit_ms=host[1],
                vae_ms=host[2],
                total_ms=sum(host),
                steps=state.steps or self.dit.sample_steps,
                gpu_audio_ms=gpu[0] if gpu else None,
                gpu_dit_ms=gpu[1] if gpu else None,
                gpu_vae_ms=gpu[2] if gpu else None,
            )
        )
        return frames

    def step_latents(
        self, state: LiveAvatarSession, window: AudioWindow, clock: _StageClock | None = None
    ) -> torch.Tensor:
        """The DiT half of `step`: the block's 3 denoised latent frames, not yet decoded. Offline
        generation without online decode calls this for every block, then `decode_latents` for each.
        `clock` (from `step`) gets a mark between the audio features and the DiT."""
        feats = self._features(state, window)
        if clock is not None:
            clock.mark()
        block = self.dit.begin_block(state.stream, feats)
        run = step_subset(self.dit.sample_steps, self._steps(state))
        for i in range(len(run)):
            denoise_step(self.dit, [state.stream], [block], run, i)
        return self._finish_block(state, block, run)

    def batch_key(self, state: LiveAvatarSession, window: AudioWindow) -> Hashable | None:
        """Blocks batch when batching is on and pays at the session's size (`BATCH_FRAME_TOKENS`), the
        window is well formed (a bad one runs, and fails, alone), no switch is pending, the denoising
        steps are the same and the DiT can share the forwards (`StreamingDiT.batch_key`)."""
        if self.max_batch < 2 or self.batch_off is not None or state.closed or state.pending is not None:
            return None
        if len(window.samples) != self.audio_samples_per_block:
            return None
        if frame_tokens(*state.stream.latent_hw) > self.batch_frame_tokens:
            return None
        key = self.dit.batch_key(state.stream)
        return None if key is None else (key, self._steps(state))

    def step_batch(self, items: Sequence[tuple[Any, AudioWindow]]) -> list[np.ndarray | Exception]:
        """The next block of several sessions with one DiT forward per denoising step for all of them;
        the audio features, the prefill-free block start and the VAE decode run per session. Each gets
        the frames `step` would give it alone. Items whose `batch_key` differs from the first's run alone.

        Failures stay per session: a bad window or a closed session fails its own item before anything
        is batched; a failure inside a batched forward turns batching off (logged) and each of its
        sessions carries on alone from the step that failed (its rings and draws are as they were),
        so only a session that also fails alone fails."""
        keys = [self.batch_key(state, window) for state, window in items]
        together = [i for i, key in enumerate(keys) if key is not None and key == keys[0]]
        if len(together) < 2:
            return super().step_batch(items)
        results: dict[int, np.ndarray | Exception] = {}
        clock = _StageClock(self._compute_device)
        clock.mark()
        blocks: dict[int, LatentBlock] = {}
        for i in together:
            state, window = items[i]
            try:
                blocks[i] = self.dit.begin_block(state.stream, self._features(state, window))
            except Exception as exc:  # this session's failure only
                results[i] = exc
            clock.mark()
        members = list(blocks)
        run = step_subset(self.dit.sample_steps, self._steps(items[members[0]][0])) if members else []
        errors = self._denoise_together([items[i][0] for i in members], [blocks[i] for i in members], run)
        clock.mark()
        for i, error in zip(members, errors, strict=True):
            state = items[i][0]
            try:
                results[i] = error or self.decode_latents(state, self._finish_block(state, blocks[i], run))
            except Exception as exc:  # this session's failure only
                results[i] = exc
            clock.mark()
        self._profile_batch(items, together, members, clock)
        for i in range(len(items)):
            if i not in together:
                results[i] = super().step_batch([items[i]])[0]
        return [results[i] for i in range(len(items))]

    def disable_batching(self, reason: str) -> None:
        """Make every block alone from now on (the worker stops grouping), saying why in the log."""
        if self.batch_off is None:
            log.warning("batching sessions' blocks turned off: %s", reason)
        self.batch_off = reason

    def _features(self, state: LiveAvatarSession, window: AudioWindow) -> torch.Tensor:
        """Check the call, apply a pending switch and compute the block's audio features [25, C, 12]."""
        if state.closed:
            raise RuntimeError("step() on a closed session")
        if len(window.samples) != self.audio_samples_per_block:
            raise ValueError(f"window has {len(window.samples)} samples, expected {self.audio_samples_per_block}")
        if state.pending is not None:
            self._apply_switch(state)
        self._use("dit")
        return self.pipeline.audio.block_features(
            window.samples, window.context, state.blocks, state.audio_stats, self.frames_per_block
        )

    def _steps(self, state: LiveAvatarSession) -> int:
        return min(state.steps or self.dit.sample_steps, self.dit.sample_steps)

    def _finish_block(self, state: LiveAvatarSession, block: LatentBlock, run: list[int]) -> torch.Tensor:
        """After the denoising: fill the rings of the steps not run, advance the session; the latents."""
        fill_skipped_rings(self.dit, state.stream, block, run)
        state.blocks += 1
        return self.dit.finish_block(state.stream, block)

    def _denoise_together(
        self, states: list[LiveAvatarSession], blocks: list[LatentBlock], run: list[int]
    ) -> list[Exception | None]:
        """`run`'s denoising steps of the blocks, each step one forward for all; per session the
        exception it failed with, or None. After a failed batched forward each goes on alone."""
        streams = [state.stream for state in states]
        done = 0
        try:
            for i in range(len(run)):
                denoise_step(self.dit, streams, blocks, run, i)
                done = i + 1
            return [None] * len(states)
        except Exception as exc:
            self.disable_batching(f"a forward batching {len(states)} sessions failed: {type(exc).__name__}: {exc}")
        errors: list[Exception | None] = []
        for stream, block in zip(streams, blocks, strict=True):
            try:
                for i in range(done, len(run)):
                    denoise_step(self.dit, [stream], [block], run, i)
                errors.append(None)
            except Exception as exc:
                errors.append(exc)
        return errors

    def _profile_batch(
        self, items: Sequence[tuple[Any, AudioWindow]], together: list[int], members: list[int], clock: _StageClock
    ) -> None:
        """One `BlockProfile` per batched session: its own audio span (features and block start) and
        VAE span, its share of the shared DiT span."""
        host, gpu = clock.spans()
        n = len(together)
        audio, dit, vae = host[:n], host[n], host[n + 1 :]
        for j, i in enumerate(members):
            state = items[i][0]
            a, v = audio[together.index(i)], vae[j]
            state.profile.append(
                BlockProfile(
                    audio_ms=a,
                    dit_ms=dit / len(members),
                    vae_ms=v,
                    total_ms=a + dit / len(members) + v,
                    steps=self._steps(state),
                    gpu_audio_ms=gpu[together.index(i)] if gpu else None,
                    gpu_dit_ms=gpu[n] / len(members) if gpu else None,
                    gpu_vae_ms=gpu[n + 1 + j] if gpu else None,
                    batch=len(members),
                )
            )

    def decode_latents(self, state: LiveAvatarSession, latents: torch.Tensor) -> np.ndarray:
        """The VAE half of `step`: 3 latent frames -> 12 uint8 frames, continuing the session's causal
        decoder cache (so blocks must be decoded in the order they were made)."""
        self._use("vae")
        video = self.decoder.decode(state.vae, latents)
        vae_bytes = state.vae.nbytes() + state.stream.graph_nbytes()
        if vae_bytes > self._vae_bytes.get(state.size, 0):
            self._vae_bytes[state.size] = vae_bytes
        return to_uint8_frames(video)

    @property
    def sample_steps(self) -> int:  # type: ignore[override]
        return self.dit.sample_steps

    def set_sample_steps(self, state: LiveAvatarSession, steps: int | None) -> int:
        """Run `steps` (1..sample_steps) denoising forwards per block from the next block on: the
        server's way to degrade under load. None restores the full count. Returns the count in use."""
        full = self.dit.sample_steps
        state.steps = None if steps is None else max(1, min(full, int(steps)))
        return state.steps or full

    def session_nbytes(self, size: Size) -> int:
        """Memory one session at `size` will hold once running: DiT rings and condition cache (computed)
        plus the VAE decoder cache and, with CUDA graphs, the graphs' memory pools, its own and its share
        of a batched pair's (the largest seen at that size so far, e.g. in the warm-up; 0 before the
        first block)."""
        return self.dit.state_nbytes(size.height // 8, size.width // 8) + self._vae_bytes.get(size, 0)

    def state_nbytes(self, state: LiveAvatarSession) -> int:
        return state.nbytes()

    def memory_allocated(self) -> int | None:
        device = self._compute_device
        if device.type != "cuda":
            return None
        return torch.cuda.memory_allocated(device)

    def block_profiles(self, state: LiveAvatarSession) -> list[BlockProfile]:
        return list(state.profile)

    def switch(self, state: LiveAvatarSession, spec: AvatarSpec) -> None:
        state.pending = spec

    def prepare(self, spec: AvatarSpec, size: Size) -> None:
        """Fill the content caches (portrait latents, prompt features) so `open`/`switch` only look up.
        Not with offloading: that moves whole stages between devices and must stay on one thread."""
        if self.offload_model:
            return
        self.avatar_latents(spec.image, size)
        self.prompt_features(spec.prompt)

    def close(self, state: LiveAvatarSession) -> None:
        state.closed = True
        self.dit.release(state.stream)  # the graphs of batches it was in read and write its rings
        state.stream.branches.clear()
        state.vae.feat_cache.clear()

    # --- per-avatar work, cached by content -----------------------------------------------------------

    def avatar_latents(self, image: np.ndarray, size: Size) -> AvatarLatents:
        key = (hashlib.sha1(image.tobytes()).hexdigest(), image.shape, size.width, size.height)
        with self._lock:
            if key not in self._latents:
                self._use("vae")
                vae = self.pipeline.vae
                ref = prepare_reference(image, size.width, size.height)
                self._latents[key] = AvatarLatents(
                    ref_latent=vae.encode(ref),
                    motion_latents=vae.encode(ref.expand(-1, self.motion_frames, -1, -1)),
                )
            self._latents.move_to_end(key)
            while len(self._latents) > self.cache_entries:
                self._latents.popitem(last=False)
            return self._latents[key]

    def prompt_features(self, prompt: str) -> torch.Tensor:
        with self._lock:
            if prompt not in self._texts:
                self._texts[prompt] = self.pipeline.text_encoder.encode_prompt(prompt)
            self._texts.move_to_end(prompt)
            while len(self._texts) > self.cache_entries:
                self._texts.popitem(last=False)
            return self._texts[prompt]

    def _use(self, stage: str) -> None:
        """With offloading, move `stage` ("dit" or "vae") onto the compute device and the other to CPU."""
        if not self.offload_model or self.resident == stage:
            return
        modules = {"dit": self.pipeline.dit, "vae": self.pipeline.vae.model}
        if self._compute_device.type != "cpu":
            for name, module in modules.items():
                if name != stage:
                    module.to("cpu")
            modules[stage].to(self._compute_device)
            log.info("offload: %s on %s, the other stage in CPU memory", stage, self._compute_device)
        self.resident = stage

    def _apply_switch(self, state: LiveAvatarSession) -> None:
        """New portrait and/or prompt from this block on. The DiT redoes its prefill and keeps its
        rings, the VAE keeps its cache: the picture changes over the next blocks without a cut."""
        old, new = state.spec, state.pending
        state.spec, state.pending = new, None
        changes: dict[str, Any] = {}
        if new.image is not old.image and not np.array_equal(new.image, old.image):
            cond = self.avatar_latents(new.image, state.size)
            changes.update(ref_latent=cond.ref_latent, motion_latents=cond.motion_latents)
        if new.prompt != old.prompt:
            changes["text_context"] = self.prompt_features(new.prompt)
        if changes:
            self.dit.set_avatar(state.stream, **changes)


def step_subset(full: int, steps: int) -> list[int]:
    """Which of the `full` schedule's steps a `steps`-step block runs: evenly spread, always the first
    (pure noise) and the last (the near-clean refinement the distilled model ends on)."""
    if steps >= full:
        return list(range(full))
    if steps <= 1:
        return [0]
    return sorted({round(i * (full - 1) / (steps - 1)) for i in range(steps)})


def denoise_step(
    dit: StreamingDiT, states: list[StreamState], blocks: list[LatentBlock], run: list[int], i: int
) -> None:
    """Denoising step run[i] of the blocks, one forward for all (`StreamingDiT.denoise_batch`), and its
    Euler update in place. With fewer steps than the schedule (`run` a `step_subset`), Euler jumps
    straight to the sigma of the next step that runs; with all of them this is `FlowMatchEuler.step`.
    A failure leaves every block's latents as they were before the step."""
    s, sampler = run[i], dit.sampler
    to = run[i + 1] if i + 1 < len(run) else len(sampler.sigmas) - 1
    velocities = dit.denoise_batch(states, blocks, s)
    for block, velocity in zip(blocks, velocities, strict=True):
        block.latents = sampler.step(s, block.latents, velocity, to=to)


def fill_skipped_rings(dit: StreamingDiT, state: StreamState, block: LatentBlock, run: list[int]) -> None:
    """After a block with fewer denoising forwards than the state's rings were made for: each skipped
    step's KV ring still needs this block's keys and values (later blocks attend to them), so it gets a
    copy of those of the nearest step that ran, by noise level: an approximation that only lasts while
    degraded."""
    sigmas = dit.sampler.sigmas
    for skipped in sorted(set(range(dit.sample_steps)) - set(run)):
        source = min(run, key=lambda s: abs(float(sigmas[s] - sigmas[skipped])))
        for br in state.branches:
            _copy_block_kv(br.rings[source], br.rings[skipped], block.frame_start)


def _copy_block_kv(src: KVRing, dst: KVRing, frame_start: int) -> None:
    n = LATENT_FRAMES_PER_BLOCK * src.frame_tokens
    start = src.cond_tokens + src.slot_offset(frame_start)
    for layer, (k, v) in enumerate(zip(src.k, src.v, strict=True)):
        if k is not None and v is not None:
            lc = src.cond_tokens
            # the condition part is rewritten by dst's next forward; copy it so dst's buffer exists
            dst.write(layer, frame_start, k[:, start : start + n], v[:, start : start + n], k[:, :lc], v[:, :lc])

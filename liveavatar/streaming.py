"""The `liveavatar` backend: the diffusion model as a block-by-block `Generator`.

One `step` turns 0.48 s of 16 kHz audio into 12 RGB frames:
wav2vec2 features of the block (+ context) -> `StreamingDiT.step` (4 denoising forwards against the
session's KV rings and condition cache) -> 3 latent frames -> causal VAE decode with the session's
decoder cache -> 12 uint8 frames.

Per-avatar work (portrait -> reference + motion latents, prompt -> umT5 features) is cached by content,
so sessions and switches with the same avatar share it. Everything else a session owns lives in
`LiveAvatarSession`; the models are shared and hold no session state.

Exactly 12 frames per block, including the first: before the first block the decoder is warmed up on
the avatar's first 7 motion latents (the TPP reference does the same, spec §7.3), so the first
generated latent is not the stream's first and decodes to 4 frames like all others. Unlike the
reference, which then drops the first 3 frames of the video (shifting lips 3 frames ahead of the
sound), all 12 are kept: frame k of a block shows the content generated for audio frame k.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
import torch

from liveavatar.generator import AudioWindow, AvatarSpec, Generator, Size
from liveavatar.loading import Pipeline, load_pipeline
from liveavatar.models.audio_features import AudioStats
from liveavatar.models.config import check_dit_size
from liveavatar.models.vae import StreamingDecoder, VAEStreamState
from liveavatar.stream import StreamingDiT, StreamState

log = logging.getLogger(__name__)

MOTION_FRAMES = 73
"""Pixel frames of the static motion video (TPP mode, spec §6.2): 73 frames -> 19 latents."""
DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}  # fmt: skip


def prepare_reference(image: np.ndarray, width: int, height: int) -> torch.Tensor:
    """RGB uint8 [h0, w0, 3] -> [3, 1, height, width] in [-1, 1], as the reference does (§6.1):
    shorter side resized to min(height, width), then a centre crop that zero-pads where too small."""
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
        resized = np.pad(
            resized, ((pad_y // 2, pad_y - pad_y // 2), (pad_x // 2, pad_x - pad_x // 2), (0, 0))
        )
    top = int(round((resized.shape[0] - height) / 2.0))
    left = int(round((resized.shape[1] - width) / 2.0))
    crop = resized[top : top + height, left : left + width]
    x = torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1).float() / 255.0
    return (x * 2 - 1).unsqueeze(1)


def to_uint8_frames(video: torch.Tensor) -> np.ndarray:
    """[3, T, H, W] in [-1, 1] -> [T, H, W, 3] uint8 with the reference's trunc(255·(x+1)/2)."""
    x = (video.float().clamp(-1, 1) + 1) * 127.5
    return x.to(torch.uint8).permute(1, 2, 3, 0).cpu().numpy()


@dataclass
class AvatarLatents:
    """What the DiT is conditioned on for one portrait at one size (spec §6.2, TPP variant)."""

    ref_latent: torch.Tensor  # [16, 1, h, w]: encode(the single frame), a causal first-frame latent
    motion_latents: torch.Tensor  # [16, 19, h, w]: encode(73 copies of the frame)


@dataclass
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

    def nbytes(self) -> int:
        return 0 if self.closed else self.stream.nbytes() + self.vae.nbytes()


class LiveAvatarGenerator(Generator):
    """LiveAvatar diffusion backend; one instance serves any number of interleaved sessions."""

    name = "liveavatar"

    def __init__(
        self,
        pipeline: Pipeline,
        sample_steps: int = 4,
        guide_scale: float = 0.0,
        default_size: Size | None = None,
        cache_entries: int = 16,
        motion_frames: int = MOTION_FRAMES,
    ) -> None:
        """`motion_frames` is the length of the static motion video (73 in the reference); CPU tests
        pass fewer (1 + 4k) to save VAE time, FramePack zero-fills the missing motion latents."""
        if motion_frames < 1 or (motion_frames - 1) % 4:
            raise ValueError(f"motion_frames must be 1 + 4k, got {motion_frames}")
        self.pipeline = pipeline
        self.dit = StreamingDiT(pipeline.dit, sample_steps=sample_steps, guide_scale=guide_scale)
        self.decoder = StreamingDecoder(pipeline.vae)
        self.default_size = default_size or Size(704, 384)
        self.cache_entries = cache_entries
        self.motion_frames = motion_frames
        self._latents: OrderedDict[tuple, AvatarLatents] = OrderedDict()
        self._texts: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()  # the caches are shared by worker threads

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
            from liveavatar.testing import random_pipeline

            pipeline = random_pipeline(random_weights, device=device, dtype=dtype, seed=seed)
            default = Size(128, 128) if random_weights == "tiny" else None
        elif ckpt_dir:
            pipeline = load_pipeline(ckpt_dir, lora_path, device=device, dtype=dtype, text_device=text_device)
            default = None
        else:
            raise ValueError("the liveavatar backend needs ckpt_dir (a checkpoint folder) or random_weights")
        if isinstance(size, str):
            size = Size.parse(size)
        return cls(
            pipeline,
            sample_steps=sample_steps,
            guide_scale=guide_scale,
            default_size=size or default,
            motion_frames=motion_frames,
        )

    # --- Generator ------------------------------------------------------------------------------------

    def open(self, spec: AvatarSpec, size: Size) -> LiveAvatarSession:
        check_dit_size(size.width, size.height)
        cond = self.avatar_latents(spec.image, size)
        stream = self.dit.new_state(
            cond.ref_latent, cond.motion_latents, self.prompt_features(spec.prompt), spec.seed
        )
        vae_state = self.decoder.new_state(cond.motion_latents)
        log.info("liveavatar session opened at %s (seed %d)", size, spec.seed)
        return LiveAvatarSession(spec=spec, size=size, stream=stream, vae=vae_state)

    def step(self, state: LiveAvatarSession, window: AudioWindow) -> np.ndarray:
        if state.closed:
            raise RuntimeError("step() on a closed session")
        if len(window.samples) != self.audio_samples_per_block:
            raise ValueError(
                f"window has {len(window.samples)} samples, expected {self.audio_samples_per_block}"
            )
        if state.pending is not None:
            self._apply_switch(state)
        feats = self.pipeline.audio.block_features(
            window.samples, window.context, state.blocks, state.audio_stats, self.frames_per_block
        )
        latents = self.dit.step(state.stream, feats)
        video = self.decoder.decode(state.vae, latents)
        state.blocks += 1
        return to_uint8_frames(video)

    def switch(self, state: LiveAvatarSession, spec: AvatarSpec) -> None:
        state.pending = spec

    def close(self, state: LiveAvatarSession) -> None:
        state.closed = True
        state.stream.branches.clear()
        state.vae.feat_cache.clear()

    # --- per-avatar work, cached by content -----------------------------------------------------------

    def avatar_latents(self, image: np.ndarray, size: Size) -> AvatarLatents:
        key = (hashlib.sha1(image.tobytes()).hexdigest(), image.shape, size.width, size.height)
        with self._lock:
            if key not in self._latents:
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

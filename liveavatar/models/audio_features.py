"""wav2vec2 audio features for the DiT: 25 hidden states, resampled 50 Hz -> 30 Hz -> 25 fps (docs/model.md §6.3).

Two entry points:
- `encode_file` is the reference: the whole file normalised with its own statistics, all hidden
  states, 30 Hz interpolation with `align_corners`, bucketed to 48-frame clips -> [25, C, 48·nr].
- `block_features` is the live variant for one 12-frame block from the block's samples plus the
  audio before it. It samples the hidden states at the same 50 Hz positions the reference would use
  for those video frames, but (a) wav2vec2 sees only the given context, not the future, (b) the
  normalisation statistics come from the stream so far (`AudioStats`) instead of the whole file, with
  a floor so near-silence is not blown up to unit variance, and (c) the 50->30 Hz ratio is the exact
  5/3 rather than the reference's `(T-1)/(T'-1)`, which depends on the (unknown) total length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from transformers import Wav2Vec2Config, Wav2Vec2ForCTC

SAMPLE_RATE = 16_000
WAV2VEC_HZ = 50  # one hidden state per 320 samples
FEATURE_HZ = 30  # the reference's intermediate "video_rate"
VIDEO_FPS = 25
HOP = SAMPLE_RATE // WAV2VEC_HZ  # 320
NORM_EPS = 1e-7  # Wav2Vec2FeatureExtractor's zero-mean-unit-variance epsilon


def tiny_wav2vec2_config(hidden_size: int = 64) -> Wav2Vec2Config:
    """Same strides (320 samples/frame) and layer count (25 hidden states) as XLSR-53, few channels."""
    return Wav2Vec2Config(
        vocab_size=32,
        hidden_size=hidden_size,
        num_hidden_layers=24,
        num_attention_heads=2,
        intermediate_size=2 * hidden_size,
        conv_dim=(16,) * 7,
        conv_bias=True,
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2,
        do_stable_layer_norm=True,
        feat_extract_norm="layer",
    )


def num_wav2vec_frames(num_samples: int) -> int:
    """T = floor((N - 400) / 320) + 1 (the conv feature extractor's receptive field is 400 samples)."""
    return max(0, (num_samples - 400) // HOP + 1)


def num_clips(num_30hz: int, frames_per_clip: int = 48) -> int:
    """nr = int(T' / (48 · 1.2)) + 1 — the reference always rounds up to one more clip."""
    return int(num_30hz / (frames_per_clip * (FEATURE_HZ / VIDEO_FPS))) + 1


def video_frame_indices(num_frames: int, num_30hz_padded: int) -> np.ndarray:
    """30 Hz feature index of each video frame: round(30·k/25) with numpy rounding, clipped."""
    t = np.linspace(0, num_frames / VIDEO_FPS, num_frames, endpoint=False)
    return np.clip(np.round(t * FEATURE_HZ).astype(int), 0, num_30hz_padded - 1)


def wav2vec_positions(first_frame: int, num_frames: int) -> np.ndarray:
    """50 Hz hidden-state position the reference samples for video frames first..first+n-1.

    Video frame K takes 30 Hz feature round(1.2·K), which sits at 50 Hz position j·(T-1)/(T'-1);
    for a stream of unknown length that ratio is its limit 5/3.
    """
    frames = np.arange(first_frame, first_frame + num_frames)
    return np.round(frames / VIDEO_FPS * FEATURE_HZ) * (WAV2VEC_HZ / FEATURE_HZ)


def interpolate_to_30hz(hidden: torch.Tensor) -> torch.Tensor:
    """[L, T, C] at 50 Hz -> [L, int(T/50·30), C] (linear, align_corners, in the input dtype) as fp32."""
    length = int(hidden.shape[1] / float(WAV2VEC_HZ) * FEATURE_HZ)
    x = F.interpolate(hidden.transpose(1, 2), size=length, mode="linear", align_corners=True)
    return x.transpose(1, 2).float()


def bucket_to_video_frames(feats: torch.Tensor, frames_per_clip: int = 48) -> torch.Tensor:
    """[L, T', C] at 30 Hz -> [L, C, V] at 25 fps, V = 48·nr; frames past the audio are zeros."""
    num_layers, length, dim = feats.shape
    nr = num_clips(length, frames_per_clip)
    frames = nr * frames_per_clip
    padded = math.ceil(frames / VIDEO_FPS * FEATURE_HZ)
    idx = torch.from_numpy(video_frame_indices(frames, padded))
    out = torch.zeros(num_layers, dim, frames, dtype=feats.dtype, device=feats.device)
    valid = idx < length
    out[:, :, valid] = feats[:, idx[valid]].transpose(1, 2)
    return out


@dataclass
class AudioStats:
    """Running mean/variance of one session's audio (Chan's parallel update), for live normalisation."""

    count: int = 0
    mean: float = 0.0
    m2: float = 0.0

    def update(self, samples: np.ndarray) -> None:
        n = samples.size
        if n == 0:
            return
        mean = float(samples.mean(dtype=np.float64))
        m2 = float(((samples.astype(np.float64) - mean) ** 2).sum())
        total = self.count + n
        delta = mean - self.mean
        self.m2 += m2 + delta * delta * self.count * n / total
        self.mean += delta * n / total
        self.count = total

    @property
    def var(self) -> float:
        return self.m2 / self.count if self.count else 0.0


class AudioFeatureExtractor:
    """wav2vec2 (the checkpoint folder's `Wav2Vec2ForCTC`) -> per-video-frame audio features."""

    def __init__(self, model: Wav2Vec2ForCTC, do_normalize: bool = True, min_live_std: float = 0.01) -> None:
        self.model = model
        self.do_normalize = do_normalize
        self.min_live_std = min_live_std

    @property
    def dim(self) -> int:
        return self.model.config.hidden_size

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @torch.no_grad()
    def hidden_states(self, normalized: np.ndarray) -> torch.Tensor:
        """Normalised 16 kHz mono -> [25, T, C] (embedding output + every layer) in the model dtype."""
        x = torch.from_numpy(np.ascontiguousarray(normalized, dtype=np.float32))[None]
        out = self.model(x.to(self.device, self.dtype), output_hidden_states=True)
        return torch.cat(out.hidden_states)

    def normalize(self, samples: np.ndarray, mean: float | None = None, var: float | None = None) -> np.ndarray:
        """(w - mean) / sqrt(var + 1e-7), by default with the array's own statistics (the processor)."""
        samples = np.asarray(samples, dtype=np.float32)
        if not self.do_normalize:
            return samples
        mean = float(samples.mean()) if mean is None else mean
        var = float(samples.var()) if var is None else var
        return ((samples - mean) / np.sqrt(var + NORM_EPS)).astype(np.float32)

    def encode_file(self, samples: np.ndarray, frames_per_clip: int = 48) -> torch.Tensor:
        """Whole-file reference features [25, C, 48·nr] (fp32) for 16 kHz mono samples."""
        hidden = self.hidden_states(self.normalize(samples))
        return bucket_to_video_frames(interpolate_to_30hz(hidden), frames_per_clip)

    @torch.no_grad()
    def block_features(
        self,
        samples: np.ndarray,
        context: np.ndarray,
        block_index: int,
        stats: AudioStats | None = None,
        frames_per_block: int = 12,
    ) -> torch.Tensor:
        """Features [25, C, frames_per_block] (fp32) of one block of a live stream.

        `samples` is the block's audio (frames_per_block/25 s), `context` the audio right before it
        and `block_index` the block's position in the stream (it fixes the reference's 30 Hz phase).
        `stats`, when given, is updated with the block's samples and used for normalisation.
        """
        samples = np.asarray(samples, dtype=np.float32)
        context = np.asarray(context, dtype=np.float32)
        context = context[context.size % HOP :]  # keep the span aligned to the 50 Hz frame grid
        span = np.concatenate([context, samples])
        if stats is not None:
            stats.update(samples if stats.count or not context.size else span)
            mean, var = stats.mean, max(stats.var, self.min_live_std**2)
        else:
            mean, var = float(span.mean()), max(float(span.var()), self.min_live_std**2)
        span = np.pad(span, (0, max(0, 400 - span.size)))
        hidden = self.hidden_states(self.normalize(span, mean, var)).float()

        first = block_index * frames_per_block
        start_frame = first * (SAMPLE_RATE // VIDEO_FPS) / HOP - context.size / HOP
        pos = wav2vec_positions(first, frames_per_block) - start_frame
        pos = np.clip(pos, 0, hidden.shape[1] - 1)
        lo = np.floor(pos).astype(int)
        hi = np.minimum(lo + 1, hidden.shape[1] - 1)
        w = torch.from_numpy(pos - lo).to(hidden).view(1, -1, 1)
        picked = hidden[:, lo] * (1 - w) + hidden[:, hi] * w
        return picked.transpose(1, 2).contiguous()

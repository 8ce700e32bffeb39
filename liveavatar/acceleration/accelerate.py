"""Which parts of the LiveAvatar DiT the generic engines accelerate, and how.

`engines/` knows nothing of avatars; this file is the avatar knowledge it needs: the FP8 skip list
(docs/model.md §5.2), which code of a transformer block is compiled, the example shapes the attention kernel
is chosen for, and `StreamStages`, the per-rank denoise/decode work of the multi-GPU pipeline.
"""

from __future__ import annotations

import logging
import types
from dataclasses import dataclass

import torch

from engines.attention import select_backend
from engines.fp8 import convert_linears_to_fp8
from engines.tpp import Feedback
from liveavatar.models.rope import apply_rope, rotate, sink_ref_frame
from liveavatar.models.transformer_liveavatar import DiTBlock, LiveAvatarDiT, cond_tokens, frame_tokens
from liveavatar.streaming.dit import CLIP_FRAMES, LATENT_FRAMES_PER_BLOCK, StreamingDiT, StreamState

log = logging.getLogger(__name__)

FP8_SKIP = (
    "text_embedding",
    "time_embedding",
    "time_projection",
    "head.head",
    "casual_audio_encoder.encoder.final_linear",
)
"""Linears the reference keeps in bf16 with --fp8 (docs/model.md §5.2): embeddings, heads, the audio global vector."""


def apply_fp8(dit: LiveAvatarDiT, emulate: bool | None = None) -> list[str]:
    """Per-tensor FP8 for every other DiT linear (460 in the 14B model), after any LoRA merge; per
    sample, because the DiT's first axis is the session when it batches several sessions' blocks
    (`LiveAvatarDiT.forward_segments`), and a session's numbers must not depend on its batch."""
    return convert_linears_to_fp8(dit, skip=FP8_SKIP, emulate=emulate, per_sample=True)


def accelerate(generator, engine: str, fp8: bool, first: bool = True) -> tuple[str, list[str]]:
    """`fp8` and `engine` ("eager" or "compile") applied to a `LiveAvatarGenerator`'s DiT, RoPE and VAE.

    `first`: the first generator of this process (the compile cache and the process-wide RoPE kernel
    are set up once). Returns the engine as applied ("eager", "compile", or "compile+rope+vae" on a
    GPU, where the fused RoPE and VAE kernels pay, docs/benchmarks.md) and notes on what was not
    applied as asked (FP8 emulated on a CPU)."""
    dit = generator.pipeline.dit
    on_gpu = dit.device.type == "cuda"
    notes: list[str] = []
    if fp8:
        converted = apply_fp8(dit)
        log.info("fp8: %d DiT linears converted on %s", len(converted), dit.device)
        if not on_gpu and first:
            notes.append("fp8 on CPU is emulated: slower, for checking only")
    if engine != "compile":
        return "eager", notes
    from engines.cache import DEFAULT_ROOT
    from engines.compile import persistent_compile_cache

    if first:  # before the first compile: a second start loads the kernels built by the first
        persistent_compile_cache(DEFAULT_ROOT, str(dit.device))
    compile_dit(dit)
    if not on_gpu:
        return "compile", notes
    compile_rope()  # process-wide, installed by the first generator
    compile_vae(generator.decoder)
    return "compile+rope+vae", notes


# --- compiled blocks ---------------------------------------------------------------------------------


def _pre_attention(block: DiTBlock, x: torch.Tensor, e0: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return block.pre_attention(x, e0)


def _post_attention(
    block: DiTBlock, x: torch.Tensor, y: torch.Tensor, e0: torch.Tensor, context: torch.Tensor
) -> torch.Tensor:
    return block.post_attention(x, y, e0, context)


def compile_dit(dit: LiveAvatarDiT, backend: str = "inductor", mode: str | None = None) -> LiveAvatarDiT:
    """Compile each block around its self-attention; the attention itself (ring write, RoPE, kernel)
    stays eager.

    The model hands every block a fresh `attend` closure that indexes per-layer caches by a Python
    int; tracing through it would make dynamo specialize on the layer and recompile 40 times. So the
    block runs as its two halves, `DiTBlock.pre_attention` and `post_attention`, each through one
    compiled function shared by all layers (the block is an argument, its parameters are graph inputs).
    """
    options = {"backend": backend, "mode": mode, "dynamic": False}
    pre, post = torch.compile(_pre_attention, **options), torch.compile(_post_attention, **options)

    def forward(self, x, e0, context, attend):
        return post(self, x, attend(*pre(self, x, e0)), e0, context)

    for block in dit.blocks:
        block.forward = types.MethodType(forward, block)
    log.info("compile: %d DiT blocks (backend=%s, mode=%s)", len(dit.blocks), backend, mode)
    return dit


def compile_rope(backend: str = "inductor") -> None:
    """Route the DiT's RoPE through `rope.rotate` in real arithmetic, compiled (process-wide).

    RoPE runs three times per layer outside the compiled block regions (block q, block k and the
    re-roped sink keys); in eager float64 complex arithmetic that is a large part of the gap to the
    matmul floor. The real form does the same products and sums (the same numbers) in one fused pass
    over q/k instead of five complex-tensor passes per call. The model module looks `apply_rope` up
    at call time, so swapping it here is enough. Installed once per process: later calls (one per
    GPU set) keep the kernel already compiled.
    """
    import functools

    from liveavatar.models import transformer_liveavatar

    current = transformer_liveavatar.apply_rope
    if isinstance(current, functools.partial) and current.func is apply_rope:
        return
    kernel = torch.compile(rotate, backend=backend, dynamic=False)
    transformer_liveavatar.apply_rope = functools.partial(apply_rope, arithmetic="real", kernel=kernel)


def compile_vae(decoder, backend: str = "inductor") -> None:
    """Compile the causal VAE decoder (norm + SiLU + conv chains over large activations).

    A stream's decoder calls meet three cache variants (empty, one frame, two frames per conv);
    `WanVAE.decode_stream` runs the first two eagerly and keeps the cache strides canonical, so the
    compiled decoder holds one graph. Before that (until 2026-11-30) there were about 14 variants, and
    dynamo's default limit of 8 left later ones eager for the whole process (seen on an H200). The
    raised limit stays as a margin: a variant past the limit would silently run eager."""
    import torch._dynamo

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    decoder.vae.model.decoder.compile(backend=backend, dynamic=False)


def choose_attention(dit: LiveAvatarDiT, latent_h: int, latent_w: int) -> str:
    """Pick the attention kernel on the real streaming shapes: block queries against ring + sink keys."""
    c = dit.config
    fsl, lc = frame_tokens(latent_h, latent_w), cond_tokens(latent_h, latent_w)
    if dit.device.type != "cuda":
        return select_backend().name
    q = torch.randn(1, 3 * fsl, c.num_heads, c.head_dim, device=dit.device, dtype=dit.dtype)
    k = torch.randn(1, 12 * fsl + lc, c.num_heads, c.head_dim, device=dit.device, dtype=dit.dtype)
    return select_backend((q, k, k.clone())).name


# --- pipeline stages -------------------------------------------------------------------------------


@dataclass(eq=False)
class BlockInputs:
    """The fixed conditioning of a benchmark or pipeline run, identical on every rank."""

    ref_latent: torch.Tensor
    motion_latents: torch.Tensor
    text_context: torch.Tensor
    audio_feats: list[torch.Tensor]
    seed: int = 0


def sink_feedback(latent_h: int, latent_w: int, dtype: torch.dtype) -> Feedback:
    """The adaptive sink as pipeline feedback: block 0's first final latent frame replaces the
    reference before the first block of the next clip (docs/model.md §4.5)."""
    return Feedback(
        source=0, target=CLIP_FRAMES // LATENT_FRAMES_PER_BLOCK, shape=(16, 1, latent_h, latent_w), dtype=dtype
    )


class StreamStages:
    """One rank's share of streaming generation, as `engines.tpp.BlockStages`.

    Each rank keeps its own `StreamState` (condition cache, and rings only for the steps it runs:
    rings allocate on first write). The sink-shift draws of all steps are made at each block's start
    on every rank, in the order the single-process `StreamingDiT.step` makes them, so every rank sees
    the same draws. `decoder` (a `StreamingDecoder`) is only needed on the decoding rank, `stream`
    only on denoising ranks.
    """

    def __init__(self, stream: StreamingDiT | None, inputs: BlockInputs, decoder=None, sync=lambda: None) -> None:
        self.stream, self.inputs, self.decoder = stream, inputs, decoder
        self.sync = sync
        self.state: StreamState | None = None  # a decode-only rank holds no DiT state
        if stream is not None:
            self.state = stream.new_state(inputs.ref_latent, inputs.motion_latents, inputs.text_context, inputs.seed)
        self.vae_state = None
        if decoder is not None:
            motion = inputs.motion_latents.to(decoder.vae.device, decoder.vae.dtype)
            self.vae_state = decoder.new_state(motion)
        self.block = -1
        self.audio_ms: list[float] = []

    def _start_block(self, block: int) -> None:
        """Per-block work every denoising rank repeats: sink refresh, prefill, audio, shift draws."""
        if block == self.block:
            return
        state, dit = self.state, self.stream.dit
        state.frame = block * LATENT_FRAMES_PER_BLOCK
        self.stream.refresh_condition(state)
        timer = _Timer(self.sync)
        self.audio = dit.encode_audio(self.inputs.audio_feats[block % len(self.inputs.audio_feats)])
        self.audio_ms.append(timer.ms())
        self.ref_frames = [
            sink_ref_frame(state.frame, state.draw_sink_shift()) for _ in range(self.stream.sample_steps)
        ]
        self.block = block

    def noise(self, block: int) -> torch.Tensor:
        self._start_block(block)
        return self.stream.block_noise(self.state).clone()

    def denoise(self, step: int, block: int, x: torch.Tensor) -> torch.Tensor:
        return self.denoise_part(step, block, x, None, 0, self.stream.dit.config.num_layers)[0]

    def denoise_part(
        self, step: int, block: int, x: torch.Tensor, hidden: torch.Tensor | None, start: int, end: int
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Layers [start, end) of step `step` (the pipeline's parts are the DiT's layers)."""
        self._start_block(block)
        state, stream = self.state, self.stream
        br, layers = state.branches[0], stream.dit.config.num_layers
        t = stream.sampler.timesteps[step]
        part = None if (start, end) == (0, layers) else (start, end)
        out = stream.forward(br, br.rings[step], x, t, self.audio, state.frame, self.ref_frames[step], part, hidden)
        if end < layers:
            return x, out
        x = stream.sampler.step(step, x, out)
        if step == stream.sample_steps - 1 and state.sink_frame is None and not state.sink_replaced:
            state.sink_frame = x[:, :1].clone()
        return x, None

    def decode(self, block: int, x: torch.Tensor) -> torch.Tensor:
        if self.decoder is None:
            return x.detach().cpu()
        return self.decoder.decode(self.vae_state, x)

    def feedback_out(self, block: int, x: torch.Tensor) -> torch.Tensor:
        return x[:, :1].clone()

    def feedback_in(self, value: torch.Tensor) -> None:
        # Ranks that did not run the last step get block 0's final frame here; the last one has it.
        if self.state.sink_frame is None and not self.state.sink_replaced:
            self.state.sink_frame = value


class _Timer:
    def __init__(self, sync) -> None:
        import time

        self.sync, self.clock = sync, time.perf_counter
        self.start = self.clock()

    def ms(self) -> float:
        self.sync()
        return (self.clock() - self.start) * 1e3

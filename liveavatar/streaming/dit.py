"""Streaming inference of the LiveAvatar DiT: per-session state and the block-by-block denoiser.

Everything that belongs to one session lives in `StreamState` (KV rings, condition cache, frame
counter, sink reference, RNGs); `StreamingDiT` is stateless, so one model serves any number of
interleaved sessions. One `step` = one block of 3 latent frames = 12 video frames = 0.48 s, made by
`sample_steps` denoising forwards (docs/model.md §4):

- a condition cache ("attention sink"): un-roped K and V of [reference ; FramePack motion] tokens per
  layer, from a prefill forward at t = 0;
- one KV ring per denoising step (timestep forcing): RoPE'd K/V of the last 12 latent frames as seen at
  that step's noise level, written by that step's forward and never refreshed with clean latents;
- the rolling sink: every forward re-ropes the reference keys at max(30, F0 + D) with D drawn from
  4..30 (the original draws from Python's unseeded global `random`; here a per-session seeded
  `random.Random`, and tests may force the draws through `state.sink_shift_draws`);
- the adaptive sink: after the first clip of a reference (12 latent frames) the reference latent is
  replaced by the first latent frame generated with it and the prefill is redone once (the original's
  multi-GPU behaviour; we do it in every mode).

Several sessions' blocks can share their denoising forwards (`denoise_batch`): one forward per step
over all of them, each session attending to its own rings and condition, with the results each would
get alone. Which sessions may share is `batch_key`; when it pays is the caller's decision (the
`liveavatar` backend batches at launch-bound sizes only).
"""

from __future__ import annotations

import itertools
import logging
import random
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from liveavatar.models.rope import sink_ref_frame
from liveavatar.models.transformer_liveavatar import (
    KV,
    AudioEmbedding,
    LiveAvatarDiT,
    Segment,
    cond_tokens,
    frame_tokens,
)
from liveavatar.streaming.sampler import FlowMatchEuler, guided_velocity

LATENT_FRAMES_PER_BLOCK = 3
"""Latent frames one block makes (the VAE decodes them to `Generator.frames_per_block` = 12 video frames)."""
RING_FRAMES = 12
"""Latent frames of history per ring: the current block plus the 3 before it."""
CLIP_FRAMES = 12
"""Latent frames of one original clip (48 video frames); the noise is drawn per clip, seeded seed + clip."""
SINK_SHIFT_MIN, SINK_SHIFT_MAX = 4, 30
log = logging.getLogger(__name__)
AUDIO_FRAMES_PER_BLOCK = 4 * LATENT_FRAMES_PER_BLOCK
"""Audio feature frames per block: one per video frame."""

Observer = Callable[[int, torch.Tensor, torch.Tensor], None]
"""Called after every denoising forward with (step index, input latents, predicted velocity)."""
MAX_BATCH_GRAPHS = 4
"""Groups of batched sessions whose CUDA graphs are kept at once (least recently used go first)."""
_SERIALS = itertools.count()


class KVRing:
    """One denoising step's self-attention keys and values for every layer, one buffer per layer.

    Layout [condition tokens ; 12 latent frames of history]: the condition ("sink") K/V are written
    at the front by every forward (the keys re-roped at that forward's sink position), the block's
    RoPE'd K/V into its ring slot behind them. Attention then reads one contiguous prefix in place:
    no per-layer concatenation of history and sink (0.3 GB per layer at 704×384), and while the ring
    fills up the valid part is still a prefix. Slots are reused modulo 12 frames; a block (3 frames,
    starting at a multiple of 3) never wraps. Attention is order-free over keys, so slot order does
    not matter, only which frames are present.
    """

    def __init__(self, num_layers: int, frame_tokens: int, frames: int = RING_FRAMES):
        self.frame_tokens = frame_tokens
        self.frames = frames
        self.cond_tokens = 0
        self.k: list[torch.Tensor | None] = [None] * num_layers
        self.v: list[torch.Tensor | None] = [None] * num_layers
        self.graph: Any = None
        """The steady-state step captured as a CUDA graph (`StreamingDiT(cuda_graphs=True)`): it reads
        and writes these buffers in place, so it belongs to this ring and dies with it."""

    def at(self, frame_start: int, slots: torch.Tensor | None = None) -> RingCursor:
        return RingCursor(self, frame_start, slots)

    def write(
        self,
        layer: int,
        frame_start: int,
        k: torch.Tensor,
        v: torch.Tensor,
        cond_k: torch.Tensor,
        cond_v: torch.Tensor,
        slots: torch.Tensor | None = None,
    ) -> KV:
        """Store the condition K/V and the block's k/v [1, n, H, D] of frames starting at frame_start;
        return the window to attend to. `slots` (device token indices) replaces the slice that
        frame_start gives, for a captured graph that cannot take a new Python int each replay."""
        lc = cond_k.shape[1]
        capacity = self.frames * self.frame_tokens
        if self.k[layer] is None:
            self.cond_tokens = lc
            self.k[layer] = k.new_zeros(1, lc + capacity, *k.shape[2:])
            self.v[layer] = v.new_zeros(1, lc + capacity, *v.shape[2:])
        elif lc != self.cond_tokens:
            raise ValueError(f"condition has {lc} tokens, the ring was made for {self.cond_tokens}")
        buf_k, buf_v = self.k[layer], self.v[layer]
        buf_k[:, :lc] = cond_k
        buf_v[:, :lc] = cond_v
        n = k.shape[1]
        if slots is not None:
            buf_k.index_copy_(1, slots, k)
            buf_v.index_copy_(1, slots, v)
        else:
            start = lc + self.slot_offset(frame_start)
            if start + n > lc + capacity:
                raise ValueError("a block must not wrap around the KV ring (block frames must divide 12)")
            buf_k[:, start : start + n] = k
            buf_v[:, start : start + n] = v
        # Until the ring has filled, only what was written so far is valid; afterwards all of it.
        used = capacity if frame_start >= self.frames else frame_start * self.frame_tokens + n
        return buf_k[:, : lc + used], buf_v[:, : lc + used]

    def slot_offset(self, frame_start: int) -> int:
        """Token offset of frame_start's slot within the history part."""
        return (frame_start % self.frames) * self.frame_tokens

    def history(self, layer: int) -> KV:
        """The 12-frame history part of one layer (views), without the condition tokens."""
        return self.k[layer][:, self.cond_tokens :], self.v[layer][:, self.cond_tokens :]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v if t is not None)


@dataclass(eq=False)
class RingCursor:
    """A ring positioned at one block, as the DiT's `RingKV` interface wants it."""

    ring: KVRing
    frame_start: int
    slots: torch.Tensor | None = None

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, cond_k: torch.Tensor, cond_v: torch.Tensor) -> KV:
        return self.ring.write(layer, self.frame_start, k, v, cond_k, cond_v, self.slots)


@dataclass(eq=False)
class BranchCache:
    """Caches of one text condition: the positive prompt, plus the negative one when CFG is on."""

    text_context: torch.Tensor
    context: torch.Tensor | None = None
    """Embedded (padded) text [1, text_len, C]; the same for every forward, so computed once."""
    context_of: torch.Tensor | None = None
    """The `text_context` that `context` was computed from (a switch replaces the former)."""
    cond_kv: list[KV] | None = None
    """Un-roped condition K and V per layer. A new prefill overwrites these tensors in place, so a
    captured graph that reads them stays valid."""
    rings: list[KVRing] = field(default_factory=list)
    graph_pool: Any = None
    """The CUDA-graph memory pool of this branch's rings (`cuda_graphs`): per session, so it lives and
    dies with the graphs that use it (a pool outliving its graphs cannot take a new capture)."""
    graph_nbytes: int = 0
    """Device memory of `graph_pool` after the last capture (the allocator's segments of that pool),
    for admission."""


@dataclass(eq=False)
class LatentBlock:
    """One block in flight: where it starts, its audio embedding and its current latents."""

    frame_start: int
    audio: AudioEmbedding
    latents: torch.Tensor
    ref_frames: dict[int, int] = field(default_factory=dict)
    """Sink position of each denoising step run so far (drawn at its first forward): a step run again
    (alone, after a failed batched forward) uses the same draw."""


@dataclass(eq=False)
class GraphCell:
    """Holds one CUDA-graph runner (`engines.compile.CUDAGraphRunner`), created at its first use."""

    graph: Any = None


@dataclass(eq=False)
class BatchGraphs:
    """The CUDA graphs of one group of sessions whose blocks share their forwards: one per (branch,
    step), reading and writing those sessions' rings, in a memory pool of their own. Freed when a
    member leaves (`StreamingDiT.release`) or when more groups than `max_batch_graphs` hold graphs."""

    members: tuple[int, ...]
    """The sessions' `StreamState.serial`s, in the order their blocks sit in the batch."""
    cells: dict[tuple[int, int], GraphCell] = field(default_factory=dict)
    graph_pool: Any = None
    graph_nbytes: int = 0
    """Device memory of `graph_pool` after the last capture, split evenly between the members for
    admission (`StreamState.graph_nbytes`)."""
    freed: bool = False

    def cell(self, branch: int, step: int) -> GraphCell:
        return self.cells.setdefault((branch, step), GraphCell())

    def free(self) -> None:
        """Drop the graphs and their pool (the memory goes back to the allocator)."""
        self.cells.clear()
        self.graph_pool, self.graph_nbytes, self.freed = None, 0, True


@dataclass(eq=False)
class Member:
    """One session's part of a batched forward: its caches of one branch, the step's ring, its block."""

    branch: BranchCache
    ring: KVRing
    latents: torch.Tensor
    audio: AudioEmbedding
    frame_start: int
    ref_frame: int


@dataclass(eq=False)
class StreamState:
    """Everything one session owns. Never stored on the model."""

    ref_latent: torch.Tensor
    motion_latents: torch.Tensor
    seed: int
    branches: list[BranchCache]
    generator: torch.Generator
    sink_rng: random.Random
    sink_shift_draws: Iterator[int] | None = None
    """When set, sink shifts D are taken from here (tests replaying a recorded run)."""
    frame: int = 0
    """Absolute latent frame of the next block (its RoPE time position)."""
    needs_prefill: bool = True
    sink_anchor: int = 0
    """Frame at which the current reference took effect; the adaptive sink counts from here."""
    sink_frame: torch.Tensor | None = None
    """First latent frame generated with the current reference: the adaptive sink's replacement."""
    sink_replaced: bool = False
    prefills: int = 0
    clip_noise: torch.Tensor | None = None
    clip_index: int = -1
    serial: int = field(default_factory=lambda: next(_SERIALS))
    """Unique per state of the process (never reused): names the session in batched-graph groups."""
    batch_graphs: list[BatchGraphs] = field(default_factory=list)
    """Groups of batched sessions this one belongs to (`StreamingDiT.denoise_batch` with CUDA graphs)."""

    @property
    def latent_hw(self) -> tuple[int, int]:
        return self.ref_latent.shape[-2], self.ref_latent.shape[-1]

    def draw_sink_shift(self) -> int:
        if self.sink_shift_draws is not None:
            return int(next(self.sink_shift_draws))
        return self.sink_rng.randint(SINK_SHIFT_MIN, SINK_SHIFT_MAX)

    def nbytes(self) -> int:
        """Bytes of tensors this session holds now (rings grow to full size on the first block)."""
        tensors = [self.ref_latent, self.motion_latents, self.sink_frame, self.clip_noise]
        for br in self.branches:
            tensors += [br.text_context, br.context]
            tensors += [t for kv in br.cond_kv or [] for t in kv]
        total = sum(t.numel() * t.element_size() for t in tensors if t is not None)
        total += self.graph_nbytes()
        return total + sum(r.nbytes() for br in self.branches for r in br.rings)

    def graph_nbytes(self) -> int:
        """Device memory of this session's CUDA graphs: its own branches' pools plus its share of every
        batched group's pool it is in."""
        own = sum(br.graph_nbytes for br in self.branches)
        return own + sum(g.graph_nbytes // len(g.members) for g in self.batch_graphs if not g.freed)


class StreamingDiT:
    """Stateless block-by-block generator around a LiveAvatarDiT and the flow-matching sampler.

    `cuda_graphs=True` replays each steady-state denoising forward (ring full: every block from the
    fourth on) from a CUDA graph captured per session and step, which removes the launch overhead of
    the ~2000 kernels of a 40-layer forward. The graph lives on the step's `KVRing` (it reads and
    writes that ring's buffers) and its memory pool on the session's branch, so both are per-session
    state and go when the session goes; the memory the captures reserved counts in the state's
    `nbytes`. Capture is not thread-safe: one thread must drive every session (the
    benchmark; the server's `cuda_graphs` setting, which needs one worker thread per GPU set). At
    704×384 the bench's step is GPU-bound and graphs gained nothing on an H200; at small sizes the
    step is launch-bound and they nearly halve it. A group of sessions whose blocks share their
    forwards (`denoise_batch`) has graphs of its own (`BatchGraphs`), freed when one of them leaves.
    """

    def __init__(
        self,
        dit: LiveAvatarDiT,
        sample_steps: int = 4,
        guide_scale: float = 0.0,
        cuda_graphs: bool = False,
        max_batch_graphs: int = MAX_BATCH_GRAPHS,
    ):
        self.dit = dit
        self.sampler = FlowMatchEuler(sample_steps)
        self.sample_steps = sample_steps
        self.guide_scale = guide_scale
        self.cuda_graphs = cuda_graphs
        self.max_batch_graphs = max_batch_graphs
        self.batch_graphs: OrderedDict[tuple[int, ...], BatchGraphs] = OrderedDict()
        """Groups of batched sessions with CUDA graphs, least recently used first."""

    @property
    def uses_cfg(self) -> bool:
        return self.guide_scale > 0

    def state_nbytes(self, latent_h: int, latent_w: int) -> int:
        """Full-size memory of one session at this latent size, for admission control before opening."""
        c = self.dit.config
        fsl, lc = frame_tokens(latent_h, latent_w), cond_tokens(latent_h, latent_w)
        item = torch.empty(0, dtype=self.dit.dtype).element_size()
        per_layer_token = 2 * c.dim * item  # K and V
        # each step's buffer holds [condition ; 12 frames]; the un-roped condition is kept once more
        rings = self.sample_steps * c.num_layers * (RING_FRAMES * fsl + lc) * per_layer_token
        cond = c.num_layers * lc * per_layer_token
        context = c.text_len * (c.dim * item + c.text_dim * 4)
        latents = 16 * (1 + 19 + 1 + CLIP_FRAMES) * latent_h * latent_w * item
        return (rings + cond + context) * (2 if self.uses_cfg else 1) + latents

    def new_state(
        self,
        ref_latent: torch.Tensor,
        motion_latents: torch.Tensor,
        text_context: torch.Tensor,
        seed: int,
        neg_text_context: torch.Tensor | None = None,
    ) -> StreamState:
        """Open a session. ref [16,1,h,w], motion [16,Tm,h,w], text [L, text_dim] (unpadded T5 output).

        With CFG on, the unconditional branch uses `neg_text_context`, or an empty prompt (all 512 rows
        zero padding) when none is given; it keeps its own condition cache and rings.
        """
        self._check_latents(ref_latent, motion_latents)
        dev, dtype = self.dit.device, self.dit.dtype
        branches = [BranchCache(text_context.to(dev))]
        if self.uses_cfg:
            neg = neg_text_context if neg_text_context is not None else text_context.new_zeros(0, text_context.shape[1])
            branches.append(BranchCache(neg.to(dev)))
        tokens = frame_tokens(*ref_latent.shape[-2:])
        for br in branches:
            br.rings = [KVRing(self.dit.config.num_layers, tokens) for _ in range(self.sample_steps)]
        return StreamState(
            ref_latent=ref_latent.to(device=dev, dtype=dtype),
            motion_latents=motion_latents.to(device=dev, dtype=dtype),
            seed=seed,
            branches=branches,
            generator=torch.Generator(device=dev),
            sink_rng=random.Random(seed),
        )

    def set_avatar(
        self,
        state: StreamState,
        ref_latent: torch.Tensor | None = None,
        motion_latents: torch.Tensor | None = None,
        text_context: torch.Tensor | None = None,
    ) -> None:
        """Switch reference / motion / prompt from the next block on: the prefill is redone with the
        new inputs while rings and frame counter carry on, so the stream continues without a cut.
        A new reference restarts the adaptive sink, counted from the switch."""
        dev, dtype = self.dit.device, self.dit.dtype
        if ref_latent is not None:
            self._check_latents(ref_latent, motion_latents if motion_latents is not None else state.motion_latents)
            if tuple(ref_latent.shape[-2:]) != tuple(state.latent_hw):
                raise ValueError("set_avatar cannot change the output size of a running stream")
            state.ref_latent = ref_latent.to(device=dev, dtype=dtype)
            state.sink_anchor, state.sink_frame, state.sink_replaced = state.frame, None, False
        if motion_latents is not None:
            self._check_latents(state.ref_latent, motion_latents)
            state.motion_latents = motion_latents.to(device=dev, dtype=dtype)
        if text_context is not None:
            state.branches[0].text_context = text_context.to(dev)
        state.needs_prefill = True

    def step(
        self,
        state: StreamState,
        audio_feats: torch.Tensor,
        noise: torch.Tensor | None = None,
        observer: Observer | None = None,
    ) -> torch.Tensor:
        """Generate the next block: audio features [25, audio_dim, 12] -> latents [16, 3, h, w].

        `noise` overrides the session's noise (replaying a recorded run); `observer` sees every
        denoising forward.
        """
        block = self.begin_block(state, audio_feats, noise)
        for s in range(self.sample_steps):
            velocity = self.denoise(state, block, s)
            if observer is not None:
                observer(s, block.latents, velocity)
            block.latents = self.sampler.step(s, block.latents, velocity)
        return self.finish_block(state, block)

    def begin_block(
        self, state: StreamState, audio_feats: torch.Tensor, noise: torch.Tensor | None = None
    ) -> LatentBlock:
        """Block boundary: apply a pending avatar switch / adaptive sink (prefill), encode the audio,
        draw the noise. `step` = begin_block, `denoise` + Euler per step, finish_block; a pipeline that
        spreads the steps over devices can drive the three parts itself."""
        if audio_feats.shape[-1] != AUDIO_FRAMES_PER_BLOCK:
            raise ValueError(
                f"audio_feats must cover {AUDIO_FRAMES_PER_BLOCK} video frames, got {audio_feats.shape[-1]}"
            )
        self.refresh_condition(state)
        dit = self.dit
        x = noise.to(device=dit.device, dtype=dit.dtype) if noise is not None else self.block_noise(state)
        return LatentBlock(state.frame, dit.encode_audio(audio_feats), x)

    def denoise(self, state: StreamState, block: LatentBlock, s: int) -> torch.Tensor:
        """Denoising forward s of the block (one per branch, writing ring s): the guided velocity."""
        return self.denoise_batch([state], [block], s)[0]

    def batch_key(self, state: StreamState) -> Hashable | None:
        """Sessions whose keys are equal (and not None) may share the denoising forwards of their next
        blocks (`denoise_batch`): the same latent size and branches, the rings full (every block from
        the fourth on: CUDA graphs replay only then) and no prefill due at the next block (an avatar
        switch or the adaptive sink: that block runs alone). Call at a block boundary."""
        if state.needs_prefill or self._sink_due(state) or not state.branches:
            return None
        if state.frame + LATENT_FRAMES_PER_BLOCK < RING_FRAMES:
            return None
        return (tuple(state.latent_hw), len(state.branches))

    def denoise_batch(self, states: Sequence[StreamState], blocks: Sequence[LatentBlock], s: int) -> list[torch.Tensor]:
        """Denoising forward s of several sessions' blocks (latents of one shape): one forward per branch
        over all of them, each writing its own ring s. Returns each block's guided velocity, in order:
        what `denoise` gives it alone (the same sink draw, the same math per session; bitwise on the
        CPU, to kernel rounding on a GPU, where a larger batch may pick other matmul kernels).

        With `cuda_graphs`, a steady group replays graphs of its own (`BatchGraphs`, kept per group of
        sessions in serial order, so the caller's order does not matter)."""
        if len(states) != len(blocks) or not states:
            raise ValueError(f"{len(states)} states for {len(blocks)} blocks")
        shapes = {tuple(b.latents.shape) for b in blocks}
        branches = {len(st.branches) for st in states}
        if len(shapes) > 1 or len(branches) > 1:
            raise ValueError(f"blocks of shapes {sorted(shapes)}, branches {sorted(branches)} cannot share a forward")
        ref_frames = [self._ref_frame(st, b, s) for st, b in zip(states, blocks, strict=True)]
        order = sorted(range(len(states)), key=lambda i: states[i].serial)
        group = None
        if len(states) > 1 and self.cuda_graphs and self.dit.device.type == "cuda":
            group = self._group([states[i] for i in order])
        t = self.sampler.timesteps[s]
        outs = []
        for b in range(branches.pop()):
            members = [
                Member(
                    states[i].branches[b],
                    states[i].branches[b].rings[s],
                    blocks[i].latents,
                    blocks[i].audio,
                    blocks[i].frame_start,
                    ref_frames[i],
                )
                for i in order
            ]
            outs.append(self.forward_batch(members, t, graphs=(group.cell(b, s), group) if group else None))
        velocities = {
            i: guided_velocity(outs[0][j], outs[1][j] if len(outs) > 1 else None, self.guide_scale)
            for j, i in enumerate(order)
        }
        return [velocities[i] for i in range(len(states))]

    def forward(
        self,
        branch: BranchCache,
        ring: KVRing,
        latents: torch.Tensor,
        t: torch.Tensor | float,
        audio: AudioEmbedding,
        frame_start: int,
        ref_frame: int,
        layers: tuple[int, int] | None = None,
        hidden: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One DiT forward of a block with one branch's caches and one step's ring; from a captured
        CUDA graph in the steady state when `cuda_graphs` is on, eagerly otherwise. `layers`/`hidden`:
        only part of the forward (see `LiveAvatarDiT.forward_segments`), always eager."""
        out = self.forward_batch([Member(branch, ring, latents, audio, frame_start, ref_frame)], t, layers, hidden)
        return out if layers is not None and layers[1] < len(self.dit.blocks) else out[0]

    def forward_batch(
        self,
        members: Sequence[Member],
        t: torch.Tensor | float,
        layers: tuple[int, int] | None = None,
        hidden: torch.Tensor | None = None,
        graphs: tuple[GraphCell, BatchGraphs] | None = None,
    ) -> torch.Tensor:
        """One DiT forward of the members' blocks (one shape) at timestep t: velocities [S, 16, F, h, w]
        (the token stream [S, L, C] after a partial forward, `layers`/`hidden`, always eager).

        CUDA graphs (`cuda_graphs`, a CUDA device, every member's ring full): one member replays the
        graph on its ring with its branch's pool; several replay `graphs` (the cell and pool of their
        group), eagerly when none is given."""
        dit = self.dit
        first = members[0]
        frames, hp, wp = first.latents.shape[1], first.latents.shape[2] // 2, first.latents.shape[3] // 2
        latents = first.latents[None] if len(members) == 1 else torch.stack([m.latents for m in members])

        def eager() -> torch.Tensor:
            t_dev = torch.as_tensor(t, dtype=torch.float32, device=dit.device).reshape(1)
            segments = [
                Segment(
                    m.branch.context,
                    m.audio,
                    *dit.rope_tables(m.frame_start, frames, hp, wp, m.ref_frame),
                    m.branch.cond_kv,
                    m.ring.at(m.frame_start),
                )
                for m in members
            ]
            return dit.forward_segments(latents, t_dev, segments, layers, hidden)

        steady = all(m.frame_start + frames >= m.ring.frames for m in members)
        if not (self.cuda_graphs and layers is None and dit.device.type == "cuda" and steady):
            return eager()
        if len(members) > 1 and graphs is None:
            return eager()
        t_dev = torch.as_tensor(t, dtype=torch.float32, device=dit.device).reshape(1)
        fn, args = graph_call(dit, members, latents, t_dev)
        if len(members) == 1:
            return self._replay(first.ring, first.branch, fn, args, eager)[None]
        assert graphs is not None  # checked above; for mypy
        return self._replay(graphs[0], graphs[1], fn, args, eager)

    def _replay(
        self, cell: Any, owner: Any, fn: Callable[..., torch.Tensor], args: tuple[Any, ...], eager: Callable[[], Any]
    ) -> torch.Tensor:
        """`fn(*args)` from the CUDA graph runner in `cell.graph` (made at first use, its memory in
        `owner.graph_pool`, whose size goes to `owner.graph_nbytes` after each capture). The state args
        (texts at 3, condition caches at 8) stay in place; the rest is copied into the graph. A graph
        that cannot be captured turns graphs off (eager from then on); for a batch's graph (`owner` a
        `BatchGraphs`) it raises instead, so the caller stops batching and no session loses its graphs."""
        try:
            if cell.graph is None:
                from engines.compile import CUDAGraphRunner

                if owner.graph_pool is None:
                    owner.graph_pool = torch.cuda.graph_pool_handle()
                cell.graph = CUDAGraphRunner(fn, static_args=(3, 8), warmup=1, max_graphs=2, pool=owner.graph_pool)
            captures = len(cell.graph.graphs)
            out = cell.graph(*args)
            if len(cell.graph.graphs) > captures:  # a new capture: the pool has grown
                from engines.compile import pool_nbytes

                owner.graph_nbytes = pool_nbytes(owner.graph_pool, self.dit.device.index)
            return out
        except torch.OutOfMemoryError:
            raise  # the session's problem (the server ends it), not a reason to stop capturing
        except RuntimeError as exc:  # a kernel that cannot be captured: stay correct, go eager
            cell.graph = None
            if isinstance(owner, BatchGraphs):  # the caller stops batching; each session keeps its graphs
                raise RuntimeError(f"CUDA graph of a batch of {len(owner.members)} failed: {exc}") from exc
            log.warning("CUDA graph capture failed (%s); denoising eagerly from now on", exc)
            self.cuda_graphs = False
            return eager()

    def release(self, state: StreamState) -> None:
        """Free the graphs of every batched group `state` is in (they read and write its rings): call
        when the session closes. Its partners keep their own graphs and form new groups."""
        for group in state.batch_graphs:
            self.batch_graphs.pop(group.members, None)
            group.free()
        state.batch_graphs.clear()

    def _group(self, states: Sequence[StreamState]) -> BatchGraphs:
        """The graph group of these sessions (in this order), made on first use; beyond
        `max_batch_graphs` groups the least recently used one is freed."""
        key = tuple(st.serial for st in states)
        group = self.batch_graphs.get(key)
        if group is not None:
            self.batch_graphs.move_to_end(key)
            return group
        group = self.batch_graphs[key] = BatchGraphs(key)
        while len(self.batch_graphs) > max(1, self.max_batch_graphs):
            _, old = self.batch_graphs.popitem(last=False)
            old.free()
        for st in states:
            st.batch_graphs = [g for g in st.batch_graphs if not g.freed] + [group]
        return group

    def finish_block(self, state: StreamState, block: LatentBlock) -> torch.Tensor:
        """Advance the session past the block; remember the adaptive sink's candidate frame."""
        if state.sink_frame is None and not state.sink_replaced:
            state.sink_frame = block.latents[:, :1].clone()
        state.frame = block.frame_start + LATENT_FRAMES_PER_BLOCK
        return block.latents

    def refresh_condition(self, state: StreamState) -> None:
        """At a block boundary (`state.frame` is the block's first frame): swap in the adaptive sink
        when its clip is over, and redo the prefill if that or an avatar switch asks for it."""
        self._maybe_replace_sink(state)
        if state.needs_prefill:
            self._prefill(state)

    def block_noise(self, state: StreamState) -> torch.Tensor:
        """The session's initial noise of the block at `state.frame` [16, 3, h, w] (a view of the
        clip's noise: clone it before changing it). The original draws one [16, 12, h, w] tensor per
        clip from a generator seeded seed + clip; block b of the clip uses its frames 3b..3b+2. Same
        here (same values on the same device and dtype)."""
        clip, offset = divmod(state.frame, CLIP_FRAMES)
        if clip != state.clip_index:
            state.generator.manual_seed(state.seed + clip)
            h, w = state.latent_hw
            state.clip_noise = torch.randn(
                16, CLIP_FRAMES, h, w, generator=state.generator, dtype=self.dit.dtype, device=self.dit.device
            )
            state.clip_index = clip
        return state.clip_noise[:, offset : offset + LATENT_FRAMES_PER_BLOCK]

    # --- internals ----------------------------------------------------------------------------------

    def _check_latents(self, ref_latent: torch.Tensor, motion_latents: torch.Tensor) -> None:
        if ref_latent.ndim != 4 or ref_latent.shape[:2] != (16, 1):
            raise ValueError(f"ref_latent must be [16, 1, h, w], got {tuple(ref_latent.shape)}")
        if motion_latents.ndim != 4 or motion_latents.shape[0] != 16:
            raise ValueError(f"motion_latents must be [16, Tm, h, w], got {tuple(motion_latents.shape)}")
        h, w = ref_latent.shape[-2:]
        if motion_latents.shape[-2:] != (h, w):
            raise ValueError("motion_latents and ref_latent must have the same latent size")
        if h % 8 or w % 8:
            raise ValueError(f"latent size {h}x{w} must be divisible by 8 (pixel size by 64) for FramePack")

    def _sink_due(self, state: StreamState) -> bool:
        """Whether the adaptive sink replaces the reference at the next block (one clip after it took effect)."""
        return not (state.sink_replaced or state.sink_frame is None or state.frame < state.sink_anchor + CLIP_FRAMES)

    def _maybe_replace_sink(self, state: StreamState) -> None:
        """Adaptive sink: one clip after the reference took effect, anchor on what was generated."""
        if not self._sink_due(state):
            return
        state.ref_latent, state.sink_frame, state.sink_replaced = state.sink_frame, None, True
        state.needs_prefill = True

    def _ref_frame(self, state: StreamState, block: LatentBlock, s: int) -> int:
        """The sink position of the block's step s: drawn at its first forward, then kept."""
        if s not in block.ref_frames:
            block.ref_frames[s] = sink_ref_frame(block.frame_start, state.draw_sink_shift())
        return block.ref_frames[s]

    def _prefill(self, state: StreamState) -> None:
        for br in state.branches:
            if br.context_of is not br.text_context:
                br.context = _assign(br.context, self.dit.embed_text(br.text_context))
                br.context_of = br.text_context
            cond_kv = self.dit.prefill(state.ref_latent, state.motion_latents, br.context)
            if br.cond_kv is None:
                br.cond_kv = cond_kv
            else:
                br.cond_kv = [
                    (_assign(k, nk), _assign(v, nv)) for (k, v), (nk, nv) in zip(br.cond_kv, cond_kv, strict=True)
                ]
        state.needs_prefill = False
        state.prefills += 1


def _assign(old: torch.Tensor | None, new: torch.Tensor) -> torch.Tensor:
    """Write `new` into `old` when it fits (same storage: captured graphs keep reading it), else `new`."""
    if old is None or old.shape != new.shape or old.dtype != new.dtype or old.device != new.device:
        return new
    return old.copy_(new)


def graph_call(
    dit: LiveAvatarDiT, members: Sequence[Member], latents: torch.Tensor, t: torch.Tensor
) -> tuple[Callable[..., torch.Tensor], tuple[Any, ...]]:
    """What a CUDA graph of the members' steady-state forward captures: the function and its arguments
    (`_graphed_forward` for one member, `_graphed_forward_batch` for several; latents [S, 16, F, h, w],
    t [1] on the device). Each member's RoPE tables and write slots are device tensors, so a replay
    takes no per-block Python ints; the texts (argument 3) and condition caches (8) stay in place."""
    frames, hp, wp = latents.shape[2], latents.shape[3] // 2, latents.shape[4] // 2
    tables = [dit.rope_tables(m.frame_start, frames, hp, wp, m.ref_frame) for m in members]
    slots = []
    for m in members:
        start = m.ring.cond_tokens + m.ring.slot_offset(m.frame_start)
        slots.append(torch.arange(start, start + frames * m.ring.frame_tokens, device=dit.device))
    per_member = (
        [m.branch.context for m in members],
        [m.audio.tokens for m in members],
        [m.audio.global_emb for m in members],
        [factors for factors, _ in tables],
        [cond_factors for _, cond_factors in tables],
        [m.branch.cond_kv for m in members],
        [m.ring for m in members],
        slots,
    )
    if len(members) == 1:
        return _graphed_forward, (dit, latents[0].contiguous(), t, *(values[0] for values in per_member))
    return _graphed_forward_batch, (dit, latents.contiguous(), t, *per_member)


def _graphed_forward(
    dit: LiveAvatarDiT,
    latents: torch.Tensor,
    t: torch.Tensor,
    context: torch.Tensor,
    audio_tokens: torch.Tensor,
    audio_global: torch.Tensor,
    factors: torch.Tensor,
    cond_factors: torch.Tensor,
    cond_kv: list[KV],
    ring: KVRing,
    slots: torch.Tensor,
) -> torch.Tensor:
    """The steady-state forward of one block as its graph captures it: `_graphed_forward_batch` with one
    member, latents [16, F, h, w] -> velocity [16, F, h, w]."""
    return _graphed_forward_batch(
        dit, latents[None], t, [context], [audio_tokens], [audio_global], [factors], [cond_factors], [cond_kv],
        [ring], [slots],
    )[0]  # fmt: skip


def _graphed_forward_batch(
    dit: LiveAvatarDiT,
    latents: torch.Tensor,
    t: torch.Tensor,
    contexts: list[torch.Tensor],
    audio_tokens: list[torch.Tensor],
    audio_globals: list[torch.Tensor],
    factors: list[torch.Tensor],
    cond_factors: list[torch.Tensor],
    cond_kvs: list[list[KV]],
    rings: list[KVRing],
    slots: list[torch.Tensor],
) -> torch.Tensor:
    """The steady-state forward of S blocks (latents [S, 16, F, h, w]) as a graph captures it: every
    ring is full (frame_start = ring.frames only sets the attended length), each block's write
    position comes from its `slots`."""
    segments = [
        Segment(context, AudioEmbedding(tokens, glob), f, cf, kv, ring.at(ring.frames, sl))
        for context, tokens, glob, f, cf, kv, ring, sl in zip(
            contexts, audio_tokens, audio_globals, factors, cond_factors, cond_kvs, rings, slots, strict=True
        )
    ]
    return dit.forward_segments(latents, t, segments)

"""Blocks of several sessions through one DiT forward (issue 11, item 5): each session gets exactly what
it gets alone. On the CPU the batched forward is bitwise equal to the single one (fp32, emulated FP8,
CFG); on a GPU (last test) to kernel rounding: a larger batch may take other matmul kernels, and FP8
batches use the row-wise scaled kernel."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from liveavatar.acceleration.accelerate import apply_fp8
from liveavatar.backends.liveavatar.generator import LiveAvatarGenerator
from liveavatar.generator import AudioWindow, AvatarSpec, Size
from liveavatar.models.config import DiTConfig
from liveavatar.models.rope import sink_ref_frame
from liveavatar.models.transformer_liveavatar import LiveAvatarDiT
from liveavatar.streaming.dit import (
    BatchGraphs,
    Member,
    StreamingDiT,
    StreamState,
    _graphed_forward,
    _graphed_forward_batch,
    graph_call,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LATENT = 8
SIZE = Size(128, 128)
"""The tiny generator's size: 64 DiT tokens per latent frame."""


def session_inputs(cfg: DiTConfig, seed: int, blocks: int = 10, latent: int = LATENT) -> dict[str, Any]:
    """Reference, motion, prompt (its length differs per seed) and per-block audio features of one session."""
    g = torch.Generator().manual_seed(seed)
    return {
        "ref": torch.randn(16, 1, latent, latent, generator=g),
        "motion": torch.randn(16, 19, latent, latent, generator=g),
        "text": torch.randn(4 + seed, cfg.text_dim, generator=g),
        "audio": [torch.randn(cfg.audio_layers, cfg.audio_dim, 12, generator=g) for _ in range(blocks)],
    }


def open_state(stream: StreamingDiT, inputs: dict[str, Any], seed: int) -> StreamState:
    return stream.new_state(inputs["ref"], inputs["motion"], inputs["text"], seed=seed)


def make_stream(kind: str) -> StreamingDiT:
    torch.manual_seed(0)
    dit = LiveAvatarDiT(DiTConfig.tiny(num_layers=2)).eval()
    if kind == "fp8":
        apply_fp8(dit, emulate=True)
    return StreamingDiT(dit, guide_scale=2.0 if kind == "cfg" else 0.0)


@pytest.mark.parametrize("kind", ["fp32", "fp8", "cfg"])
def test_a_batch_of_two_sessions_gives_each_the_latents_it_gets_alone(kind: str) -> None:
    """Different portraits, prompts, audio and seeds; b runs two blocks ahead of a, so their blocks sit at
    other frame positions and ring slots, and their sink shifts are drawn from other seeds."""
    stream = make_stream(kind)
    cfg = stream.dit.config
    inputs_a, inputs_b = session_inputs(cfg, 1), session_inputs(cfg, 2)

    def run(batched: bool) -> tuple[list[torch.Tensor], list[torch.Tensor], list[tuple[Any, ...]]]:
        a, b = open_state(stream, inputs_a, seed=11), open_state(stream, inputs_b, seed=12)
        out_a = [stream.step(a, inputs_a["audio"][i]) for i in range(5)]
        out_b = [stream.step(b, inputs_b["audio"][i]) for i in range(7)]
        seen = []
        for i in range(5, 8):
            if not batched:
                out_a.append(stream.step(a, inputs_a["audio"][i]))
                out_b.append(stream.step(b, inputs_b["audio"][i + 2]))
                continue
            assert stream.batch_key(a) == stream.batch_key(b) is not None
            blocks = [stream.begin_block(a, inputs_a["audio"][i]), stream.begin_block(b, inputs_b["audio"][i + 2])]
            for s in range(stream.sample_steps):
                for block, v in zip(blocks, stream.denoise_batch([b, a][::-1], blocks, s), strict=True):
                    block.latents = stream.sampler.step(s, block.latents, v)
            seen.append((blocks[0].frame_start, blocks[1].frame_start, blocks[0].ref_frames, blocks[1].ref_frames))
            out_a.append(stream.finish_block(a, blocks[0]))
            out_b.append(stream.finish_block(b, blocks[1]))
        return out_a, out_b, seen

    alone_a, alone_b, _ = run(batched=False)
    batch_a, batch_b, seen = run(batched=True)
    for x, y in zip(alone_a + alone_b, batch_a + batch_b, strict=True):
        assert torch.equal(x, y)
    assert all(fa != fb and ra != rb for fa, fb, ra, rb in seen), seen  # other positions, other sink shifts
    assert not torch.equal(batch_a[-1], batch_b[-1])


def test_the_order_of_a_batch_does_not_matter_and_mismatched_blocks_are_refused() -> None:
    stream = make_stream("fp32")
    cfg = stream.dit.config
    inputs = [session_inputs(cfg, s) for s in (1, 2)]
    states = [open_state(stream, inputs[i], seed=20 + i) for i in range(2)]
    for i in range(5):
        for st, inp in zip(states, inputs, strict=True):
            stream.step(st, inp["audio"][i])
    blocks = [stream.begin_block(st, inp["audio"][5]) for st, inp in zip(states, inputs, strict=True)]
    forward = stream.denoise_batch(states, blocks, 0)
    backward = stream.denoise_batch(states[::-1], blocks[::-1], 0)
    assert torch.equal(forward[0], backward[1]) and torch.equal(forward[1], backward[0])

    small = open_state(stream, session_inputs(cfg, 3, latent=16), seed=3)
    other = stream.begin_block(small, inputs[0]["audio"][0])
    with pytest.raises(ValueError, match="cannot share a forward"):
        stream.denoise_batch([states[0], small], [blocks[0], other], 0)
    with pytest.raises(ValueError, match="2 states for 1 blocks"):
        stream.denoise_batch(states, blocks[:1], 0)


def test_only_steady_blocks_with_no_prefill_due_and_the_same_shape_share_a_forward() -> None:
    stream = make_stream("fp32")
    cfg = stream.dit.config
    inputs = session_inputs(cfg, 1)
    state = open_state(stream, inputs, seed=1)
    keys = []
    for i in range(6):  # blocks at frames 0, 3, 6, 9, 12 (adaptive sink: prefill), 15
        keys.append(stream.batch_key(state))
        stream.step(state, inputs["audio"][i])
    assert keys[:3] == [None, None, None], "the ring is not full before the fourth block"
    assert keys[3] is not None and keys[4] is None and keys[5] == keys[3], keys
    stream.set_avatar(state, ref_latent=torch.randn(16, 1, LATENT, LATENT))
    assert stream.batch_key(state) is None, "a switch redoes the prefill at the next block"
    stream.step(state, inputs["audio"][6])
    assert stream.batch_key(state) == keys[3]

    bigger = open_state(stream, session_inputs(cfg, 2, latent=16), seed=2)
    for i in range(5):
        stream.step(bigger, inputs["audio"][i])
    assert stream.batch_key(bigger) is not None and stream.batch_key(bigger) != keys[3]
    cfg_stream = StreamingDiT(stream.dit, guide_scale=2.0)
    guided = open_state(cfg_stream, inputs, seed=1)
    for i in range(5):
        cfg_stream.step(guided, inputs["audio"][i])
    assert cfg_stream.batch_key(guided) not in (None, keys[3]), "two branches against one"


def test_the_graph_function_of_a_batch_is_the_eager_batched_forward() -> None:
    """What a CUDA graph of a pair captures (device write slots, no per-block Python ints), run directly."""
    stream = make_stream("fp32")
    dit, cfg = stream.dit, stream.dit.config
    inputs = [session_inputs(cfg, s) for s in (1, 2)]
    states = [open_state(stream, inputs[i], seed=30 + i) for i in range(2)]
    for i in range(5):
        stream.step(states[0], inputs[0]["audio"][i])
    for i in range(6):
        stream.step(states[1], inputs[1]["audio"][i])
    blocks = [stream.begin_block(st, inp["audio"][6]) for st, inp in zip(states, inputs, strict=True)]
    members = []
    for st, b in zip(states, blocks, strict=True):
        br = st.branches[0]
        members.append(Member(br, br.rings[1], b.latents, b.audio, b.frame_start, sink_ref_frame(b.frame_start, 5)))
    saved = [[k.clone() for k in m.ring.k] for m in members]
    eager = stream.forward_batch(members, stream.sampler.timesteps[1])
    written = [[k.clone() for k in m.ring.k] for m in members]
    for m, keys in zip(members, saved, strict=True):
        for k, k0 in zip(m.ring.k, keys, strict=True):
            k.copy_(k0)
    t_dev = torch.as_tensor(stream.sampler.timesteps[1], dtype=torch.float32).reshape(1)
    fn, args = graph_call(dit, members, torch.stack([m.latents for m in members]), t_dev)
    assert fn is _graphed_forward_batch
    graphed = fn(*args)
    assert torch.equal(graphed, eager)
    for m, keys in zip(members, written, strict=True):
        assert all(torch.equal(k, k2) for k, k2 in zip(m.ring.k, keys, strict=True))
    for i, m in enumerate(members):  # and each row is the member's forward alone
        t = stream.sampler.timesteps[1]
        alone = stream.forward(m.branch, m.ring, m.latents, t, m.audio, m.frame_start, m.ref_frame)
        assert torch.equal(alone, eager[i])
        fn, args = graph_call(dit, [m], m.latents[None], t_dev)  # what one session's own graph captures
        assert fn is _graphed_forward and torch.equal(fn(*args), alone)


def test_a_group_of_batched_sessions_shares_its_graph_memory_and_is_freed_when_one_leaves() -> None:
    stream = make_stream("fp32")
    stream.max_batch_graphs = 2
    cfg = stream.dit.config
    a, b, c = (open_state(stream, session_inputs(cfg, s), seed=s) for s in (1, 2, 3))
    ab = stream._group([a, b])
    assert stream._group([a, b]) is ab and list(stream.batch_graphs) == [(a.serial, b.serial)]
    ab.graph_nbytes = 1000
    before = b.nbytes()
    assert a.graph_nbytes() == b.graph_nbytes() == 500  # counted for admission, half each
    bc = stream._group([b, c])
    bc.graph_nbytes = 600
    assert b.graph_nbytes() == 800 and c.graph_nbytes() == 300

    stream.release(a)  # a leaves: the pair's graphs go, b keeps its other group
    assert ab.freed and not ab.cells and ab.graph_pool is None
    assert list(stream.batch_graphs) == [(b.serial, c.serial)]
    assert b.graph_nbytes() == 300 and b.nbytes() == before - 500 + 300 and a.graph_nbytes() == 0

    ca, cb = stream._group([c, a]), stream._group([c, b])  # a third group: the least recently used goes
    assert bc.freed and not ca.freed and not cb.freed and len(stream.batch_graphs) == 2
    assert isinstance(cb, BatchGraphs) and c.batch_graphs == [ca, cb], "freed groups are dropped from a state"


# --- the generator -------------------------------------------------------------------------------


class LatentDecoder:
    """Stands in for the tiny VAE (1.7 s a block on this CPU): frames are a fixed function of the latents,
    and every decoded latent block is kept on the session's decoder state (not by `id`: a closed
    session's id can come back), so tests compare the latents themselves."""

    def __init__(self) -> None:
        self.states: list[_VaeState] = []

    def new_state(self, motion_latents: torch.Tensor) -> Any:
        self.states.append(_VaeState())
        return self.states[-1]

    def decode(self, vae_state: Any, latents: torch.Tensor) -> torch.Tensor:
        vae_state.decoded.append(latents.clone())
        x = latents[:3].float().repeat_interleave(4, dim=1).tanh()
        return x.repeat_interleave(8, dim=2).repeat_interleave(8, dim=3)


class _VaeState:
    def __init__(self) -> None:
        self.feat_cache: list[Any] = []
        self.decoded: list[torch.Tensor] = []

    def nbytes(self) -> int:
        return 0


@pytest.fixture
def batching_gen(tiny_liveavatar: Any) -> LiveAvatarGenerator:
    """The tiny backend's models, batching at its size (64 tokens per frame), with `LatentDecoder`."""
    gen = LiveAvatarGenerator(tiny_liveavatar.pipeline, motion_frames=5, batch_sessions=2, batch_frame_tokens=64)
    gen.decoder = LatentDecoder()  # type: ignore[assignment]
    return gen


def portrait(seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).random((96, 80, 3)) * 255).astype(np.uint8)


def window(session: int, index: int, samples: int = 7680) -> AudioWindow:
    rng = np.random.default_rng(1000 * session + index)
    return AudioWindow((rng.standard_normal(samples) * 0.1).astype(np.float32), index=index)


SPECS = [AvatarSpec(portrait(1), "a man speaks", seed=3), AvatarSpec(portrait(2), "a woman talks", seed=8)]


def latents_of(gen: LiveAvatarGenerator, state: Any) -> list[torch.Tensor]:
    return state.vae.decoded


def test_the_generator_makes_a_batch_of_blocks_as_each_alone_also_at_fewer_steps(
    batching_gen: LiveAvatarGenerator,
) -> None:
    gen = batching_gen

    def run(batched: bool) -> list[list[torch.Tensor]]:
        a, b = gen.open(SPECS[0], SIZE), gen.open(SPECS[1], SIZE)
        for i in range(5):
            gen.step(a, window(0, i))
        for i in range(6):
            gen.step(b, window(1, i))
        for i in range(5, 9):
            if i == 7:  # degraded: both at 2 steps, still batched (same steps)
                gen.set_sample_steps(a, 2), gen.set_sample_steps(b, 2)
            items = [(a, window(0, i)), (b, window(1, i + 1))]
            if batched:
                assert gen.batch_key(*items[0]) == gen.batch_key(*items[1]) is not None
                results = gen.step_batch(items)
                assert all(isinstance(r, np.ndarray) and r.shape == (12, 128, 128, 3) for r in results)
            else:
                for state, w in items:
                    gen.step(state, w)
        profile = a.profile[-1]
        assert profile.batch == (2 if batched else 1) and profile.steps == 2
        out = [latents_of(gen, a), latents_of(gen, b)]
        gen.close(a), gen.close(b)
        return out

    alone, together = run(batched=False), run(batched=True)
    for xs, ys in zip(alone, together, strict=True):
        assert len(xs) == len(ys) and all(torch.equal(x, y) for x, y in zip(xs, ys, strict=True))


def steady_pair(gen: LiveAvatarGenerator) -> list[Any]:
    states = [gen.open(spec, SIZE) for spec in SPECS]
    for i in range(5):
        for s, state in enumerate(states):
            gen.step(state, window(s, i))
    return states


def test_the_generator_batches_only_same_steps_no_switch_good_windows_and_small_sizes(
    batching_gen: LiveAvatarGenerator, tiny_liveavatar: Any
) -> None:
    gen = batching_gen
    a, b = steady_pair(gen)
    key = gen.batch_key(a, window(0, 5))
    assert key is not None and gen.batch_key(b, window(1, 5)) == key
    assert gen.batch_key(a, window(0, 5, samples=100)) is None, "a bad window runs (and fails) alone"
    gen.set_sample_steps(b, 3)
    assert gen.batch_key(b, window(1, 5)) not in (None, key)
    gen.set_sample_steps(b, None)
    gen.switch(b, SPECS[0])
    assert gen.batch_key(b, window(1, 5)) is None, "a pending switch runs alone"
    assert gen.step_batch([(a, window(0, 5)), (b, window(1, 5))])[1].shape == (12, 128, 128, 3)
    assert b.profile[-1].batch == 1 and a.profile[-1].batch == 1, "not batched: made one by one"

    small = LiveAvatarGenerator(tiny_liveavatar.pipeline, motion_frames=5, batch_sessions=2, batch_frame_tokens=32)
    assert small.max_batch == 2 and small.batch_key(a, window(0, 6)) is None, "64 tokens per frame > 32"
    assert LiveAvatarGenerator(tiny_liveavatar.pipeline, motion_frames=5, batch_sessions=1).max_batch == 1
    assert tiny_liveavatar.max_batch == 1, "off unless asked for (--batch-sessions)"
    gen.close(a)
    assert gen.batch_key(a, window(0, 6)) is None
    gen.close(b)


def test_a_bad_window_or_a_closed_session_fails_alone_and_the_others_are_still_made(
    batching_gen: LiveAvatarGenerator,
) -> None:
    gen = batching_gen
    a, b = steady_pair(gen)
    reference = [gen.open(spec, SIZE) for spec in SPECS]
    for i in range(5):
        for s, state in enumerate(reference):
            gen.step(state, window(s, i))
    gen.step(reference[0], window(0, 5))

    results = gen.step_batch([(a, window(0, 5)), (b, window(1, 5, samples=100))])
    assert isinstance(results[0], np.ndarray)
    assert isinstance(results[1], ValueError) and "window has 100 samples" in str(results[1])
    assert torch.equal(latents_of(gen, a)[-1], latents_of(gen, reference[0])[-1])
    assert b.blocks == 5, "the bad block did not advance its session"

    gen.close(a)
    results = gen.step_batch([(a, window(0, 6)), (b, window(1, 5))])
    assert isinstance(results[0], RuntimeError) and "closed" in str(results[0])
    assert isinstance(results[1], np.ndarray) and b.blocks == 6
    gen.step(reference[1], window(1, 5))
    assert torch.equal(latents_of(gen, b)[-1], latents_of(gen, reference[1])[-1])
    for state in [b, *reference]:
        gen.close(state)


def test_a_failure_inside_a_batched_forward_turns_batching_off_and_each_session_goes_on_alone(
    batching_gen: LiveAvatarGenerator, monkeypatch: pytest.MonkeyPatch
) -> None:
    gen = batching_gen
    a, b = steady_pair(gen)
    reference = steady_pair(gen)
    for s, state in enumerate(reference):
        gen.step(state, window(s, 5))
    batched = gen.dit.denoise_batch
    calls = []

    def failing(states: Any, blocks: Any, s: int) -> list[torch.Tensor]:
        calls.append(len(states))
        if len(states) > 1 and s == 2:
            raise torch.OutOfMemoryError("injected: no memory for the pair")
        return batched(states, blocks, s)

    monkeypatch.setattr(gen.dit, "denoise_batch", failing)
    results = gen.step_batch([(a, window(0, 5)), (b, window(1, 5))])
    assert all(isinstance(r, np.ndarray) for r in results)
    assert calls == [2, 2, 2, 1, 1, 1, 1], "steps 0-1 batched, step 2 failed, steps 2-3 alone for each"
    for state, ref in zip((a, b), reference, strict=True):
        assert torch.equal(latents_of(gen, state)[-1], latents_of(gen, ref)[-1])
    assert gen.batch_off is not None and "OutOfMemoryError" in gen.batch_off
    assert gen.batch_key(a, window(0, 6)) is None, "batching stays off"
    for state in [a, b, *reference]:
        gen.close(state)


def test_closing_a_session_frees_the_graphs_of_its_batches(batching_gen: LiveAvatarGenerator) -> None:
    gen = batching_gen
    a, b = (gen.open(spec, SIZE) for spec in SPECS)
    group = gen.dit._group([a.stream, b.stream])
    group.graph_nbytes = 4096
    assert gen.state_nbytes(b) >= 2048
    gen.close(a)
    assert group.freed and not gen.dit.batch_graphs and b.stream.graph_nbytes() == 0
    gen.close(b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU (none here)")
def test_cuda_graphs_of_a_pair_replay_what_each_session_gets_alone() -> None:
    torch.manual_seed(0)
    cfg = DiTConfig.tiny(num_layers=2)
    dit = LiveAvatarDiT(cfg).eval().to("cuda", torch.bfloat16)
    eager, graphed = StreamingDiT(dit), StreamingDiT(dit, cuda_graphs=True)
    inputs = [session_inputs(cfg, s) for s in (1, 2)]
    for inp in inputs:
        for name in ("ref", "motion", "text"):
            inp[name] = inp[name].to("cuda", torch.bfloat16)
        inp["audio"] = [x.to("cuda", torch.bfloat16) for x in inp["audio"]]
    alone = [open_state(eager, inputs[i], seed=40 + i) for i in range(2)]
    pair = [open_state(graphed, inputs[i], seed=40 + i) for i in range(2)]
    for i in range(5):
        for j in range(2):
            eager.step(alone[j], inputs[j]["audio"][i]), graphed.step(pair[j], inputs[j]["audio"][i])
    for i in range(5, 9):
        want = [eager.step(alone[j], inputs[j]["audio"][i]) for j in range(2)]
        blocks = [graphed.begin_block(pair[j], inputs[j]["audio"][i]) for j in range(2)]
        for s in range(graphed.sample_steps):
            for block, v in zip(blocks, graphed.denoise_batch(pair, blocks, s), strict=True):
                block.latents = graphed.sampler.step(s, block.latents, v)
        for j in range(2):
            got = graphed.finish_block(pair[j], blocks[j])
            torch.testing.assert_close(got.float(), want[j].float(), rtol=0, atol=2e-2)
    assert graphed.cuda_graphs, "capture must not have fallen back to eager"
    (group,) = graphed.batch_graphs.values()
    assert len(group.cells) == graphed.sample_steps and group.graph_nbytes > 0
    graphed.release(pair[0])
    assert group.freed and not graphed.batch_graphs


def test_the_warm_up_measures_a_batch_against_one_by_one_and_keeps_batching_only_if_faster(
    batching_gen: LiveAvatarGenerator, tiny_liveavatar: Any
) -> None:
    from liveavatar.backends.liveavatar.warmup import warm_up_batching

    gen = batching_gen
    gen.default_size = SIZE
    on = warm_up_batching(gen, portrait(5))
    assert on == (gen.batch_off is None) and (on or "slower than one by one" in str(gen.batch_off))
    assert not gen.dit.batch_graphs, "its sessions are closed"
    assert all(len(v.decoded) == 9 for v in gen.decoder.states)  # type: ignore[attr-defined]

    gen.batch_off = None
    gen.batch_frame_tokens = 32  # 128*128 has 64 tokens per frame: over the limit
    assert warm_up_batching(gen, portrait(5)) is False and gen.batch_off is None

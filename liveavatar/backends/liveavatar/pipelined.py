"""One session over a GPU set: the LiveAvatar backend with its blocks flowing through N ranks.

`PipelinedGenerator` is a `Generator` whose model runs in N processes, one per device of its set,
joined by a torch.distributed process group (NCCL on GPUs, gloo on the CPU for tests). The denoising
steps of every block are spread over the ranks by the timestep-forcing pipeline (`engines.tpp`, the
balanced plan: step boundaries cut between DiT layers so every rank has the same work, the VAE decode
counted on the last rank), so while rank 1 finishes block b, rank 0 already denoises block b+1: a
session's throughput grows with N while each block's latency stays about one block time.

How the parts talk:
- The server process holds no model. It sends the same command sequence to every rank (`open`,
  `block`, `switch`, `close`) through one queue per rank; every rank handles them in that order,
  which is what keeps NCCL's point-to-point operations matched across sessions.
- `open` and `switch`: rank 0 encodes the portrait (VAE) and the prompt (umT5) and broadcasts the
  conditioning over a gloo group; each denoising rank builds the session's `StreamStages` for its own
  steps, the decoding rank its VAE cache. A broadcast waits for every rank, so it drains the pipeline
  once: about one block time per open or switch.
- `block`: rank 0 computes the window's wav2vec2 features once (16–19 ms at 704×384 on an H200) and
  they travel down the chain of denoising ranks with the block's latents (`RankPipe.share`; the plan
  counts that work on rank 0 as `lead_cost`); each rank runs its spans and hands the latents on; the
  last rank decodes and sends the 12 frames back. Each rank also reports its busy time per block (the
  waits for its neighbours left out), whose largest is the pipeline's block interval (what admission
  and the load meter read).
- Failures: an exception in a rank, or a rank process that dies, breaks the pipeline (its peers would
  wait forever): every pending and later call of this generator fails with `PipelineBroken`, whose
  message says which rank and why, so its sessions end with an error and the server carries on.

The ranks work on N blocks at once (`pipeline_depth` = N); the server keeps one more submitted, which
waits at rank 0 (`submit`; server/avatar.py). `step` is `submit` + wait, the sequential API that
warm-up and offline tools use. The denoising step count is fixed: the server's
step governor does not apply, because a skipped step's KV cache would need this block's keys and
values from a step on another GPU (40 layers × 2 × 32 MB at 704×384 per block). Under overload a
pipelined session degrades by the other means of docs/architecture.md's order (idle blocks first,
then dropping late blocks to the lag bound).
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import itertools
import logging
import queue as queue_mod
import statistics
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any

import numpy as np

from liveavatar.generator import AudioWindow, AvatarSpec, Generator, Size

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 3600.0
"""How long the ranks may take to load the model and be ready (a 14B checkpoint from a slow disk)."""
REPLY_TIMEOUT_S = 600.0
"""How long `open`, `step` and `session_nbytes` wait for the ranks (the first block compiles)."""
DECODE_COST = 0.65
"""VAE time per block in units of one DiT step for the balanced plan (120 / 182 ms: H200, FP8,
704×384, docs/benchmarks.md); `liveavatar bench --decode-cost` measures other settings."""
AUDIO_COST = 0.1
"""wav2vec2 time per block in units of one DiT step (19 / 190 ms: H200, FP8, 704×384, the live profile
in docs/benchmarks.md). Rank 0 computes the features and hands them on, so the plan gives it less DiT."""


class PipelineBroken(RuntimeError):
    """A rank of the GPU set failed or died; the set serves nothing more."""


@dataclass(frozen=True, eq=False)
class BlockResult:
    """What one pipelined block gives back: its frames and the slowest rank's busy time for it."""

    frames: np.ndarray
    """uint8 [frames_per_block, H, W, 3]."""
    busy_s: float
    """The largest rank's busy seconds for this block: the pipeline's block interval when it is full."""


@dataclass(eq=False)
class PipelinedSession:
    """The server-side handle of one session; its state lives on the ranks, keyed by `sid`."""

    sid: int
    spec: AvatarSpec
    size: Size
    blocks: int = 0
    pending: AvatarSpec | None = None
    closed: bool = False


class PipelinedGenerator(Generator):
    """The LiveAvatar backend over the N devices of one GPU set (see the module docstring)."""

    name = "liveavatar"

    def __init__(
        self,
        devices: list[str],
        options: dict[str, Any],
        engine: str = "eager",
        fp8: bool = False,
        balance: bool = True,
        decode_cost: float = DECODE_COST,
    ) -> None:
        """Start one rank per device and wait until all have built the model.

        `options`: `LiveAvatarGenerator.from_options` keywords (weights, steps, size, motion frames,
        ...) without `device`; `engine`/`fp8`: as `liveavatar.acceleration.accelerate.accelerate` applies them on each
        rank. Raises ValueError for an unusable set and PipelineBroken when a rank fails to start."""
        import torch.multiprocessing as mp

        from engines.distributed import free_port

        if len(devices) < 2:
            raise ValueError("a pipelined GPU set needs at least 2 devices")
        kinds = {d.split(":")[0] for d in devices}
        if len(kinds) != 1 or (kinds == {"cuda"} and len(set(devices)) != len(devices)):
            raise ValueError(f"a GPU set needs distinct devices of one kind, got {','.join(devices)}")
        self.devices = list(devices)
        self.pipeline_depth = len(devices)
        ctx = mp.get_context("spawn")
        self._results = ctx.Queue()
        self._commands = [ctx.Queue() for _ in devices]
        for q in self._commands:
            # A rank that died reads nothing more: a command still in the pipe to it would keep this
            # queue's feeder thread blocked, and the process's exit waits for that thread by default.
            q.cancel_join_thread()
        self._lock = threading.Lock()  # every rank must see the commands in one order
        self._futures: dict[tuple[int, Any], cf.Future[Any]] = {}
        self._ids = itertools.count(1)
        self._broken: str | None = None
        self._nbytes: dict[Size, int] = {}
        self._busy: dict[tuple[int, int], dict[int, float]] = {}  # (session, block) -> rank -> busy seconds
        self._replies: dict[tuple[int, Any], dict[int, tuple[str | None, Any]]] = {}  # -> rank -> (error, value)
        setup = {"options": options, "engine": engine, "fp8": fp8, "balance": balance, "decode_cost": decode_cost}
        port = free_port()
        self._procs = [
            ctx.Process(
                target=_rank_main, name=f"liveavatar-rank{r}",
                args=(r, len(devices), port, device, setup, self._commands[r], self._results),
            )
            for r, device in enumerate(devices)
        ]  # fmt: skip
        for proc in self._procs:
            proc.start()
        self._ready: cf.Future[Any] = cf.Future()
        self._reader = threading.Thread(target=self._read, name="pipeline-results", daemon=True)
        self._reader.start()
        try:
            info = self._ready.result(timeout=READY_TIMEOUT_S)
        except BaseException:
            self.shutdown()
            raise
        self.default_size: Size = info["default_size"]
        self.sample_steps: int = info["sample_steps"]
        self.engine: str = info["engine"]
        self.attention: str = info["attention"]
        self.notes: list[str] = info["notes"]
        self.plan: list[list[tuple[int, int, int]]] = info["spans"]
        log.info("GPU set %s: %d ranks ready, spans per rank %s", ",".join(devices), len(devices), self.plan)

    # --- Generator --------------------------------------------------------------------------------------

    def open(self, spec: AvatarSpec, size: Size) -> PipelinedSession:
        from liveavatar.models.config import check_dit_size

        check_dit_size(size.width, size.height)
        state = PipelinedSession(next(self._ids), spec, size)
        future = self._expect(state.sid, "opened")
        self._send("open", state.sid, _spec_payload(spec), size)
        future.result(timeout=REPLY_TIMEOUT_S)
        log.info("pipelined session %d opened at %s over %s", state.sid, size, ",".join(self.devices))
        return state

    def poster(self, state: PipelinedSession) -> np.ndarray:
        from liveavatar.backends.liveavatar.generator import frame_portrait

        return frame_portrait(state.spec.image, state.size.width, state.size.height)

    def submit(self, state: PipelinedSession, window: AudioWindow) -> cf.Future[BlockResult]:
        """Send the next block into the pipeline without waiting; the future gives its `BlockResult`.
        Blocks come back in the order they were submitted. Raises ValueError for a wrong window."""
        if state.closed:
            raise RuntimeError("submit() on a closed session")
        if len(window.samples) != self.audio_samples_per_block:
            raise ValueError(f"window has {len(window.samples)} samples, expected {self.audio_samples_per_block}")
        index = state.blocks
        state.blocks += 1
        future = self._expect(state.sid, index)
        with self._lock:
            if state.pending is not None:
                spec, state.pending = state.pending, None
                self._send_locked("switch", state.sid, _spec_payload(spec))
                state.spec = spec
            samples = np.ascontiguousarray(window.samples, np.float32)
            self._send_locked("block", state.sid, index, samples, np.ascontiguousarray(window.context, np.float32))
        return future

    def step(self, state: PipelinedSession, window: AudioWindow) -> np.ndarray:
        result = self.submit(state, window).result(timeout=REPLY_TIMEOUT_S)
        return result.frames

    def switch(self, state: PipelinedSession, spec: AvatarSpec) -> None:
        state.pending = spec

    def close(self, state: PipelinedSession) -> None:
        if state.closed:
            return
        state.closed = True
        if self._broken is None:
            self._send("close", state.sid)

    def session_nbytes(self, size: Size) -> int:
        """Memory one session at `size` holds on its busiest rank (DiT rings of that rank's steps, the
        VAE cache on the decoding rank), the largest the ranks reported so far; 0 before any block."""
        return self._nbytes.get(size, 0)

    def memory_allocated(self) -> int | None:
        """Bytes that tensors hold on the set's GPUs, summed over the ranks. Each rank answers after the
        commands sent before this one (a close included). None on CPU ranks.
        Blocks up to a block's time; raises PipelineBroken."""
        token = next(self._ids)
        future = self._expect(0, ("memory", token))
        self._send("memory", token)
        per_rank = future.result(timeout=REPLY_TIMEOUT_S)
        return None if None in per_rank else sum(per_rank)

    def block_seconds(self) -> float | None:
        """Median over recent blocks of the slowest rank's busy time: the full pipeline's interval."""
        recent = [max(v.values()) for v in list(self._busy.values())[-16:] if len(v) == len(self.devices)]
        return statistics.median(recent) if recent else None

    def rank_seconds(self) -> list[float] | None:
        """Per rank, the median busy time over recent blocks (the waits for the rank before left out):
        shows which rank sets the interval, and how well the plan balances them."""
        recent = [v for v in list(self._busy.values())[-16:] if len(v) == len(self.devices)]
        if not recent:
            return None
        return [statistics.median(v[r] for v in recent) for r in range(len(self.devices))]

    def shutdown(self) -> None:
        """Stop the ranks (blocking, a few seconds at most); pending calls fail."""
        self._fail("the GPU set was shut down")
        for q in self._commands:
            with contextlib.suppress(ValueError, OSError):  # a queue already closed
                q.put(("stop",))
        for proc in self._procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)

    # --- plumbing ---------------------------------------------------------------------------------------

    def _send(self, *command: Any) -> None:
        with self._lock:
            self._send_locked(*command)

    def _send_locked(self, *command: Any) -> None:
        if self._broken is not None:
            raise PipelineBroken(self._broken)
        for q in self._commands:
            q.put(command)

    def _expect(self, sid: int, key: Any) -> cf.Future[Any]:
        future: cf.Future[Any] = cf.Future()
        if self._broken is not None:
            future.set_exception(PipelineBroken(self._broken))
            return future
        self._futures[(sid, key)] = future
        return future

    @property
    def failure(self) -> str | None:  # type: ignore[override]
        return self._broken

    def _fail(self, why: str) -> None:
        if self._broken is None:
            self._broken = why
        for future in list(self._futures.values()) + [self._ready]:
            if not future.done():
                future.set_exception(PipelineBroken(self._broken))
        self._futures.clear()

    def _read(self) -> None:
        """Results thread: settles futures as ranks report; watches for ranks that died."""
        ready: dict[int, dict[str, Any]] = {}
        while self._broken is None or not self._ready.done():
            try:
                message = self._results.get(timeout=1.0)
            except queue_mod.Empty:
                dead = [r for r, p in enumerate(self._procs) if p.exitcode is not None]
                if dead and self._broken is None:
                    codes = [self._procs[r].exitcode for r in dead]
                    log.error("GPU set %s: rank(s) %s exited (codes %s)", ",".join(self.devices), dead, codes)
                    self._fail(f"rank(s) {dead} of GPU set {','.join(self.devices)} exited (codes {codes})")
                if self._broken is not None:
                    return
                continue
            except (EOFError, OSError):
                return
            kind = message[0]
            if kind == "ready":
                ready[message[1]] = message[2]
                if len(ready) == len(self.devices):
                    info = dict(ready[0], spans=[ready[r]["spans"] for r in range(len(self.devices))])
                    self._ready.set_result(info)
            elif kind == "failed":
                _, rank, why = message
                log.error("GPU set %s: rank %d failed:\n%s", ",".join(self.devices), rank, why)
                self._fail(f"rank {rank} on {self.devices[rank]} failed: {why.strip().splitlines()[-1]}")
            elif kind == "opened":
                _, rank, sid, error = message
                self._reply(sid, "opened", rank, error)
            elif kind == "busy":
                _, rank, sid, index, seconds, nbytes, size = message
                self._busy.setdefault((sid, index), {})[rank] = seconds
                self._nbytes[size] = max(self._nbytes.get(size, 0), nbytes)
                while len(self._busy) > 64:
                    self._busy.pop(next(iter(self._busy)))
            elif kind == "memory":
                _, rank, token, nbytes = message
                self._reply(0, ("memory", token), rank, None, nbytes)
            elif kind == "frames":
                _, sid, index, frames = message
                future = self._futures.pop((sid, index), None)
                busy = self._busy.get((sid, index)) or {0: 0.0}
                if future is not None and not future.done():
                    future.set_result(BlockResult(frames, max(busy.values())))

    def _reply(self, sid: int, key: Any, rank: int, error: str | None, value: Any = None) -> None:
        """Settle (sid, key) once every rank answered: the first error, else the ranks' values in rank order."""
        replies = self._replies.setdefault((sid, key), {})
        replies[rank] = (error, value)
        if len(replies) < len(self.devices):
            return
        del self._replies[(sid, key)]
        future = self._futures.pop((sid, key), None)
        if future is None or future.done():
            return
        errors = [e for e, _ in replies.values() if e]
        if errors:
            future.set_exception(ValueError(errors[0]))
        else:
            future.set_result([replies[r][1] for r in range(len(self.devices))])


def _spec_payload(spec: AvatarSpec) -> tuple[np.ndarray, str, int]:
    return spec.image, spec.prompt, spec.seed


# --- the rank processes ---------------------------------------------------------------------------------


@dataclass(eq=False)
class _RankSession:
    stages: Any  # liveavatar.acceleration.accelerate.StreamStages
    link: Any  # engines.tpp.FeedbackLink
    size: Size
    audio_stats: Any
    latent_shape: tuple[int, ...]
    hidden_shape: tuple[int, ...]


def _rank_main(
    rank: int, world: int, port: int, device: str, setup: dict[str, Any], commands: Any, results: Any
) -> None:
    """One rank: build the model on `device`, then handle commands until `stop`. Never raises: a
    failure is reported as ("failed", rank, traceback) and ends the process."""
    import torch
    import torch.distributed as dist

    from engines.distributed import init_rank

    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s")
    try:
        init_rank(rank, world, port, torch.device(device))
        control = dist.new_group(backend="gloo")  # conditioning broadcasts, apart from the NCCL hand-offs
        rank_state = _Rank(rank, world, device, setup, control, results)
        results.put(("ready", rank, rank_state.info()))
        rank_state.serve(commands)
    except BaseException:
        with contextlib.suppress(Exception):  # the parent may be gone already
            results.put(("failed", rank, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            with contextlib.suppress(Exception):
                dist.destroy_process_group()


class _Rank:
    """What one rank holds: the model on its device, its pipeline end and its sessions."""

    def __init__(self, rank: int, world: int, device: str, setup: dict[str, Any], control: Any, results: Any) -> None:
        import torch

        from engines.tpp import PipelinePlan, RankPipe
        from liveavatar.acceleration.accelerate import accelerate, choose_attention
        from liveavatar.backends.liveavatar.generator import LiveAvatarGenerator

        self.rank, self.world, self.control, self.results = rank, world, control, results
        self.device = torch.device(device)
        self.generator = LiveAvatarGenerator.from_options(device=device, **setup["options"])
        self.engine, self.notes = accelerate(self.generator, setup["engine"], setup["fp8"])
        dit = self.generator.pipeline.dit
        size = self.generator.default_size
        self.attention = choose_attention(dit, size.height // 8, size.width // 8)  # process-wide choice
        cfg = dit.config
        balance = setup["balance"]
        self.plan = PipelinePlan(
            self.generator.dit.sample_steps, world, decode_cost=setup["decode_cost"] if balance else 0.0,
            parts=cfg.num_layers if balance else 1, lead_cost=AUDIO_COST if balance else 0.0,
        )  # fmt: skip
        audio = self.generator.pipeline.audio
        self.feature_shape = (audio.model.config.num_hidden_layers + 1, audio.dim, self.generator.frames_per_block)
        cuda = self.device.type == "cuda"
        # the compute stream only: a device-wide sync would also wait for a pending NCCL send
        self.sync = (lambda: torch.cuda.current_stream(self.device).synchronize()) if cuda else (lambda: None)
        self.pipe = RankPipe(self.plan, rank, dit.dtype, self.device, self.sync)
        self.sessions: dict[int, _RankSession] = {}

    def info(self) -> dict[str, Any]:
        gen = self.generator
        spans = [(sp.step, sp.start, sp.end) for sp in self.plan.spans_of(self.rank)]
        return {"default_size": gen.default_size, "sample_steps": gen.dit.sample_steps, "engine": self.engine,
                "notes": self.notes, "spans": spans, "attention": self.attention}  # fmt: skip

    def serve(self, commands: Any) -> None:
        handlers = {
            "open": self.open, "switch": self.switch, "block": self.block, "close": self.close, "memory": self.memory,
        }  # fmt: skip
        while True:
            command = commands.get()
            if command[0] == "stop":
                return
            handlers[command[0]](*command[1:])

    def _conditioning(self, payload: tuple[np.ndarray, str, int], size: Size) -> tuple[Any, ...]:
        """Rank 0 encodes portrait and prompt; every rank gets the same CPU tensors (or rank 0's error)."""
        box: list[Any] = [None]
        if self.rank == 0:
            image, prompt, _seed = payload
            try:
                cond = self.generator.avatar_latents(image, size)
                text = self.generator.prompt_features(prompt)
                box[0] = (cond.ref_latent.cpu(), cond.motion_latents.cpu(), text.cpu())
            except Exception as exc:  # the others must still get an answer
                box[0] = f"{type(exc).__name__}: {exc}"
        import torch.distributed as dist

        dist.broadcast_object_list(box, src=0, group=self.control)
        if isinstance(box[0], str):
            raise ValueError(box[0])
        return tuple(t.to(self.device) for t in box[0])

    def open(self, sid: int, payload: tuple[np.ndarray, str, int], size: Size) -> None:
        from engines.tpp import FeedbackLink
        from liveavatar.acceleration.accelerate import BlockInputs, StreamStages, sink_feedback
        from liveavatar.models.audio_features import AudioStats

        error = None
        try:
            ref, motion, text = self._conditioning(payload, size)
            gen = self.generator
            denoises = bool(self.pipe.steps)
            inputs = BlockInputs(
                ref_latent=ref, motion_latents=motion, text_context=text, audio_feats=[], seed=payload[2]
            )
            stages = StreamStages(
                gen.dit if denoises else None, inputs, gen.decoder if self.pipe.decodes else None, self.sync
            )
            lh, lw = size.height // 8, size.width // 8
            dit = gen.pipeline.dit
            self.sessions[sid] = _RankSession(
                stages, FeedbackLink(sink_feedback(lh, lw, dit.dtype)), size, AudioStats(),
                (16, 3, lh, lw), (1, 3 * (lh // 2) * (lw // 2), dit.config.dim),
            )  # fmt: skip
        except ValueError as exc:
            error = str(exc)
        self.results.put(("opened", self.rank, sid, error))

    def switch(self, sid: int, payload: tuple[np.ndarray, str, int]) -> None:
        session = self.sessions.get(sid)
        size = session.size if session is not None else None
        if size is None:
            return
        ref, motion, text = self._conditioning(payload, size)
        if session.stages.state is not None:
            self.generator.dit.set_avatar(
                session.stages.state, ref_latent=ref, motion_latents=motion, text_context=text
            )

    def block(self, sid: int, index: int, samples: np.ndarray, context: np.ndarray) -> None:
        import torch

        from engines.tpp import RankReport
        from liveavatar.backends.liveavatar.generator import to_uint8_frames

        session = self.sessions[sid]
        gen, stages = self.generator, session.stages
        began = time.perf_counter()
        feats = None
        if self.rank == 0:  # computed once, handed on: every denoising rank needs the same features
            feats = gen.pipeline.audio.block_features(
                samples, context, index, session.audio_stats, gen.frames_per_block
            )
            if tuple(feats.shape) != self.feature_shape:
                raise RuntimeError(f"audio features {tuple(feats.shape)}, the ranks expect {self.feature_shape}")
        shared_at = time.perf_counter()
        feats = self.pipe.share(feats, self.feature_shape, torch.float32)
        waited = time.perf_counter() - shared_at if self.rank else 0.0  # for the rank before
        if feats is not None:
            stages.inputs.audio_feats = [feats]
        report = RankReport(rank=self.rank, steps=self.pipe.steps)
        out = self.pipe.block(stages, index, session.latent_shape, session.hidden_shape, session.link, report)
        frames = to_uint8_frames(out) if self.pipe.decodes else None
        self.sync()
        # not the waits for the rank before, nor for the next one to take the previous block
        held = report.hold_ms[-1] if report.hold_ms else 0.0
        busy = time.perf_counter() - began - waited - (report.wait_ms[-1] + held) / 1e3
        nbytes = (stages.state.nbytes() if stages.state is not None else 0) + (
            stages.vae_state.nbytes() if stages.vae_state is not None else 0
        )
        self.results.put(("busy", self.rank, sid, index, busy, nbytes, session.size))
        if frames is not None:
            self.results.put(("frames", sid, index, frames))

    def memory(self, token: int) -> None:
        self.results.put(("memory", self.rank, token, self.generator.memory_allocated()))

    def close(self, sid: int) -> None:
        session = self.sessions.pop(sid, None)
        if session is None:
            return
        if session.stages.state is not None:
            session.stages.state.branches.clear()
        if session.stages.vae_state is not None:
            session.stages.vae_state.feat_cache.clear()
        if self.device.type == "cuda":
            import torch

            torch.cuda.empty_cache()

"""Capacity model: how many GPU hosts a number of concurrent live sessions needs, from the measured
per-session GPU cost (groundwork for issue 16, sessions placed on GPU sets across many hosts).

The rule is the single-host admission's (`server/admission.py`, `server/load.py`): a GPU set takes
another session only while sessions × block time ≤ realtime_capacity × block duration (480 ms of
media per block), and while the sessions' state fits in GPU memory. So, per GPU set,

    sessions per set  = min(floor(realtime_capacity × 480 ms / block ms), what memory allows)
    sets per host     = GPUs per host // GPUs per session
    hosts             = ceil(sessions wanted / (sets per host × sessions per set))

Zero sessions per set means the size does not keep real time on that set: the server still admits one
session there (a slow GPU must serve one), but it degrades (fewer steps, dropped frames), so the model
counts none and says which set size or step count would keep real time.

    python3 bench/capacity.py --sessions 200 --gpus-per-host 8            # every measured row
    python3 bench/capacity.py --size 704*384 --steps 4 --gpus-per-session 2 --sessions 200 --json
    python3 bench/capacity.py --size 512*512 --steps 4 --block-ms 600 --session-gib 30 --sessions 50

Every figure is one H200 (140.4 GiB, `bench/results/2026-11-21_h200/gpus.txt`), random 14B weights,
compile + FP8 + compiled RoPE/VAE; block times are live ones where a live run measured them. Other GPUs
or sizes: measure with `bench/gpu_acceptance.py` and pass `--block-ms` (and `--session-gib`).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass

BLOCK_DURATION_MS = 480.0
"""Media per block: 12 frames at 25 fps (docs/architecture.md)."""
H200_GIB = 143771 / 1024
"""`nvidia-smi` memory.total of an H200, bench/results/2026-11-21_h200/gpus.txt."""
RESERVE_FRACTION = 0.08
"""Of a GPU's memory, kept free for activations: the admission's reserve (server/admission.py)."""
BASELINE_GIB = 16.9
"""In use before any session (14B FP8 weights, compiled graphs): 16.72-16.88 GiB at both measured sizes;
assumed for a `--session-gib` given at a size not measured."""


@dataclass(frozen=True)
class Figure:
    """One measured cost of a live session: block time per set, and (one-GPU sets) its memory."""

    size: str
    steps: int
    gpus_per_session: int
    block_ms: float
    session_gib: float | None
    """The admission's state estimate for one session (KV rings, condition and VAE caches)."""
    baseline_gib: float | None
    """GPU memory in use before any session: weights, compiled graphs, allocator pools."""
    source: str


FIGURES: tuple[Figure, ...] = (
    Figure(
        "704*384",
        4,
        1,
        870.0,
        49.95,
        16.72,
        "docs/benchmarks.md, GPU acceptance 704x384 (run4_704x384_acceptance.json, commit 58721f3): "
        "generator in the server 870 ms per 4-step block (bench 866); session estimate 49.95 GiB over a "
        "16.72 GiB baseline, 66.99 GiB in use with one session; bench peak 70.4-70.6 GiB "
        "(2026-11-21_h200_session2/run1_*)",
    ),
    Figure(
        "704*384",
        3,
        1,
        797.0,
        49.95,
        16.72,
        "docs/benchmarks.md, 704x384 block profile: live session at 3 steps 796.5 ms (run 4, 58721f3)",
    ),
    Figure(
        "704*384",
        2,
        1,
        520.0,
        49.95,
        16.72,
        "docs/benchmarks.md, 704x384: live session at 2 steps 520 ms per block (generator alone 511, "
        "real-time plan at start 509; run 4, 58721f3)",
    ),
    Figure(
        "704*384",
        4,
        2,
        448.0,
        None,
        None,
        "two H200s, --gpus-per-session 2, balanced timestep-forcing set: one block every 443-448 ms "
        "when full (26-27 fps capacity; measured 2026-11-29, commit ca0affc; not yet in "
        "docs/benchmarks.md or bench/results); per-rank memory of the live set not recorded",
    ),
    Figure(
        "384*256",
        4,
        1,
        330.0,
        18.27,
        16.88,
        "docs/benchmarks.md, GPU acceptance 384x256 with CUDA graphs live "
        "(run3_384x256_graphs_acceptance.json, commit cffe0c4): live 4-step block 330 ms (alone 321); "
        "session estimate 18.27 GiB over a 16.88 GiB baseline, 35.48 GiB in use with one session",
    ),
    Figure(
        "384*256",
        3,
        1,
        273.0,
        18.27,
        16.88,
        "docs/benchmarks.md, 384x256 block profile: live session at 3 steps 272.9 ms (run 3, cffe0c4)",
    ),
    Figure(
        "384*256",
        2,
        1,
        223.0,
        18.27,
        16.88,
        "docs/benchmarks.md, 384x256 block profile: live session at 2 steps 222.7 ms (run 3, cffe0c4)",
    ),
)


@dataclass(frozen=True)
class Plan:
    size: str
    steps: int
    gpus_per_session: int
    gpus_per_host: int
    sessions_wanted: int
    block_ms: float
    by_speed: int
    by_memory: int | None
    sessions_per_set: int
    sets_per_host: int
    sessions_per_host: int
    hosts: int | None
    """None: the size does not keep real time on this set, so no number of hosts serves it."""
    advice: str
    source: str


def parse_size(text: str) -> str:
    parts = text.lower().replace("x", "*").split("*")
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"size must be WIDTH*HEIGHT such as 704*384, got {text!r}")
    return f"{int(parts[0])}*{int(parts[1])}"


def find_figure(size: str, steps: int, gpus_per_session: int) -> Figure | None:
    return next((f for f in FIGURES if (f.size, f.steps, f.gpus_per_session) == (size, steps, gpus_per_session)), None)


def sessions_by_memory(figure: Figure, gpu_gib: float) -> int | None:
    """What one GPU's memory admits; None where the figure carries no memory (multi-GPU sets)."""
    if figure.session_gib is None or figure.baseline_gib is None or figure.gpus_per_session != 1:
        return None
    free = gpu_gib * (1 - RESERVE_FRACTION) - figure.baseline_gib
    return max(0, math.floor(free / figure.session_gib))


def advise(size: str, steps: int, gpus_per_session: int, block_ms: float, realtime_capacity: float) -> str:
    """For a set that cannot keep real time: measured settings at this size that would, else an estimate."""
    budget = realtime_capacity * BLOCK_DURATION_MS
    keeps = [f for f in FIGURES if f.size == size and f.block_ms <= budget]
    more_gpus = sorted(
        (f for f in keeps if f.steps == steps and f.gpus_per_session > gpus_per_session),
        key=lambda f: f.gpus_per_session,
    )
    fewer_steps = sorted(
        (f for f in keeps if f.gpus_per_session == gpus_per_session and f.steps < steps),
        key=lambda f: -f.steps,
    )
    tips = []
    if more_gpus:
        f = more_gpus[0]
        tips.append(f"--gpus-per-session {f.gpus_per_session} (measured {f.block_ms:.0f} ms per block)")
    else:
        # An even split over the set is the best case; the 2-GPU pipeline measured 870 -> 448 ms (97 %).
        need = math.ceil(gpus_per_session * block_ms / budget)
        tips.append(f"about --gpus-per-session {need} (estimate: the block split evenly over the set)")
    if fewer_steps:
        f = fewer_steps[0]
        tips.append(f"--sample-steps {f.steps} (measured {f.block_ms:.0f} ms per block, lower quality)")
    return (
        f"{size} at {steps} steps on {gpus_per_session} GPU(s) takes {block_ms:.0f} ms per "
        f"{BLOCK_DURATION_MS:.0f} ms block, so it does not keep real time; would keep it: " + "; ".join(tips)
    )


def plan(
    size: str,
    steps: int,
    gpus_per_session: int,
    gpus_per_host: int,
    sessions: int,
    block_ms: float | None = None,
    session_gib: float | None = None,
    realtime_capacity: float = 1.0,
    gpu_gib: float = H200_GIB,
) -> Plan:
    """Hosts needed for `sessions` at this size, steps and set; `block_ms`/`session_gib` override the figures."""
    size = parse_size(size)
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if gpus_per_session < 1 or gpus_per_host < 1:
        raise ValueError(
            f"GPUs per session and per host must be at least 1, got {gpus_per_session} and {gpus_per_host}"
        )
    if gpus_per_session > gpus_per_host:
        raise ValueError(
            f"a session's GPU set lives on one host: {gpus_per_session} GPUs per session do not fit "
            f"{gpus_per_host} GPUs per host"
        )
    if sessions < 1:
        raise ValueError(f"sessions must be at least 1, got {sessions}")
    if realtime_capacity <= 0:
        raise ValueError(f"realtime capacity must be above 0, got {realtime_capacity}")
    if block_ms is not None and block_ms <= 0:
        raise ValueError(f"--block-ms must be above 0, got {block_ms}")
    if session_gib is not None and session_gib <= 0:
        raise ValueError(f"--session-gib must be above 0, got {session_gib}")
    figure = find_figure(size, steps, gpus_per_session)
    if figure is None and block_ms is None:
        measured = ", ".join(f"{f.size}/{f.steps} steps/{f.gpus_per_session} GPU" for f in FIGURES)
        raise ValueError(
            f"no measured block time for {size} at {steps} steps on {gpus_per_session} GPU(s); "
            f"pass --block-ms (measure it with bench/gpu_acceptance.py). Measured: {measured}"
        )
    if figure is None or block_ms is not None or session_gib is not None:
        base = figure or Figure(size, steps, gpus_per_session, 0.0, None, None, "")
        figure = Figure(
            size,
            steps,
            gpus_per_session,
            block_ms if block_ms is not None else base.block_ms,
            session_gib if session_gib is not None else base.session_gib,
            base.baseline_gib if base.baseline_gib is not None else BASELINE_GIB,
            "given on the command line" + (f"; otherwise {base.source}" if base.source else ""),
        )
    by_speed = math.floor(realtime_capacity * BLOCK_DURATION_MS / figure.block_ms)
    by_memory = sessions_by_memory(figure, gpu_gib)
    per_set = by_speed if by_memory is None else min(by_speed, by_memory)
    sets = gpus_per_host // gpus_per_session
    per_host = sets * per_set
    hosts = math.ceil(sessions / per_host) if per_host else None
    advice = "" if by_speed else advise(size, steps, gpus_per_session, figure.block_ms, realtime_capacity)
    if by_speed and by_memory == 0:
        advice = f"one session's state ({figure.session_gib} GiB) does not fit one GPU's memory"
    return Plan(
        size,
        steps,
        gpus_per_session,
        gpus_per_host,
        sessions,
        figure.block_ms,
        by_speed,
        by_memory,
        per_set,
        sets,
        per_host,
        hosts,
        advice,
        figure.source,
    )


def table(plans: list[Plan]) -> str:
    head = (
        "size",
        "steps",
        "GPUs/session",
        "ms/block",
        "sessions/set (speed, memory)",
        "sets/host",
        "sessions/host",
        "hosts",
    )
    rows = [head, tuple("---" for _ in head)]
    for p in plans:
        memory = "-" if p.by_memory is None else str(p.by_memory)
        rows.append(
            (
                p.size,
                str(p.steps),
                str(p.gpus_per_session),
                f"{p.block_ms:.0f}",
                f"{p.sessions_per_set} ({p.by_speed}, {memory})",
                str(p.sets_per_host),
                str(p.sessions_per_host),
                "does not keep real time" if p.hosts is None else str(p.hosts),
            )
        )
    lines = ["| " + " | ".join(r) + " |" for r in rows]
    lines += [f"- {p.size}, {p.steps} steps, {p.gpus_per_session} GPU(s): {p.advice}" for p in plans if p.advice]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sessions", type=int, required=True, help="concurrent live sessions wanted")
    parser.add_argument("--gpus-per-host", type=int, default=8)
    parser.add_argument("--size", help="WIDTH*HEIGHT; omitted: every measured row")
    parser.add_argument("--steps", type=int, help="denoising steps (with --size; default 4)")
    parser.add_argument("--gpus-per-session", type=int, help="GPUs per session set (with --size; default 1)")
    parser.add_argument("--block-ms", type=float, help="measured ms per 480 ms block on the set (overrides)")
    parser.add_argument("--session-gib", type=float, help="one session's state on a 1-GPU set (overrides)")
    parser.add_argument("--realtime-capacity", type=float, default=1.0, help="as `serve --realtime-capacity`")
    parser.add_argument("--gpu-gib", type=float, default=H200_GIB, help="memory of one GPU (default H200)")
    parser.add_argument("--json", action="store_true", help="print the plans as JSON")
    args = parser.parse_args(argv)
    if args.size is None and any(
        v is not None for v in (args.steps, args.gpus_per_session, args.block_ms, args.session_gib)
    ):
        parser.error("--steps, --gpus-per-session, --block-ms and --session-gib need --size")
    keys = (
        [(args.size, args.steps or 4, args.gpus_per_session or 1)]
        if args.size
        else [(f.size, f.steps, f.gpus_per_session) for f in FIGURES]
    )
    try:
        plans = [
            plan(
                size,
                steps,
                gps,
                args.gpus_per_host,
                args.sessions,
                args.block_ms,
                args.session_gib,
                args.realtime_capacity,
                args.gpu_gib,
            )
            for size, steps, gps in keys
        ]
    except ValueError as error:
        parser.error(str(error))
    if args.json:
        print(json.dumps([asdict(p) for p in plans], indent=2))
    else:
        print(
            f"{args.sessions} concurrent sessions, {args.gpus_per_host} GPUs per host, "
            f"realtime capacity {args.realtime_capacity}"
        )
        print(table(plans))
    return 0


if __name__ == "__main__":
    sys.exit(main())

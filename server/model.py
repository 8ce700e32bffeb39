"""Where the GPU sets are, and the backend asked to fill them.

The server decides the sets (`resolve_devices`: `--gpus`, `--devices`, `--gpus-per-session`); the
configured backend (`liveavatar.backends`) builds, replicates, accelerates and warms itself up on them
(`Backend.build`) and says what runs (`ModelInfo`). From the block costs its warm-up measured, the
server plans whether one session keeps real time (`realtime_plan`, the governor's view: fewer steps
first); a stream from random weights is marked as such in `ModelInfo`, shown next to the backend.
"""

from __future__ import annotations

import logging
from typing import Any

from liveavatar.backends import BlockCosts, ModelInfo, backend
from liveavatar.backends.base import SET_JOIN, on_device, set_devices
from liveavatar.generator import Generator
from server.config import ConfigError, ServerConfig
from server.load import MIN_GOVERNED_STEPS, plan_pipelined, plan_realtime

__all__ = ["ModelInfo", "SET_JOIN", "build_generators", "on_device", "realtime_plan", "resolve_devices", "set_devices"]

log = logging.getLogger(__name__)


def resolve_devices(config: ServerConfig) -> list[str]:
    """The device of each GPU set, in order: `devices` as configured; `cuda:0` .. `cuda:N-1` for
    `gpus` N > 1; otherwise the one set of a single-GPU server (`cuda` if there is one, else `cpu`).
    With `gpus_per_session` K > 1 the devices are grouped K by K into pipelined sets, each named by
    its devices joined with `+` (`cuda:0+cuda:1`). A backend that does not run on GPUs (the preview)
    always has one set, on the CPU. Raises ConfigError for GPUs that are not there."""
    flat = _resolve_flat_devices(config)
    k = config.gpus_per_session
    if k <= 1:
        return flat
    return [SET_JOIN.join(flat[i : i + k]) for i in range(0, len(flat), k)]


def _resolve_flat_devices(config: ServerConfig) -> list[str]:
    if not backend(config.backend).runs_on_gpu:
        return ["cpu"]
    import torch

    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    seen = f"{visible} CUDA device{'' if visible == 1 else 's'} {'is' if visible == 1 else 'are'} visible"
    if config.devices:
        for device in config.devices:
            if device.startswith("cuda") and torch.device(device).index >= visible:
                raise ConfigError(f"devices names {device}, but {seen}")
        return list(config.devices)
    if config.gpus > 1:
        if config.gpus > visible:
            hint = "" if visible else " (no CUDA here; --devices cpu,cpu builds GPU sets on the CPU for tests)"
            raise ConfigError(f"--gpus {config.gpus} needs {config.gpus} CUDA devices, but {seen}{hint}")
        return [f"cuda:{i}" for i in range(config.gpus)]
    return ["cuda" if visible else "cpu"]


def build_generators(config: ServerConfig) -> tuple[list[Generator], ModelInfo]:
    """One generator per GPU set (`resolve_devices`), ready to serve, built by the configured backend;
    raises ConfigError for unusable settings."""
    devices = resolve_devices(config)
    try:
        generators, info = backend(config.backend).build(config.model_settings(), devices)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if info.costs is not None:
        first = generators[0]
        info.realtime = realtime_plan(info.costs, first.frames_per_block / first.fps)
    return generators, info


def realtime_plan(costs: BlockCosts, block_s: float) -> dict[str, Any]:
    """Whether one session keeps real time, from the block costs the backend's warm-up measured;
    logged as a warning with the settings that would when it does not, and shown in `config`, `stats`
    and /metrics. On one GPU the governor may lower the steps; a pipelined set's steps are fixed."""
    size = costs.size
    if costs.interval_s is not None:
        plan = plan_pipelined(costs.interval_s, costs.steps, block_s, size.width, size.height, costs.gpus)
        if plan.keeps:
            log.info("real time: one session keeps it over %d GPUs (%.0f ms per block)", costs.gpus, plan.block_s * 1e3)
    else:
        fewest = min(MIN_GOVERNED_STEPS, costs.steps)
        plan = plan_realtime(costs.fixed_s, costs.per_step_s, costs.steps, fewest, block_s, size.width, size.height)
        if plan.keeps:
            log.info("real time: one session keeps it at %d steps (%.0f ms per block)", plan.steps, plan.block_s * 1e3)
    if not plan.keeps:
        log.warning("NOT REAL TIME: %s", plan.advice)
    return dict(plan.to_message())

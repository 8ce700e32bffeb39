"""`liveavatar serve`: start the streaming server and print the URL to open.

Every flag defaults to None so that only flags actually given override the TOML file and the
environment (see server/config.py and docs/configuration.md). Heavy modules (aiortc, the backends)
are imported inside `run()`, keeping `liveavatar --help` instant.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from liveavatar.settings import add_model_arguments
from server.config import ConfigError, ServerConfig, load_config

log = logging.getLogger("liveavatar.serve")

SHUTDOWN_TIMEOUT_S = 4.0
"""SIGTERM/SIGINT to exit: every session gets `closed` well within it (Session.close is bounded), and
the process exits after it even if something still hangs."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = ServerConfig()
    a = parser.add_argument
    a("--config", metavar="FILE", help="TOML file with settings (keys as in docs/configuration.md)")
    a("--host", help=f"address to listen on (default {d.host})")
    a("--port", type=int, help=f"port for the page, /ws, /healthz and /metrics (default {d.port})")
    add_model_arguments(parser, "serve")
    m = parser.add_argument_group("liveavatar backend")
    b = m.add_argument
    b(
        "--gpus",
        type=int,
        help="GPU sets: one model replica per GPU (cuda:0..N-1), each serving its own sessions; N GPUs give N "
        "times the sessions, not a faster session (default 1)",
    )
    b(
        "--devices",
        metavar="LIST",
        help="the device of each GPU set, comma-separated, instead of --gpus: cuda:0,cuda:1 "
        "(cpu,cpu: tests, debugging)",
    )
    b("--memory-budget-gib", type=float, help="memory sessions may take on each GPU set (default: its free GPU memory)")
    b(
        "--realtime-capacity",
        type=float,
        help=f"admit while sessions x block time <= this x block duration; 0: off (default {d.realtime_capacity})",
    )
    b("--max-lag-blocks", type=float, help=f"lag bound beyond the minimum, in blocks (default {d.max_lag_blocks})")
    a(
        "--ice-server",
        dest="ice_servers",
        action="append",
        metavar="URL",
        help="STUN/TURN server, repeatable: stun:host:port or turn:user:pass@host:port",
    )
    a("--ice-transport-policy", choices=("all", "relay"), help="'relay' forces TURN (default all)")
    a("--turn-url", help="TURN server(s) for short-lived REST credentials, e.g. turn:example.com:3478")
    a("--turn-secret", help="shared secret of the TURN server (coturn use-auth-secret)")
    a("--turn-ttl", type=int, help=f"lifetime of TURN credentials in seconds (default {d.turn_ttl})")
    a(
        "--auth-token",
        dest="auth_tokens",
        action="append",
        metavar="TOKEN",
        help="require this bearer token on /ws and /metrics (repeatable; open the page as /?token=TOKEN)",
    )
    a(
        "--allowed-origin",
        dest="allowed_origins",
        action="append",
        metavar="ORIGIN",
        help="web origin whose pages may open /ws, e.g. https://app.example.com (repeatable; * for any; "
        "default: the server's own origin only)",
    )
    a("--max-sessions", type=int, help=f"sessions at once; more are refused (default {d.max_sessions})")
    a("--vad-mode", type=int, choices=(0, 1, 2, 3), help=f"webrtcvad aggressiveness (default {d.vad_mode})")
    a("--video-codec", choices=("auto", "vp8", "h264"), help="auto follows the browser (default auto)")
    a("--max-message-bytes", type=int, help=f"largest WebSocket message (default {d.max_message_bytes})")
    a("--max-upload-bytes", type=int, help=f"largest portrait upload (default {d.max_upload_bytes})")
    a("--workers", type=int, help="generator threads per GPU set (default: 2 for preview, 1 for GPU backends)")
    a("--log-level", choices=("debug", "info", "warning", "error"), help=f"(default {d.log_level})")
    c = parser.add_argument_group("cluster (docs/cluster.md; needs the cluster extra: pip install liveavatar[cluster])")
    k = c.add_argument
    k(
        "--cluster",
        metavar="ADDRESS",
        help="Ray cluster address (auto or HOST:6379): run as the front door of avatar replicas placed on the "
        "cluster's GPU hosts by Ray Serve; sessions run on the replicas (each with --gpus-per-session GPUs)",
    )
    k("--cluster-app", metavar="NAME", help=f"Ray Serve application of the replicas (default {d.cluster_app})")
    k("--replicas-min", type=int, help=f"fewest replicas (default {d.replicas_min})")
    k("--replicas-max", type=int, help=f"most replicas: autoscaled on sessions in between (default {d.replicas_max})")
    k(
        "--sessions-per-replica",
        type=int,
        help=f"session slots per replica: the preview's capacity, a GPU replica's upper bound (default "
        f"{d.sessions_per_replica})",
    )
    k(
        "--drain-timeout-s",
        type=float,
        help=f"a replica being removed lets its sessions finish for up to this long (default {d.drain_timeout_s:g})",
    )
    k("--replica-ports", metavar="FIRST-LAST", help="TCP ports for the replicas' control sockets (default: any)")
    k("--replica-cpus", type=float, help=f"CPU cores each replica asks Ray for (default {d.replica_cpus:g})")
    k(
        "--replica-resource",
        dest="replica_resources",
        action="append",
        metavar="NAME=AMOUNT",
        help="custom Ray resource each replica asks for (repeatable), e.g. avatar_host=1",
    )
    a("--print-config", action="store_true", help="print the effective settings (secrets masked) and exit")


_NOT_SETTINGS = ("config", "print_config", "command", "_module")


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    overrides = {k: v for k, v in vars(args).items() if k not in _NOT_SETTINGS}
    overrides["checkpoints"] = overrides.pop("ckpt_dir", None)  # the setting's name in TOML and env
    return load_config(args.config, overrides=overrides)


def run(args: argparse.Namespace) -> int:
    try:
        config = config_from_args(args)
    except ConfigError as exc:
        print(f"liveavatar serve: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        print(json.dumps(config.masked(), indent=2))
        return 0
    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if config.log_level != "debug":  # one line per HTTP request and ICE check is noise at info
        for noisy in ("websockets", "aioice", "aiortc"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    runner: Callable[[Coroutine[Any, Any, None]], None]
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    try:
        with contextlib.suppress(KeyboardInterrupt):
            runner(_serve(config))
    except ConfigError as exc:  # found while building the model (missing GPUs, checkpoint files)
        print(f"liveavatar serve: {exc}", file=sys.stderr)
        return 2
    return 0


async def _serve(config: ServerConfig) -> None:
    from server.app import App, SignallingServer

    app: SignallingServer
    if config.cluster:
        try:
            from server.cluster.frontdoor import FrontDoor
        except ImportError as exc:
            raise ConfigError(f"--cluster needs Ray Serve: pip install 'liveavatar[cluster]' ({exc})") from None
        app = FrontDoor(config)
    else:
        app = App(config)
    await app.start()
    # Everything built so far (torch, the model, aiortc) lives as long as the process. Taken out of the
    # collector, it no longer makes each full collection walk it on the event loop's thread: with the
    # liveavatar backend that is ~470 k objects and ~250 ms per full collection (measured on CPU),
    # long enough to skip frames in every session. (Frozen objects that later become cyclic garbage are
    # never freed; start-up objects live for the whole process, so that costs nothing in practice.)
    gc.collect()
    gc.freeze()
    log.info("start-up heap frozen: %d objects left out of garbage collection", gc.get_freeze_count())
    print(f"liveavatar: open {app.url} ({app.describe()})", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        # not on every platform, nor outside the main thread
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        log.info("shutting down")
        try:
            async with asyncio.timeout(SHUTDOWN_TIMEOUT_S):
                await app.stop()
        except TimeoutError:
            log.error("shutdown took over %.0f s; exiting anyway", SHUTDOWN_TIMEOUT_S)

"""The server's settings in one dataclass, and where each value may come from.

Precedence, lowest first: dataclass defaults < TOML file (`--config`) < environment variables
`LIVEAVATAR_<FIELD>` < command-line flags. Lists (ICE servers) are comma-separated in the environment.
The ICE servers handed to browsers and to the server's own peer connections come from `ice_servers()`,
the one place that turns static entries and the TURN shared secret into credentials.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from liveavatar.backends import backend as backend_named
from liveavatar.settings import DEFAULT_MOTION_FRAMES, DEFAULT_SAMPLE_STEPS, ModelSettings, SettingsError
from liveavatar.settings import validate as validate_model
from server import turn

ENV_PREFIX = "LIVEAVATAR_"
SECRET_FIELDS = ("turn_secret", "auth_tokens")
_DEVICE_RE = re.compile(r"^(?P<kind>cpu|cuda)(?::(?P<index>\d+))?$")
_ORIGIN_RE = re.compile(r"^https?://[^/?#\s]+$")
_NAME_RE = re.compile(r"^[A-Za-z0-9_-]+$")
_RESOURCE_RE = re.compile(r"^(?P<name>[A-Za-z_][\w.-]*)=(?P<amount>\d+(?:\.\d+)?)$")
_PORTS_RE = re.compile(r"^(?P<first>\d+)-(?P<last>\d+)$")
_ICE_RE = re.compile(r"^(?P<scheme>stuns?|turns?):(?:(?P<user>[^:@]+):(?P<password>[^@]*)@)?(?P<rest>.+)$")


class ConfigError(ValueError):
    """A setting that cannot be used; the message names the setting and where it came from."""


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    backend: str = ""
    """A registered backend (`preview`, `liveavatar`, liveavatar.backends); empty: `liveavatar` when
    `checkpoints` or `random_weights` is set, else
    `preview` (the rule every command follows, liveavatar.settings)."""
    size: str = ""
    """Output size `width*height`; empty means the backend's own default. `validate` fills it in."""
    checkpoints: str = ""
    """`liveavatar` backend: the Wan2.2-S2V-14B folder, or a folder holding `Wan2.2-S2V-14B/` and
    `LiveAvatar/liveavatar.safetensors` (the Docker image mounts that at /models). Flag: `--ckpt-dir`."""
    lora: str = ""
    """LoRA to merge; empty: `LiveAvatar/liveavatar.safetensors` next to the checkpoint, if present."""
    random_weights: str = ""
    """`tiny` or `14b`: build the architecture with random weights instead of loading a checkpoint."""
    sample_steps: int = DEFAULT_SAMPLE_STEPS
    motion_frames: int = DEFAULT_MOTION_FRAMES
    """Frames of the static motion video per avatar (1 + 4k); CPU tests use 5 to save VAE time."""
    gpus: int = 1
    """GPU sets: N > 1 builds one replica of the model per GPU (cuda:0..N-1), each serving its own sessions."""
    gpus_per_session: int = 1
    """GPUs one session's blocks flow through (1..8): N > 1 groups the GPUs (`gpus`, or `devices`) into
    sets of N, one process per GPU, and runs the timestep-forcing pipeline of engines/tpp.py over each
    set (liveavatar/backends/liveavatar/pipelined.py), so one session runs up to N times as fast. `gpus` stays
    the number of GPUs used and must be a multiple of N. A model setting (liveavatar.settings)."""
    devices: list[str] = field(default_factory=list)
    """The device of each GPU set, named explicitly (`cuda:0,cuda:1`; `cpu,cpu` for tests and debugging);
    empty: from `gpus`. Flag `--devices`, env `LIVEAVATAR_DEVICES` (comma-separated)."""
    engine: str = "eager"
    """`eager` or `compile` (torch.compile of the DiT blocks); `tensorrt` is refused with the reason."""
    fp8: bool = False
    cuda_graphs: bool = False
    """Replay each session's steady-state DiT forwards from CUDA graphs captured on the set's worker
    thread (one per session and denoising step): removes kernel-launch overhead, which dominates at
    small sizes. Needs one worker thread per set (capture is per thread) and a CUDA device."""
    batch_sessions: bool = False
    """Make two sessions' ready blocks in one DiT forward at small sizes, where the warm-up measures it
    faster (`LiveAvatarGenerator.step_batch`). Off by default: on an H200 the forward alone was 10 %
    faster at 384×256, but two live sessions made 19.8 fps each with it and 23.7 without."""
    memory_budget_gib: float = 0.0
    """Memory the sessions' state may take on each GPU set; 0: what the set's GPU has free (no limit on CPU)."""
    realtime_capacity: float = 1.0
    """Admit a session only if sessions x measured block time <= this x block duration; 0: no check."""
    cpu_capacity: float = 0.9
    """`preview`: admit while (sessions + 1) x the cost of one <= this x the cores (`os.cpu_count()`);
    0 turns the check off."""
    cpu_session_cost: float = 0.0
    """`preview`: cores one session takes; 0: measured while sessions run (0.5 until then)."""
    max_lag_blocks: float = 2.0
    """How far (in 0.48 s blocks) live output may fall behind the minimum lag before blocks are trimmed."""
    ice_servers: list[str] = field(default_factory=list)
    """`stun:host:port` or `turn:user:pass@host:port[?transport=tcp]` entries."""
    ice_transport_policy: str = "all"
    """`all`, or `relay` to force browsers (and the server) through TURN."""
    turn_url: str = ""
    """TURN server(s) for REST credentials, comma-separated, e.g. `turn:turn.example.com:3478`."""
    turn_secret: str = ""
    turn_ttl: int = 3600
    auth_tokens: list[str] = field(default_factory=list)
    """Bearer tokens allowed on `/ws` and `/metrics` (`?token=` or `Authorization: Bearer`); empty: open."""
    allowed_origins: list[str] = field(default_factory=list)
    """Web origins (`https://app.example.com`) whose pages may open `/ws` besides the server's own (the
    `Origin` header names the `Host` asked for); `*`: any. Clients that send no `Origin` (apps, not
    browsers) are not affected."""
    max_header_bytes: int = 16 * 1024
    """Largest HTTP request head (request line and headers); larger gets 431."""
    max_messages_per_second: float = 200.0
    """WebSocket messages per connection and second, with bursts of 5 s worth; beyond it the client gets
    `rate_limited` and the connection is closed."""
    idle_timeout_s: float = 60.0
    """A connection with no live session of its own that sends nothing for this long is closed."""
    max_connections_per_client: int = 8
    """Open WebSockets one remote address may hold; more get 429. 0: no limit (behind a proxy that
    does not pass the client's address, every client shares one)."""
    max_pending_per_client: int = 2
    """Sessions one remote address may have waiting for their peer connection; one more offer gets
    `too_many_pending`. 0: no limit."""
    connect_timeout_s: float = 10.0
    """A session whose peer connection is not up this long after its answer is closed."""
    max_sessions: int = 4
    vad_mode: int = 2
    mic_gap_s: float = 0.5
    """A mic that sends no audio for this long counts as silent, so an utterance cut off ends (`speech_end`)."""
    video_codec: str = "auto"
    """`auto` follows the browser's preference (VP8 or H.264); `vp8` or `h264` forces one."""
    max_message_bytes: int = 8 * 1024 * 1024
    max_upload_bytes: int = 4 * 1024 * 1024
    max_image_pixels: int = 4096 * 4096
    max_push_seconds: float = 120.0
    """Pushed audio waiting to be played, per session; more is refused with `push_buffer_full`."""
    workers: int = 0
    """Generator threads per GPU set; 0 picks 2 for the CPU preview backend and 1 for a GPU backend."""
    client_dir: str = ""
    """Folder of the browser page; empty means the `client/` folder next to the server package."""
    log_level: str = "info"
    # ---- cluster (docs/cluster.md): this server as the front door of replicas on a Ray cluster ----
    cluster: str = ""
    """Ray address (`auto`, `HOST:6379`, `ray://HOST:10001`): this server becomes the front door of a Ray
    Serve application of avatar replicas, which run the sessions (server/cluster/); empty: one host."""
    cluster_app: str = "liveavatar"
    """Name of the Serve application; a front door attaches to a running one of that name instead of
    deploying it again."""
    replicas_min: int = 1
    replicas_max: int = 1
    """Serve autoscales the replicas between these on the number of sessions (server/cluster/autoscale.py)."""
    sessions_per_replica: int = 1
    """Session slots of one replica: the preview's whole capacity (a CPU slot); for a GPU backend an upper
    bound, below which the replica's own admission (memory, real time) decides."""
    drain_timeout_s: float = 120.0
    """A replica being removed (scale-down, update) takes no new session and lets its running ones finish
    for up to this long (Serve's `graceful_shutdown_timeout_s`); what still runs then ends with `replica_lost`."""
    upscale_delay_s: float = 5.0
    downscale_delay_s: float = 120.0
    """How long the autoscaler's wish for more (fewer) replicas must last before it acts."""
    replica_cpus: float = 1.0
    """CPU cores each replica asks Ray for (its CPU slot; the preview's sessions run on them)."""
    replica_resources: list[str] = field(default_factory=list)
    """Custom Ray resources each replica asks for, `NAME=AMOUNT` (e.g. `avatar_host=1`, given to the
    hosts by `ray start --resources`): where replicas may run."""
    replica_ports: str = ""
    """TCP ports a replica may take for its control socket (the front door relays signalling to it), as
    `FIRST-LAST`; empty: any free port. Open them between the front door's host and the replicas' hosts."""

    @property
    def cluster_sessions(self) -> int:
        """The most sessions a cluster front door carries: every replica full."""
        return self.replicas_max * self.sessions_per_replica

    def validate(self) -> ServerConfig:
        if not 0 <= self.port < 65536:  # 0: any free port (tests)
            raise ConfigError(f"port {self.port} is out of range")
        if self.max_sessions < 1:
            raise ConfigError("max_sessions must be at least 1")
        if self.vad_mode not in (0, 1, 2, 3):
            raise ConfigError("vad_mode must be 0, 1, 2 or 3")
        if not 0.05 <= self.mic_gap_s <= 10:
            raise ConfigError(f"mic_gap_s must be between 0.05 and 10 seconds, got {self.mic_gap_s}")
        if self.ice_transport_policy not in ("all", "relay"):
            raise ConfigError("ice_transport_policy must be 'all' or 'relay'")
        if self.video_codec not in ("auto", "vp8", "h264"):
            raise ConfigError("video_codec must be auto, vp8 or h264")
        if self.max_upload_bytes < 1024 or self.max_message_bytes < 4096:
            raise ConfigError("max_upload_bytes must be >= 1024 and max_message_bytes >= 4096")
        # A portrait travels base64-encoded inside one JSON message.
        if self.max_message_bytes < self.max_upload_bytes * 4 // 3 + 4096:
            raise ConfigError("max_message_bytes must hold a base64 portrait of max_upload_bytes (x4/3 + 4 KiB)")
        if self.turn_ttl <= 0:
            raise ConfigError("turn_ttl must be positive")
        for origin in self.allowed_origins:
            if origin != "*" and not _ORIGIN_RE.match(origin):
                raise ConfigError(f"allowed_origins: {origin!r} is not an origin like https://app.example.com (or *)")
        if self.max_header_bytes < 1024:
            raise ConfigError("max_header_bytes must be at least 1024")
        if self.max_connections_per_client < 0 or self.max_pending_per_client < 0:
            raise ConfigError(
                "max_connections_per_client and max_pending_per_client must not be negative (0: no limit)"
            )
        if not 1 <= self.connect_timeout_s <= 300:
            raise ConfigError(f"connect_timeout_s must be between 1 and 300 seconds, got {self.connect_timeout_s}")
        if self.max_messages_per_second <= 0 or self.idle_timeout_s <= 0:
            raise ConfigError("max_messages_per_second and idle_timeout_s must be positive")
        if any(len(t) < 16 for t in self.auth_tokens):
            raise ConfigError("auth tokens must be at least 16 characters (use a random string)")
        if bool(self.turn_secret) != bool(self.turn_url):
            raise ConfigError("turn_url and turn_secret go together (REST credentials need both)")
        self._validate_model()
        if self.cluster:
            self._validate_cluster()
        try:
            ice_servers(self)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        return self

    def model_settings(self) -> ModelSettings:
        """The settings `serve` shares with `generate`, `batch` and `bench` (liveavatar.settings)."""
        return ModelSettings(
            backend=self.backend,
            ckpt_dir=self.checkpoints,
            lora=self.lora,
            random_weights=self.random_weights,
            size=self.size,
            sample_steps=self.sample_steps,
            motion_frames=self.motion_frames,
            engine=self.engine,
            fp8=self.fp8,
            gpus_per_session=self.gpus_per_session,
            cuda_graphs=self.cuda_graphs,
            batch_sessions=self.batch_sessions,
        )

    def _validate_model(self) -> None:
        """The shared checks and rules (backend, size, steps, GPUs per session, ...), then the server's own
        (GPU sets, devices, worker threads)."""
        try:
            model = validate_model(self.model_settings())
        except SettingsError as exc:
            raise ConfigError(str(exc)) from None
        self.backend, self.random_weights, self.size = model.backend, model.random_weights, model.size
        if self.cpu_capacity < 0 or self.cpu_session_cost < 0:
            raise ConfigError("cpu_capacity and cpu_session_cost must not be negative")
        if self.memory_budget_gib < 0 or self.realtime_capacity < 0 or self.max_lag_blocks < 0:
            raise ConfigError("memory_budget_gib, realtime_capacity and max_lag_blocks must not be negative")
        if not self.cluster:  # a front door has no GPUs: its replicas' sets are checked in _validate_cluster
            self._validate_sets()

    def _validate_sets(self) -> None:
        """The GPU sets of this process: their count, devices and worker threads."""
        if self.gpus < 1:
            raise ConfigError("gpus must be at least 1")
        self._validate_devices()
        if self.gpus_per_session > 1:
            count = len(self.devices) or self.gpus
            if count % self.gpus_per_session:
                raise ConfigError(
                    f"{count} GPUs do not split into sets of gpus_per_session {self.gpus_per_session}; "
                    f"use --gpus {self.gpus_per_session * max(1, count // self.gpus_per_session)}"
                )
        if self.cuda_graphs and (self.gpus > 1 or len(self.devices) > 1):
            raise ConfigError(
                "cuda_graphs runs on one GPU set for now: several sets capturing side by side are not yet "
                "verified on a GPU host; drop --cuda-graphs or use one set"
            )
        if self.cuda_graphs and self.workers > 1:
            raise ConfigError(
                "cuda_graphs needs one worker thread per GPU set: graphs are captured and replayed by one thread"
            )

    def _validate_cluster(self) -> None:
        """A front door's own settings, then the settings each of its replicas will run with."""
        if self.devices or self.gpus != 1:
            raise ConfigError(
                "gpus and devices are not for a cluster: each replica gets gpus_per_session GPUs from Ray "
                "(drop --gpus/--devices; scale with --replicas-max)"
            )
        if self.replicas_min < 1 or self.replicas_max < self.replicas_min:
            raise ConfigError(
                f"replicas_min must be at least 1 and replicas_max at least replicas_min, got "
                f"{self.replicas_min} and {self.replicas_max}"
            )
        if self.sessions_per_replica < 1:
            raise ConfigError("sessions_per_replica must be at least 1")
        if self.drain_timeout_s <= 0 or self.upscale_delay_s < 0 or self.downscale_delay_s < 0:
            raise ConfigError("drain_timeout_s must be positive, upscale_delay_s and downscale_delay_s not negative")
        if self.replica_cpus < 0:
            raise ConfigError("replica_cpus must not be negative")
        if not self.cluster_app or not _NAME_RE.match(self.cluster_app):
            raise ConfigError(f"cluster_app {self.cluster_app!r} must be letters, digits, '-' or '_'")
        replica_resources(self)
        replica_port_range(self)
        try:
            self.replica_config("x" * 16)
        except ConfigError as exc:
            raise ConfigError(f"the replicas' settings: {exc}") from None

    def replica_config(self, relay_key: str) -> ServerConfig:
        """The settings a replica of this front door runs its `App` with: one GPU set of `gpus_per_session`
        GPUs (what Ray hands the replica) or the preview's CPU slot of `sessions_per_replica` sessions, on
        any interface, reached only by front doors that show `relay_key`. Per-client limits and origins
        are the front door's job (every relayed connection comes from it)."""
        gpus = self.gpus_per_session if backend_named(self.backend).runs_on_gpu else 1
        return dataclasses.replace(
            self,
            cluster="",
            host="0.0.0.0",
            port=0,
            gpus=gpus,
            devices=[],
            max_sessions=self.sessions_per_replica,
            cpu_capacity=0.0,  # the slots decide for the preview (server/cluster/replica.py)
            auth_tokens=[relay_key],
            allowed_origins=[],
            max_connections_per_client=0,
            max_pending_per_client=0,
            client_dir="",
        ).validate()

    def _validate_devices(self) -> None:
        if not self.devices:
            return
        if not backend_named(self.backend).runs_on_gpu:
            raise ConfigError(
                f"devices are for the liveavatar backend; the {self.backend} backend runs one set on the CPU"
            )
        names = []
        for entry in self.devices:
            m = _DEVICE_RE.match(entry.strip().lower())
            if not m:
                raise ConfigError(f"devices: {entry!r} is not a device; use cpu or cuda:N, e.g. cuda:0,cuda:1")
            names.append("cpu" if m["kind"] == "cpu" else f"cuda:{int(m['index'] or 0)}")
        gpus = [n for n in names if n != "cpu"]
        if len(set(gpus)) != len(gpus):
            raise ConfigError(f"devices: {','.join(names)} names a GPU twice; each GPU set needs a GPU of its own")
        if self.gpus_per_session > 1 and "cpu" in names and set(names) != {"cpu"}:
            raise ConfigError(f"devices: {','.join(names)} mixes cpu and cuda; a GPU set needs devices of one kind")
        if self.gpus not in (1, len(names)):
            raise ConfigError(f"gpus {self.gpus} and devices {','.join(names)} disagree; give one of them")
        self.devices = names

    def masked(self) -> dict[str, Any]:
        """The effective settings with every secret replaced, fit to print or log."""
        data = dataclasses.asdict(self)
        for name in SECRET_FIELDS:
            if data[name]:
                data[name] = ["***"] * len(data[name]) if isinstance(data[name], list) else "***"
        data["ice_servers"] = [_mask_ice(e) for e in self.ice_servers]
        return data


def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(ServerConfig)


def _coerce(name: str, value: Any, source: str) -> Any:
    """Turn a TOML/env/CLI value into the field's type, with an error that says where it came from."""
    kind = _field_types()[name]
    try:
        if kind is bool:
            if isinstance(value, str):
                return value.strip().lower() in ("1", "true", "yes", "on")
            return bool(value)
        if kind in (int, float):
            if isinstance(value, bool) or not isinstance(value, str | int | float):
                raise ValueError("not a number")
            return kind(value)
        if kind is str:
            if not isinstance(value, str | int | float):
                raise ValueError("not a string")
            return str(value)
        if typing.get_origin(kind) is list or isinstance(kind, types.GenericAlias):
            if isinstance(value, str):
                return [v.strip() for v in value.split(",") if v.strip()]
            if isinstance(value, list | tuple):
                return [str(v) for v in value]
            raise ValueError("not a list")
    except ValueError as exc:
        raise ConfigError(f"{name} from {source}: {exc} ({value!r})") from None
    raise ConfigError(f"{name}: unsupported type {kind}")


def load_config(
    toml_path: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> ServerConfig:
    """Merge the four layers; `overrides` are the CLI flags the user actually gave (None = not given)."""
    names = [f.name for f in dataclasses.fields(ServerConfig)]
    values: dict[str, Any] = {}
    if toml_path:
        path = Path(toml_path)
        try:
            data = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read config file {path}: {exc}") from None
        data = data.get("server", data)
        for key, value in data.items():
            name = key.replace("-", "_")
            if name not in names:
                raise ConfigError(f"unknown setting {key!r} in {path}")
            values[name] = _coerce(name, value, str(path))
    env = os.environ if env is None else env
    for name in names:
        raw = env.get(ENV_PREFIX + name.upper())
        if raw is not None:
            values[name] = _coerce(name, raw, ENV_PREFIX + name.upper())
    for name, value in (overrides or {}).items():
        if value is not None:
            values[name] = _coerce(name, value, "--" + name.replace("_", "-"))
    return ServerConfig(**values).validate()


def parse_ice_server(entry: str) -> dict[str, Any]:
    """`turn:user:pass@host:port` -> the browser's RTCIceServer dict {urls, username, credential}."""
    m = _ICE_RE.match(entry.strip())
    if not m:
        raise ConfigError(f"ICE server {entry!r} must look like stun:host:port or turn:user:pass@host:port")
    server: dict[str, Any] = {"urls": f"{m['scheme']}:{m['rest']}"}
    if m["user"] is not None:
        server["username"] = m["user"]
        server["credential"] = m["password"]
    elif m["scheme"].startswith("turn"):
        raise ConfigError(f"TURN server {entry!r} needs user:pass@ (or use turn_url with turn_secret)")
    return server


def _mask_ice(entry: str) -> str:
    m = _ICE_RE.match(entry.strip())
    if not m or m["user"] is None:
        return entry
    return f"{m['scheme']}:{m['user']}:***@{m['rest']}"


def replica_resources(config: ServerConfig) -> dict[str, float]:
    """`replica_resources` as Ray wants them: {name: amount}."""
    out: dict[str, float] = {}
    for entry in config.replica_resources:
        m = _RESOURCE_RE.match(entry.strip())
        if not m or m["name"] in ("CPU", "GPU", "memory"):
            raise ConfigError(
                f"replica_resources: {entry!r} is not NAME=AMOUNT of a custom resource (e.g. avatar_host=1; "
                "CPUs and GPUs come from replica_cpus and gpus_per_session)"
            )
        out[m["name"]] = float(m["amount"])
    return out


def replica_port_range(config: ServerConfig) -> range | None:
    """`replica_ports` as a range of ports (None: any free port)."""
    if not config.replica_ports:
        return None
    m = _PORTS_RE.match(config.replica_ports.strip())
    first, last = (int(m["first"]), int(m["last"])) if m else (0, -1)
    if not 1024 <= first <= last <= 65535:
        raise ConfigError(f"replica_ports {config.replica_ports!r} must be FIRST-LAST within 1024-65535")
    return range(first, last + 1)


def turn_urls(config: ServerConfig) -> list[str]:
    return [u.strip() for u in config.turn_url.split(",") if u.strip()]


def ice_servers(config: ServerConfig, now: float | None = None) -> list[dict[str, Any]]:
    """The ICE servers for one new session: static entries plus fresh TURN REST credentials."""
    servers = [parse_ice_server(e) for e in config.ice_servers]
    servers += turn.ice_servers(
        turn_urls=turn_urls(config), turn_secret=config.turn_secret, ttl_s=config.turn_ttl, now=now
    )
    return servers

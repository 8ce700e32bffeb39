"""The Ray Serve application of a cluster, from the front door's settings: deploy it, or attach to it.

The application (named `cluster_app`) has two deployments: `AvatarReplica` (server/cluster/replica.py),
autoscaled between `replicas_min` and `replicas_max` on the session count, each replica asking Ray for
`replica_cpus` CPUs, `gpus_per_session` GPUs (GPU backends; the preview asks for none) and the custom
`replica_resources`; and `Registry` (server/cluster/registry.py, one replica, no CPU). Serve runs without
its HTTP proxy: the front door is the only way in.

`serve.run` deploys a new version each time it is called (every replica is replaced, each draining), so
a front door that finds the application running attaches to it instead; to change the replicas'
settings, delete the application first (`serve delete`, docs/cluster.md).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import ray
from ray import serve
from ray.serve.config import AutoscalingConfig, AutoscalingPolicy, RequestRouterConfig
from ray.serve.handle import DeploymentHandle

from liveavatar.backends import backend as backend_named
from server.cluster.registry import Registry
from server.cluster.replica import AvatarReplica
from server.cluster.router import STATS_PERIOD_S
from server.config import ConfigError, ServerConfig, replica_resources

log = logging.getLogger(__name__)

AVATARS = "AvatarReplica"
REGISTRY = "Registry"
SPARE_SESSIONS = 1
"""The autoscaler keeps room for this many sessions more than run (server/cluster/autoscale.py)."""
METRICS_INTERVAL_S = 0.5
LOOK_BACK_S = 2.0
"""How often replicas push their session count to the autoscaler, and over how long it is averaged."""
HEALTH_PERIOD_S = 2.0
HEALTH_TIMEOUT_S = 10.0
RUNNING = ("RUNNING", "DEPLOYING", "UNHEALTHY")
"""Application states a front door attaches to rather than deploying again."""


def connect(address: str) -> None:
    """Join the Ray cluster at `address` as a driver (nothing to do if this process already has); a
    ConfigError that names the address when there is no cluster there."""
    if ray.is_initialized():
        return
    try:
        ray.init(address=address, log_to_driver=False)
    except ConnectionError as exc:
        raise ConfigError(
            f"cluster {address!r}: no Ray cluster answers there ({exc}); start one with `ray start --head` "
            "(docs/cluster.md)"
        ) from None


def actor_options(config: ServerConfig) -> dict[str, Any]:
    """What each replica asks Ray for."""
    gpus = config.gpus_per_session if backend_named(config.backend).runs_on_gpu else 0
    options: dict[str, Any] = {"num_cpus": config.replica_cpus, "num_gpus": gpus}
    if resources := replica_resources(config):
        options["resources"] = resources
    return options


def application(config: ServerConfig) -> Any:
    """The bound application."""
    registry = serve.deployment(
        Registry, name=REGISTRY, num_replicas=1, max_ongoing_requests=1000, ray_actor_options={"num_cpus": 0}
    ).bind()
    avatars = serve.deployment(
        AvatarReplica,
        name=AVATARS,
        ray_actor_options=actor_options(config),
        # each session is one long request; ample room above the slots, so Serve never queues one: the
        # replica itself answers `busy` when it is full
        max_ongoing_requests=4 * config.sessions_per_replica + 16,
        autoscaling_config=_autoscaling(config),
        graceful_shutdown_timeout_s=config.drain_timeout_s,
        graceful_shutdown_wait_loop_s=0.5,
        health_check_period_s=HEALTH_PERIOD_S,
        health_check_timeout_s=HEALTH_TIMEOUT_S,
        request_router_config=RequestRouterConfig(
            request_router_class="server.cluster.router:SessionRouter",
            request_routing_stats_period_s=STATS_PERIOD_S,
            request_routing_stats_timeout_s=2.0,
        ),
    )
    # The front door's bearer tokens stay here: Serve stores deployment arguments in its controller, and
    # replicas check their own per-replica key instead.
    return avatars.bind(settings=dataclasses.asdict(dataclasses.replace(config, auth_tokens=[])), registry=registry)


def _autoscaling(config: ServerConfig) -> AutoscalingConfig:
    """`metrics_interval_s` is deprecated in favour of environment variables that would have to be set on
    every node before Ray starts; the pinned Ray 2.60 still honours it (tests/test_cluster_scaling.py)."""
    return AutoscalingConfig(
        min_replicas=config.replicas_min,
        max_replicas=config.replicas_max,
        metrics_interval_s=METRICS_INTERVAL_S,
        look_back_period_s=LOOK_BACK_S,
        upscale_delay_s=config.upscale_delay_s,
        downscale_delay_s=config.downscale_delay_s,
        policy=AutoscalingPolicy(
            policy_function="server.cluster.autoscale:SessionsPolicy",
            policy_kwargs={"sessions_per_replica": config.sessions_per_replica, "spare_sessions": SPARE_SESSIONS},
        ),
    )


def deploy(config: ServerConfig) -> bool:
    """Deploy the application unless it runs already; True when this call deployed it. Blocks until its
    replicas are ready (a GPU replica loads and warms up its model first: minutes)."""
    serve.start(proxy_location="Disabled")
    status = serve.status().applications.get(config.cluster_app)
    if status is not None and status.status in RUNNING:
        log.info("attaching to the running Serve application %r (its replicas keep their settings)", config.cluster_app)
        return False
    log.info(
        "deploying the Serve application %r: %d-%d replicas of %s, %d sessions each",
        config.cluster_app,
        config.replicas_min,
        config.replicas_max,
        actor_options(config),
        config.sessions_per_replica,
    )
    serve.run(application(config), name=config.cluster_app, route_prefix=None)
    return True


def handles(config: ServerConfig) -> tuple[DeploymentHandle, DeploymentHandle]:
    """Handles to the replicas (placement) and to the registry."""
    return serve.get_app_handle(config.cluster_app), serve.get_deployment_handle(REGISTRY, config.cluster_app)


def replica_counts(config: ServerConfig) -> dict[str, int]:
    """Replicas of the avatar deployment by state (RUNNING, STARTING, STOPPING, ...), from Serve."""
    app = serve.status().applications.get(config.cluster_app)
    if app is None or AVATARS not in app.deployments:
        return {}
    return {str(getattr(state, "value", state)): n for state, n in app.deployments[AVATARS].replica_states.items()}

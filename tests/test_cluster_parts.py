"""The cluster's parts that need no Ray cluster (server/cluster/): how many replicas the sessions need, how
replicas are ranked for a new session, the one view of `/metrics` and `/healthz`, the settings of a front
door and of the replicas it deploys, and `replica_lost` in the protocol reference."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest

from server import protocol as P
from server.config import ConfigError, ServerConfig, load_config

pytest.importorskip("ray.serve")

ROOT = Path(__file__).resolve().parent.parent


# ---- autoscaling ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sessions", "per_replica", "bounds", "replicas"),
    [
        (0, 1, (1, 8), 1),  # room for one: the minimum
        (1, 1, (1, 8), 2),  # one running, one spare
        (2, 2, (1, 2), 2),  # a full replica brings up a second
        (1, 2, (1, 2), 1),
        (2, 3, (1, 2), 1),  # two sessions fit in one replica of three, with a spare slot
        (2.6, 2, (1, 4), 2),  # a look-back average: ceil((2.6 + 1) / 2)
        (40, 1, (2, 10), 10),  # bounded above
        (0, 4, (3, 10), 3),  # and below
    ],
)
def test_the_autoscaler_keeps_room_for_one_more_session(sessions, per_replica, bounds, replicas) -> None:
    from server.cluster.autoscale import SessionsPolicy

    policy = SessionsPolicy(sessions_per_replica=per_replica, spare_sessions=1)
    per = {f"r{i}": sessions / 2 for i in range(2)}  # Serve's per-replica averages
    ctx = SimpleNamespace(
        aggregated_metrics={"sessions": per},
        capacity_adjusted_min_replicas=bounds[0],
        capacity_adjusted_max_replicas=bounds[1],
    )
    assert policy(ctx) == (replicas, {})


def test_the_autoscaler_with_no_reports_yet_wants_the_minimum() -> None:
    from server.cluster.autoscale import SessionsPolicy

    ctx = SimpleNamespace(aggregated_metrics={}, capacity_adjusted_min_replicas=2, capacity_adjusted_max_replicas=5)
    assert SessionsPolicy(2)(ctx) == (2, {})


# ---- placement -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rid:
    """Stands for Serve's `ReplicaID`: hashable, with the `unique_id` the replica reports."""

    unique_id: str


def replica(name: str, **stats) -> SimpleNamespace:
    return SimpleNamespace(replica_id=Rid(name), routing_stats=stats)


def names(ranked) -> list[str]:
    return [(r[0] if isinstance(r, list) else r).replica_id.unique_id for r in ranked]


def test_replicas_rank_by_free_slots_less_uncounted_placements_then_headroom_then_gpu_memory() -> None:
    from server.cluster.router import rank_by_room

    full = replica("full", free=0, headroom=0.9)
    roomy = replica("roomy", free=3, headroom=0.1)
    roomy_fast = replica("roomy-fast", free=3, headroom=0.5, gpu_free_bytes=1)
    roomy_fast_big = replica("roomy-fast-big", free=3, headroom=0.5, gpu_free_bytes=2)
    fresh = replica("fresh")  # no stats yet: just started, empty
    order = names(rank_by_room([full, roomy, roomy_fast, fresh, roomy_fast_big], {}))
    assert order == ["fresh", "roomy-fast-big", "roomy-fast", "roomy", "full"]
    # three sessions just placed on the roomy ones leave them behind one that kept its one slot
    placed = {Rid("roomy"): 3, Rid("roomy-fast"): 3, Rid("roomy-fast-big"): 3}
    one = replica("one", free=1)
    assert names(rank_by_room([roomy, roomy_fast, roomy_fast_big, one], placed))[0] == "one"
    # replicas that refused this session already come last, however much room their stats claim
    assert names(rank_by_room([fresh, roomy, full], {}, avoid={"fresh", "roomy"})) == ["full", "fresh", "roomy"]


async def test_the_router_counts_each_placement_once_until_stats_hold_it_however_late_they_come(
    monkeypatch,
) -> None:
    from server.cluster import router as R

    now = [1000.0]
    monkeypatch.setattr(R.time, "time", lambda: now[0])
    router = object.__new__(R.SessionRouter)  # Serve builds it; the logic needs only its state
    router.initialize_state()
    a, b = replica("a", free=2, taken_at=now[0]), replica("b", free=2, taken_at=now[0])

    def request(sid: str, avoid: tuple[str, ...] = (), method: str = "session") -> SimpleNamespace:
        return SimpleNamespace(args=[sid], kwargs={"avoid": avoid}, metadata=SimpleNamespace(call_method=method))

    first = await router.choose_replicas([a, b], request("s1"))
    assert names(first) == ["a", "b"]
    router.on_request_routed(request("s1"), a.replica_id, None)
    assert names(await router.choose_replicas([a, b], request("s2")))[0] == "b"
    # a's stats are late (a busy controller): the placement still counts, long after it was made
    now[0] += 10.0
    assert names(await router.choose_replicas([a, b], request("s2")))[0] == "b"
    # they arrive and hold s1: counted by the stats, not a second time (a: 1 free, b: 2 free)
    a.routing_stats = {"free": 1, "held": ["s1"], "taken_at": now[0]}
    assert names(await router.choose_replicas([a, b], request("s2"))) == ["b", "a"]
    b.routing_stats = {"free": 1, "held": ["x"], "taken_at": now[0]}
    assert names(await router.choose_replicas([a, b], request("s2"))) == ["a", "b"]  # a tie: candidate order
    # s1 ended: stats taken after it settled no longer hold it, and it stops counting for good
    a.routing_stats = {"free": 2, "held": [], "taken_at": now[0] + R.SETTLE_S}
    assert names(await router.choose_replicas([b, a], request("s2"))) == ["a", "b"]
    assert router.placed[a.replica_id] == {}
    # a replica that refused this session ranks last when the front door places it again
    assert names(await router.choose_replicas([a, b], request("s2", avoid=("a",)))) == ["b", "a"]
    # a placement on a replica whose stats stopped coming counts FORGET_S at most
    router.on_request_routed(request("s3"), b.replica_id, None)
    assert names(await router.choose_replicas([a, b], request("s4"))) == ["a", "b"]
    now[0] += R.FORGET_S + 1
    b.routing_stats = {"free": 3, "held": ["x"], "taken_at": 0.0}
    assert names(await router.choose_replicas([a, b], request("s4"))) == ["b", "a"]
    # a request that is not a session's, or none, is ranked and not counted
    router.on_request_routed(request("x", method="check"), a.replica_id, None)
    assert names(await router.choose_replicas([a, b])) == ["b", "a"] and router.placed[a.replica_id] == {}
    # a replica that left the candidates (drained, removed) is forgotten once its placements are old
    router.on_request_routed(request("s5"), Rid("drained"), None)
    await router.choose_replicas([a, b], request("s6"))
    assert Rid("drained") in router.placed
    now[0] += R.FORGET_S + 1
    assert await router.choose_replicas([], request("s6")) == []
    assert router.placed == {}


class StaleRouterHandle:
    """Stands for the front door's handle to the avatar deployment: each `session(sid, avoid)` request goes
    to the first replica of a fixed ranking not in `avoid` (a router whose stats are out of date), which
    places the session if it has room and refuses it otherwise."""

    def __init__(self, room: dict[str, int]) -> None:
        self.room = room
        self.asked: list[tuple[str, tuple[str, ...]]] = []
        self.requests: list[Placing] = []

    def options(self, stream: bool) -> StaleRouterHandle:
        return self

    @property
    def session(self) -> StaleRouterHandle:
        return self

    def remote(self, sid: str, avoid: tuple[str, ...] = ()) -> Placing:
        order = [r for r in self.room if r not in avoid] + [r for r in self.room if r in avoid]
        chosen = order[0]
        self.asked.append((chosen, avoid))
        if self.room[chosen] <= 0:
            first = {"refused": dict(P.error("busy", f"replica full (all slots are taken on {chosen})", 2)),
                     "replica": chosen}  # fmt: skip
        else:
            self.room[chosen] -= 1
            first = {"replica": chosen, "url": f"ws://{chosen}/ws"}
        self.requests.append(Placing(first))
        return self.requests[-1]


class Placing:
    """Stands for Serve's streaming response: its first item, and whether it was cancelled."""

    def __init__(self, first: dict) -> None:
        self.first = first
        self.cancelled = False

    async def __anext__(self) -> dict:
        return self.first

    def cancel(self) -> None:
        self.cancelled = True


async def test_a_refusing_replica_sends_the_offer_to_the_next_and_busy_comes_only_when_every_replica_refused() -> None:
    from server.cluster.frontdoor import FrontDoor, RelayedSession

    door = FrontDoor(ServerConfig())
    door.reports = [{"replica": "full"}, {"replica": "roomy"}]  # what the registry knows: two replicas
    door._avatars = StaleRouterHandle({"full": 0, "roomy": 1})

    def relayed(sid: str) -> RelayedSession:
        return RelayedSession(sid, SimpleNamespace(), "127.0.0.1", 0.0)

    placed = await door._place(relayed("s1"))
    assert placed["replica"] == "roomy" and door._avatars.asked == [("full", ()), ("roomy", ("full",))]
    assert door.metrics.sessions_rejected == 0
    with pytest.raises(P.ProtocolError) as refused:
        await door._place(relayed("s2"))  # now both are full
    assert refused.value.code == "busy" and "replica full" in str(refused.value) and refused.value.retry_after_s == 2
    assert door._avatars.asked[2:] == [("full", ()), ("roomy", ("full",))] and door.metrics.sessions_rejected == 1
    door.reports = door.reports[:1]  # a registry that knows one replica: its refusal is the answer
    with pytest.raises(P.ProtocolError):
        await door._place(relayed("s3"))
    assert door._avatars.asked[4:] == [("full", ())]
    door.reports = [{"replica": "roomy"}]  # it knows one, but another (new, say) refused first: ask on
    with pytest.raises(P.ProtocolError):
        await door._place(relayed("s4"))
    assert door._avatars.asked[5:] == [("full", ()), ("roomy", ("full",))]
    door.reports = []  # the registry restarting: ask on, but not forever
    with pytest.raises(P.ProtocolError):
        await door._place(relayed("s5"))
    assert door._avatars.asked[7:] == [("full", ()), ("roomy", ("full",))]
    assert door.metrics.sessions_rejected == 4 and all(
        r.cancelled == ("refused" in r.first) for r in door._avatars.requests
    )


# ---- one view ------------------------------------------------------------------------------------


def report(replica_id: str, node: str, sessions: int, free: int, gpus: list | None = None, **more) -> dict:
    base = {
        "replica": replica_id, "actor": f"SERVE_REPLICA::app#AvatarReplica#{replica_id}", "node": node,
        "host": "10.0.0." + node[-1], "url": "ws://x/ws", "key": "k", "info": {}, "capacity": sessions + free,
        "sessions": sessions, "free": free, "busy_reason": "", "fps": [25.0] * sessions, "lag_s": [0.6] * sessions,
        "queue_depth": sessions, "worker_queue": 0, "blocks_generated": 10, "frames_sent": 120, "errors": {},
        "gpus": gpus or [], "started": 0.0,
    }  # fmt: skip
    return {**base, **more}


def test_metrics_show_every_replica_and_host_with_their_sessions_and_gpu_memory() -> None:
    from server.cluster.view import Placements, render
    from server.metrics import Metrics

    gpu = [{"device": "cuda:0", "used_bytes": 60 * 2**30, "total_bytes": 140 * 2**30}]
    reports = [
        report("r1", "node1", 1, 0, gpu, lag_s=[0.7]),
        report("r2", "node1", 0, 1, gpu),
        report("r3", "node2", 1, 0, gpu, fps=[20.0]),
    ]
    front = Metrics(sessions_total=5, sessions_rejected=1)
    front.error("replica_lost")
    placements = Placements()
    placements.placed(0.02)
    text = render("liveavatar", front, placements, 2, reports)
    samples = dict(line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))
    assert samples["liveavatar_cluster_replicas_ready"] == "3" and samples["liveavatar_sessions_active"] == "2"
    assert samples['liveavatar_replica_sessions{replica="r1",node="node1",host="10.0.0.1"}'] == "1"
    assert samples['liveavatar_host_sessions{node="node1",host="10.0.0.1"}'] == "1"
    assert samples['liveavatar_host_replicas{node="node1",host="10.0.0.1"}'] == "2"
    assert samples['liveavatar_host_gpu_memory_used_bytes{node="node1",host="10.0.0.1"}'] == f"{120 * 2**30:g}"
    key = 'liveavatar_replica_gpu_memory_total_bytes{replica="r3",node="node2",host="10.0.0.2",device="cuda:0"}'
    assert samples[key] == f"{140 * 2**30:g}"
    assert samples["liveavatar_output_fps"] == "22.5" and samples["liveavatar_output_lag_seconds"] == "0.7"
    assert samples['liveavatar_errors_total{code="replica_lost"}'] == "1"
    assert samples["liveavatar_placement_seconds_count"] == "1"
    assert all(re.fullmatch(r"liveavatar_\w+(\{[^}]*\})? \S+", line) for line in text.splitlines() if line[0] != "#")


def test_healthz_says_how_many_replicas_are_ready_and_503_when_none_is() -> None:
    from server.cluster.view import health

    code, text = health([])
    assert code == 503 and "no replica ready" in text
    code, text = health([report("r1", "node1", 1, 1), report("r2", "node2", 0, 2)])
    assert code == 200 and text == "ok: 2 replicas ready on 2 hosts (1 sessions, room for 3 more)\n"


def test_label_values_are_escaped() -> None:
    from server.cluster.view import _labels

    assert _labels(host='a"b\\c\nd') == '{host="a\\"b\\\\c\\nd"}'


# ---- settings ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"replicas_min": 0}, "replicas_min must be at least 1"),
        ({"replicas_min": 3, "replicas_max": 2}, "replicas_max at least replicas_min"),
        ({"sessions_per_replica": 0}, "sessions_per_replica must be at least 1"),
        ({"drain_timeout_s": 0}, "drain_timeout_s must be positive"),
        ({"gpus": 2}, "gpus and devices are not for a cluster"),
        ({"replica_resources": ["CPU=2"]}, "not NAME=AMOUNT of a custom resource"),
        ({"replica_resources": ["avatar_host"]}, "not NAME=AMOUNT"),
        ({"replica_ports": "9000-8000"}, "must be FIRST-LAST within 1024-65535"),
        ({"replica_ports": "80-90"}, "must be FIRST-LAST within 1024-65535"),
        ({"cluster_app": "my app"}, "must be letters, digits"),
        ({"random_weights": "tiny", "cuda_graphs": True, "workers": 2}, "the replicas' settings: cuda_graphs"),
    ],
)
def test_bad_cluster_settings_are_refused_with_the_setting_named(fields, message) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        ServerConfig(cluster="auto", **fields).validate()


def test_the_replicas_run_one_gpu_set_or_the_preview_slots_behind_their_key() -> None:
    gpu = ServerConfig(cluster="auto", random_weights="tiny", gpus_per_session=2, sessions_per_replica=3)
    replica = gpu.validate().replica_config("k" * 16)
    assert (replica.cluster, replica.host, replica.port, replica.gpus, replica.devices) == ("", "0.0.0.0", 0, 2, [])
    assert (replica.max_sessions, replica.auth_tokens, replica.allowed_origins) == (3, ["k" * 16], [])
    assert (replica.max_connections_per_client, replica.max_pending_per_client) == (0, 0)
    preview = ServerConfig(cluster="auto", gpus_per_session=1, sessions_per_replica=4).validate()
    assert preview.replica_config("k" * 16).gpus == 1 and preview.replica_config("k" * 16).cpu_capacity == 0
    assert preview.cluster_sessions == 4


def test_front_door_flags_toml_and_environment_set_the_cluster_settings(tmp_path) -> None:
    import argparse

    from server.serve_cmd import add_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(
        ["--cluster", "auto", "--replicas-min", "2", "--replicas-max", "6", "--sessions-per-replica", "3",
         "--drain-timeout-s", "90", "--replica-ports", "20000-20099", "--replica-resource", "avatar_host=1",
         "--replica-cpus", "2", "--cluster-app", "tutors"]
    )  # fmt: skip
    config = config_from_args(args)
    assert (config.cluster, config.cluster_app, config.replicas_min, config.replicas_max) == ("auto", "tutors", 2, 6)
    assert (config.sessions_per_replica, config.drain_timeout_s, config.replica_cpus) == (3, 90.0, 2.0)
    assert config.replica_resources == ["avatar_host=1"] and config.cluster_sessions == 18
    toml = tmp_path / "front.toml"
    toml.write_text('cluster = "10.0.0.1:6379"\nreplicas_max = 4\ndownscale_delay_s = 300\n')
    env = {"LIVEAVATAR_REPLICA_RESOURCES": "gpu_host=1,h200=1"}
    from_file = load_config(toml, env=env)
    assert (from_file.cluster, from_file.replicas_max, from_file.downscale_delay_s) == ("10.0.0.1:6379", 4, 300.0)
    assert from_file.replica_resources == ["gpu_host=1", "h200=1"]


def test_each_replica_asks_ray_for_its_gpu_set_or_cpu_slot_and_the_custom_resources() -> None:
    from server.cluster.deploy import actor_options

    gpu = ServerConfig(cluster="auto", random_weights="tiny", gpus_per_session=2, replica_resources=["h200=1"])
    assert actor_options(gpu.validate()) == {"num_cpus": 1.0, "num_gpus": 2, "resources": {"h200": 1.0}}
    assert actor_options(ServerConfig(cluster="auto", replica_cpus=2).validate()) == {"num_cpus": 2.0, "num_gpus": 0}


# ---- protocol ------------------------------------------------------------------------------------


def test_the_error_table_of_the_protocol_reference_lists_exactly_the_server_error_codes() -> None:
    doc = (ROOT / "docs" / "protocol.md").read_text()
    table = doc.split("\n## Error codes\n", 1)[1].split("\n## ", 1)[0]
    codes = re.findall(r"^\| `([a-z_]+)` \|", table, flags=re.MULTILINE)
    assert sorted(codes) == sorted(P.ERROR_CODES)
    assert "replica_lost" in codes

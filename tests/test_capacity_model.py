"""The capacity model (`bench/capacity.py`) on the figures it ships with: sessions per GPU set from the
measured block time, hosts for a number of sessions, the "does not keep real time" advice, bad input."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

PATH = Path(__file__).resolve().parent.parent / "bench" / "capacity.py"
spec = importlib.util.spec_from_file_location("capacity", PATH)
capacity = importlib.util.module_from_spec(spec)
sys.modules["capacity"] = capacity  # dataclasses look their module up there
spec.loader.exec_module(capacity)


def test_384x256_takes_one_session_per_h200_and_200_sessions_need_25_hosts_of_8():
    p = capacity.plan("384*256", 4, 1, gpus_per_host=8, sessions=200)
    assert p.block_ms == 330 and p.by_speed == 1  # floor(480 / 330)
    assert p.by_memory == 6  # floor((140.4 × 0.92 − 16.88) / 18.27): speed, not memory, limits
    assert (p.sessions_per_set, p.sets_per_host, p.sessions_per_host, p.hosts) == (1, 8, 8, 25)
    assert p.advice == ""


def test_two_steps_at_384x256_fit_two_sessions_per_gpu():
    p = capacity.plan("384*256", 2, 1, gpus_per_host=8, sessions=200)
    assert (p.sessions_per_set, p.hosts) == (2, 13)  # floor(480 / 223) = 2; ceil(200 / 16)


def test_704x384_on_two_gpu_sets_is_one_session_per_set_and_hosts_round_up():
    p = capacity.plan("704*384", 4, 2, gpus_per_host=8, sessions=10)
    assert p.block_ms == 448 and p.by_memory is None
    assert (p.sessions_per_set, p.sets_per_host, p.sessions_per_host, p.hosts) == (1, 4, 4, 3)
    assert "ca0affc" in p.source


def test_704x384_on_one_gpu_does_not_keep_real_time_and_suggests_two_gpu_sets():
    p = capacity.plan("704*384", 4, 1, gpus_per_host=8, sessions=10)
    assert p.block_ms == 870 and p.sessions_per_set == 0 and p.hosts is None
    assert "does not keep real time" in p.advice and "--gpus-per-session 2 (measured 448 ms" in p.advice


def test_an_unmeasured_slow_set_gets_an_even_split_estimate():
    p = capacity.plan("1280*720", 4, 2, gpus_per_host=8, sessions=4, block_ms=1500)
    assert p.hosts is None and "about --gpus-per-session 7" in p.advice  # ceil(2 × 1500 / 480)


def test_block_ms_override_replaces_the_measured_figure_and_realtime_capacity_scales_it():
    assert capacity.plan("704*384", 4, 2, 8, 8, block_ms=200).sessions_per_set == 2
    assert capacity.plan("384*256", 2, 1, 8, 8, realtime_capacity=0.9).sessions_per_set == 1  # 432 / 223


def test_session_memory_limits_sessions_when_it_is_tighter_than_speed():
    p = capacity.plan("640*360", 4, 1, 8, 100, block_ms=100, session_gib=40)
    assert p.by_speed == 4 and p.by_memory == 2 and p.sessions_per_set == 2  # (129.2 − 16.9) / 40


def test_every_shipped_figure_cites_its_source():
    for figure in capacity.FIGURES:
        assert figure.block_ms > 0 and ("docs/benchmarks.md" in figure.source or "commit" in figure.source)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"size": "704x"}, "WIDTH\\*HEIGHT"),
        ({"sessions": 0}, "sessions must be at least 1"),
        ({"gpus_per_session": 4, "gpus_per_host": 2}, "do not fit 2 GPUs per host"),
        ({"block_ms": -5}, "--block-ms must be above 0"),
        ({"realtime_capacity": 0}, "realtime capacity must be above 0"),
        ({"size": "512*512"}, "no measured block time for 512\\*512.*pass --block-ms"),
    ],
)
def test_bad_input_is_refused_with_a_clear_error(kwargs, message):
    args = {"size": "384*256", "steps": 4, "gpus_per_session": 1, "gpus_per_host": 8, "sessions": 10} | kwargs
    with pytest.raises(ValueError, match=message):
        capacity.plan(**args)


def test_cli_prints_a_table_of_every_figure_and_json_for_one(capsys):
    assert capacity.main(["--sessions", "200"]) == 0
    out = capsys.readouterr().out
    assert out.count("| 704*384 |") == 4 and "does not keep real time" in out
    assert capacity.main(["--sessions", "10", "--size", "704*384", "--gpus-per-session", "2", "--json"]) == 0
    (plan,) = json.loads(capsys.readouterr().out)
    assert plan["hosts"] == 3 and plan["sessions_per_host"] == 4


def test_cli_bad_input_exits_with_the_reason(capsys):
    with pytest.raises(SystemExit) as exit_info:
        capacity.main(["--sessions", "5", "--size", "512*512"])
    assert exit_info.value.code == 2 and "pass --block-ms" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        capacity.main(["--sessions", "5", "--block-ms", "300"])
    assert "need --size" in capsys.readouterr().err

"""`liveavatar bench` on the tiny config writes a complete result file, and `liveavatar engines`
builds and lists ONNX graphs through the application's export targets."""

import json

from server.cli import main


def test_bench_tiny_writes_json_result(tmp_path, capsys):
    out = tmp_path / "result.json"
    args = [
        "bench",
        "--arch",
        "tiny",
        "--size",
        "128*128",
        "--blocks",
        "2",
        "--warmup",
        "1",
        "--no-vae",
        "--json",
        str(out),
    ]
    assert main(args) == 0
    result = json.loads(out.read_text())
    for key in (
        "steady_fps",
        "block_latency_ms",
        "audio_encoder_ms",
        "dit_step_ms",
        "vae_ms",
        "peak_gib_per_rank",
        "engine",
        "gpu",
        "commit",
    ):
        assert key in result
    assert result["steady_fps"] > 0 and sorted(result["dit_step_ms"]) == ["0", "1", "2", "3"]
    assert "steady fps" in capsys.readouterr().out


def test_bench_balanced_pipeline_on_two_cpu_ranks_cuts_a_step_and_decodes(tmp_path):
    out = tmp_path / "balanced.json"
    args = [
        "bench",
        "--arch",
        "tiny",
        "--size",
        "128*128",
        "--blocks",
        "3",
        "--warmup",
        "1",
        "--device",
        "cpu",
        "--gpus",
        "2",
        "--balance",
        "--decode-cost",
        "1.0",
        "--json",
        str(out),
    ]
    assert main(args) == 0
    result = json.loads(out.read_text())
    first, second = result["spans_per_rank"]
    assert first[-1][0] == second[0][0] and first[-1][2] == second[0][1], "step 2 is cut between the ranks"
    assert result["balanced"] and result["vae_ms"] > 0 and sorted(result["dit_step_ms"]) == ["0", "1", "2", "3"]


def test_engines_build_and_list(tmp_path, capsys):
    cache = str(tmp_path / "cache")
    assert main(["engines", "build", "--arch", "tiny", "--size", "128*128", "--cache", cache]) == 0
    assert main(["engines", "list", "--cache", cache]) == 0
    listing = capsys.readouterr().out
    assert "dit_block_step" in listing and "vae_decode_step" in listing


def test_bench_defaults_follow_the_arch():
    from liveavatar.bench import resolve_options
    from server.cli import build_parser

    def options(*argv):
        opts = resolve_options(build_parser().parse_args(["bench", *argv]))
        return opts["size"], opts["blocks"], opts["warmup"]

    assert options("--arch", "tiny") == ("128*128", 6, 2)
    assert options("--arch", "14b") == ("704*384", 16, 8)
    assert options("--arch", "14b", "--size", "256*128", "--blocks", "3", "--warmup", "1") == ("256*128", 3, 1)


def test_help_shows_every_default():
    import argparse
    import re

    from server.cli import build_parser

    subs = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name in ("serve", "generate", "batch", "bench"):
        sub = subs.choices[name]
        entries = re.split(r"\n  (?=-)", sub.format_help())  # one entry per option, with its wrapped help
        for action in sub._actions:
            if action.option_strings and action.default not in (None, False, argparse.SUPPRESS) and action.help:
                entry = next(e for e in entries if e.startswith(action.option_strings[0]))
                assert "default" in entry, f"liveavatar {name} --help: {action.option_strings[0]} hides its default"
    bench_help = " ".join(subs.choices["bench"].format_help().split())
    assert "default per --arch: tiny 128*128, 14b 704*384" in bench_help and "(default: tiny)" in bench_help


def test_commit_comes_from_the_installed_package_without_a_git_checkout(monkeypatch):
    import json
    from importlib import metadata

    from liveavatar import version

    monkeypatch.delenv("LIVEAVATAR_COMMIT", raising=False)
    assert version.source_commit() not in ("", "unknown")  # this checkout
    monkeypatch.setattr(version, "_git_commit", lambda folder: None)

    class Installed:
        def __init__(self, record):
            self.record = record

        def read_text(self, name):
            return self.record if name == "direct_url.json" else None

    from_git = json.dumps(
        {"url": "https://example.org/liveavatar.git", "vcs_info": {"vcs": "git", "commit_id": "0123456789abcdef"}}
    )
    monkeypatch.setattr(metadata, "distribution", lambda name: Installed(from_git))
    assert version.source_commit() == "0123456"
    monkeypatch.setattr(metadata, "distribution", lambda name: Installed(None))  # a wheel or sdist
    monkeypatch.setattr(metadata, "version", lambda name: "0.1.0")
    assert version.source_commit() == "0.1.0 (no git checkout)"
    monkeypatch.setenv("LIVEAVATAR_COMMIT", "abc1234")
    assert version.source_commit() == "abc1234"


def test_the_version_is_written_once_in_pyproject(monkeypatch):
    import tomllib
    from importlib import metadata
    from pathlib import Path

    import liveavatar
    from liveavatar import version
    from server import app

    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    declared = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]["version"]
    assert liveavatar.__version__ == app.VERSION == declared, "reinstall the package (bash docker/install.sh)"

    def not_installed(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", not_installed)
    assert version.package_version() == version.UNKNOWN_VERSION == "0+unknown"
    monkeypatch.setattr(version, "_git_commit", lambda folder: None)
    monkeypatch.setattr(version, "_installed_commit", lambda: None)
    monkeypatch.delenv("LIVEAVATAR_COMMIT", raising=False)
    assert version.source_commit() == "unknown"

"""One set of model flags for `serve`, `generate`, `batch` and `bench` (liveavatar/settings.py): the same
spellings (hyphenated, the original LiveAvatar ones as aliases), the same defaults, one default backend
rule, one size rule, and the same error text from every command. Every spelling that worked before
still works."""

from __future__ import annotations

import argparse
import io
import os
from pathlib import Path

import pytest
from PIL import Image

from liveavatar.generator import Size
from liveavatar.media_io import MAX_PORTRAIT_ASPECT, portrait_shape_problem
from liveavatar.offline import generate
from liveavatar.settings import COMMAND_SETTINGS, ModelSettings, SettingsError, validate
from server import serve_cmd
from server.cli import build_parser, main
from server.portrait import decode_portrait
from server.protocol import ProtocolError

COMMANDS = ("serve", "generate", "batch", "bench")
NEEDED = {"batch": ["jobs.csv"]}
"""Positional arguments a command needs before its flags parse."""
SPEECH = Path(__file__).parent / "assets" / "speech_en_16k.wav"


@pytest.fixture(autouse=True)
def no_server_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """serve reads LIVEAVATAR_* variables; the host's must not leak into these comparisons."""
    for name in list(os.environ):
        if name.startswith("LIVEAVATAR_"):
            monkeypatch.delenv(name)


def parse(command: str, *argv: str) -> argparse.Namespace:
    return build_parser().parse_args([command, *NEEDED.get(command, []), *argv])


def options_of(command: str) -> dict[str, tuple[str, ...]]:
    """Model setting -> its option strings, as `command --help` lists them."""
    sub = build_parser()._subparsers._group_actions[0].choices[command]  # type: ignore[union-attr]
    return {a.dest: tuple(a.option_strings) for a in sub._actions if a.dest in COMMAND_SETTINGS[command]}


def resolved(command: str, *argv: str) -> ModelSettings:
    """What the command will generate with, by the command's own resolution path."""
    args = parse(command, *argv)
    if command == "serve":
        config = serve_cmd.config_from_args(args)
        return ModelSettings(
            config.backend,
            config.checkpoints,
            config.lora,
            config.random_weights,
            config.size,
            config.sample_steps,
            config.motion_frames,
            config.engine,
            config.fp8,
        )
    if command in ("generate", "batch"):
        settings = generate.resolve_settings(args)
        return ModelSettings(**{**vars(settings.model), "size": str(settings.size)})
    from liveavatar.bench import resolve_options

    opts = resolve_options(args)
    return ModelSettings(
        "liveavatar",
        opts["ckpt_dir"] or "",
        "",
        opts["arch"],
        opts["size"],
        opts["steps"],
        engine=opts["engine"],
        fp8=opts["fp8"],
    )


def test_every_command_spells_each_model_flag_the_same_way() -> None:
    hyphenated = {
        "backend": "--backend",
        "ckpt_dir": "--ckpt-dir",
        "lora": "--lora",
        "random_weights": "--random-weights",
        "size": "--size",
        "sample_steps": "--sample-steps",
        "motion_frames": "--motion-frames",
        "engine": "--engine",
        "fp8": "--fp8",
        "seed": "--seed",
        "gpus_per_session": "--gpus-per-session",
        "cuda_graphs": "--cuda-graphs",
        "batch_sessions": "--batch-sessions",
    }
    original = {
        "ckpt_dir": "--ckpt_dir",
        "lora": "--lora_path",
        "random_weights": "--random_weights",
        "sample_steps": "--sample_steps",
        "motion_frames": "--motion_frames",
    }
    for command in COMMANDS:
        options = options_of(command)
        assert set(options) == set(COMMAND_SETTINGS[command])
        for name, spellings in options.items():
            assert spellings[0] == hyphenated[name], f"{command}: {spellings}"
            assert name not in original or original[name] in spellings, f"{command} lacks {original[name]}"
    shared = set(COMMAND_SETTINGS["serve"]) & set(COMMAND_SETTINGS["generate"])
    assert {
        "backend",
        "ckpt_dir",
        "lora",
        "random_weights",
        "size",
        "sample_steps",
        "motion_frames",
        "engine",
        "fp8",
    } <= shared
    assert options_of("generate") == options_of("batch")


@pytest.mark.parametrize("command", ["serve", "generate", "batch"])
def test_the_same_defaults_everywhere(command: str) -> None:
    assert resolved(command) == validate(ModelSettings())
    assert resolved(command) == ModelSettings(backend="preview", size="512*512")


def test_bench_defaults_are_the_same_rule_for_its_tiny_architecture() -> None:
    assert resolved("bench") == validate(ModelSettings(random_weights="tiny"))
    assert resolved("bench").size == "128*128" and resolved("bench", "--arch", "14b").size == "704*384"


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize(
    ("argv", "name", "value"),
    [
        (["--ckpt-dir", "CK"], "ckpt_dir", "CK"),
        (["--ckpt_dir", "CK"], "ckpt_dir", "CK"),
        (["--lora", "L.safetensors"], "lora", "L.safetensors"),
        (["--lora-path", "L.safetensors"], "lora", "L.safetensors"),
        (["--lora_path", "L.safetensors"], "lora", "L.safetensors"),
        (["--random-weights", "14b"], "random_weights", "14b"),
        (["--random_weights", "full"], "random_weights", "14b"),
        (["--sample-steps", "3"], "sample_steps", 3),
        (["--sample_steps", "3"], "sample_steps", 3),
        (["--motion-frames", "5"], "motion_frames", 5),
        (["--motion_frames", "5"], "motion_frames", 5),
        (["--size", "256*128"], "size", "256*128"),
        (["--engine", "compile"], "engine", "compile"),
        (["--fp8"], "fp8", True),
        (["--seed", "7"], "seed", 7),
        (["--gpus-per-session", "2"], "gpus_per_session", 2),
        (["--cuda-graphs"], "cuda_graphs", True),
        (["--batch-sessions"], "batch_sessions", True),
    ],
)
def test_both_spellings_reach_the_same_setting(command: str, argv: list[str], name: str, value: object) -> None:
    if name not in COMMAND_SETTINGS[command]:
        pytest.skip(f"{command} has no {name} setting")
    assert getattr(parse(command, *argv), name) == value


@pytest.mark.parametrize(
    ("command", "argv", "expected"),
    [
        # every spelling each command accepted before this change
        (
            "serve",
            [
                "--ckpt-dir",
                "D",
                "--lora",
                "L",
                "--random-weights",
                "tiny",
                "--sample-steps",
                "3",
                "--motion-frames",
                "5",
                "--engine",
                "compile",
                "--fp8",
                "--size",
                "256*256",
                "--backend",
                "liveavatar",
            ],
            {
                "ckpt_dir": "D",
                "lora": "L",
                "random_weights": "tiny",
                "sample_steps": 3,
                "motion_frames": 5,
                "engine": "compile",
                "fp8": True,
                "size": "256*256",
                "backend": "liveavatar",
            },
        ),
        (
            "generate",
            [
                "--ckpt_dir",
                "D",
                "--lora_path",
                "L",
                "--random_weights",
                "full",
                "--sample_steps",
                "3",
                "--num_clip",
                "2",
                "--infer_frames",
                "24",
                "--sample_guide_scale",
                "1.5",
                "--enable_online_decode",
                "--offload_model",
                "--seed",
                "9",
                "--size",
                "384*256",
                "--backend",
                "preview",
                "--preset",
                "quick",
                "--trim-silence",
            ],
            {
                "ckpt_dir": "D",
                "lora": "L",
                "random_weights": "14b",
                "sample_steps": 3,
                "num_clip": 2,
                "infer_frames": 24,
                "sample_guide_scale": 1.5,
                "enable_online_decode": True,
                "offload_model": True,
                "seed": 9,
                "size": "384*256",
                "backend": "preview",
                "preset": "quick",
                "trim_silence": True,
            },
        ),
        (
            "batch",
            ["--no-enable_online_decode", "--no-offload_model", "--num_clip", "1"],
            {"enable_online_decode": False, "offload_model": False, "num_clip": 1},
        ),
        (
            "generate",
            [
                "--num-clip",
                "2",
                "--infer-frames",
                "24",
                "--sample-guide-scale",
                "1",
                "--enable-online-decode",
                "--no-offload-model",
            ],
            {
                "num_clip": 2,
                "infer_frames": 24,
                "sample_guide_scale": 1.0,
                "enable_online_decode": True,
                "offload_model": False,
            },
        ),
        (
            "bench",
            ["--arch", "14b", "--ckpt-dir", "D", "--steps", "2", "--engine", "compile", "--fp8", "--size", "256*128"],
            {
                "random_weights": "14b",
                "ckpt_dir": "D",
                "sample_steps": 2,
                "engine": "compile",
                "fp8": True,
                "size": "256*128",
            },
        ),
    ],
)
def test_every_old_spelling_still_works(command: str, argv: list[str], expected: dict[str, object]) -> None:
    args = parse(command, *argv)
    assert {k: getattr(args, k) for k in expected} == expected


@pytest.mark.parametrize("command", ["serve", "generate", "batch"])
def test_the_default_backend_rule(command: str, tmp_path: Path) -> None:
    assert resolved(command).backend == "preview"
    with_weights = resolved(command, "--random-weights", "tiny")
    assert (with_weights.backend, with_weights.size) == ("liveavatar", "128*128")
    with_checkpoint = resolved(command, "--ckpt-dir", str(tmp_path))
    assert (with_checkpoint.backend, with_checkpoint.size) == ("liveavatar", "704*384")
    assert resolved(command, "--ckpt_dir", str(tmp_path), "--backend", "preview").backend == "preview"


@pytest.mark.parametrize("command", ["serve", "generate", "batch", "bench"])
def test_the_liveavatar_backend_fits_sizes_to_the_dit_grid_the_same_way(command: str) -> None:
    assert resolved(command, "--random-weights", "tiny", "--size", "688*368").size == "640*384"
    if command != "bench":
        assert resolved(command, "--size", "688*368").size == "688*368"  # the preview makes any multiple of 16


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--size", "700*384"], "--size 700*384: width 700 must be a multiple of 16 between 128 and 1280"),
        (["--size", "700x"], "--size 700x: must look like 704*384 (width*height)"),
        (["--size", "64*64"], "--size 64*64: width 64 must be a multiple of 16 between 128 and 1280"),
        (["--sample-steps", "0"], "--sample-steps must be between 1 and 50, got 0"),
        (["--sample_steps", "51"], "--sample-steps must be between 1 and 50, got 51"),
        (["--motion-frames", "6"], "--motion-frames must be 1 + 4k (73 in the reference), got 6"),
        (["--engine", "turbo"], "--engine must be one of eager, compile, got 'turbo'"),
        (["--backend", "liveavatar"], "the liveavatar backend needs --ckpt-dir"),
    ],
)
def test_serve_generate_and_bench_refuse_with_the_same_words(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    def error(command: str, *extra: str) -> str:
        assert main([command, *argv, *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err, err
        return err.split(": ", 1 + (command == "generate"))[-1]

    def takes(command: str) -> bool:
        return any(argv[0] in spellings for spellings in options_of(command).values())

    extra = {"generate": ["--audio", str(SPEECH), "-o", str(tmp_path / "o.mp4")]}
    texts = {c: error(c, *extra.get(c, [])) for c in ("serve", "generate", "bench") if takes(c)}
    assert "serve" in texts and len(texts) >= 2
    assert all(text.startswith(message) for text in texts.values()), texts
    assert len(set(texts.values())) == 1, texts


def test_random_weights_full_is_the_14b_architecture() -> None:
    assert validate(ModelSettings(random_weights="full")).random_weights == "14b"
    assert serve_cmd.config_from_args(parse("serve", "--random_weights", "full")).random_weights == "14b"
    with pytest.raises(SystemExit):
        parse("generate", "--random-weights", "huge")


def test_portraits_are_framed_by_one_rule_online_and_offline(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    wide = Image.new("RGB", (MAX_PORTRAIT_ASPECT * 40 + 8, 40), (128, 100, 90))
    problem = portrait_shape_problem(*wide.size)
    assert problem and "cannot be framed" in problem
    buf = io.BytesIO()
    wide.save(buf, "PNG")
    (tmp_path / "wide.png").write_bytes(buf.getvalue())
    with pytest.raises(ProtocolError, match=problem):
        decode_portrait(buf.getvalue(), max_bytes=1 << 20, max_pixels=1 << 22)
    code = main(
        ["generate", "--image", str(tmp_path / "wide.png"), "--audio", str(SPEECH), "-o", str(tmp_path / "o.mp4")]
    )
    assert code == 2 and problem in capsys.readouterr().err
    assert portrait_shape_problem(MAX_PORTRAIT_ASPECT * 40, 40) is None


def test_generate_settings_carry_the_shared_size_and_steps() -> None:
    settings = generate.resolve_settings(
        parse("generate", "--random-weights", "tiny", "--sample_steps", "2", "--seed", "3")
    )
    assert settings.size == Size(128, 128) and settings.seed == 3
    model = settings.model
    assert (model.random_weights, model.sample_steps, model.motion_frames, model.engine) == ("tiny", 2, 73, "eager")
    assert settings.offline_options() == {"guide_scale": 0.0, "offload_model": False}


@pytest.mark.parametrize("command", ["serve", "generate", "batch"])
def test_gpus_per_session_and_cuda_graphs_are_refused_where_the_backend_has_none_in_the_same_words(
    command: str,
) -> None:
    """`serve` takes both flags and the offline tools none, but the settings rule is one: a backend
    without them refuses them, whichever command carries the settings."""
    for settings, words in (
        (ModelSettings(backend="preview", gpus_per_session=2), "--gpus-per-session is for the liveavatar backend"),
        (ModelSettings(backend="preview", cuda_graphs=True), "--cuda-graphs is for the liveavatar backend"),
        (ModelSettings(random_weights="tiny", gpus_per_session=2, cuda_graphs=True), "sessions on one GPU"),
        (ModelSettings(random_weights="tiny", gpus_per_session=9), "1..8"),
        (ModelSettings(backend="preview", batch_sessions=True), "--batch-sessions is for the liveavatar backend"),
        (ModelSettings(random_weights="tiny", gpus_per_session=2, batch_sessions=True), "sessions on one GPU"),
    ):
        with pytest.raises(SettingsError, match=words):
            validate(settings)
    if command == "serve":
        from server.config import ConfigError, load_config

        with pytest.raises(ConfigError, match="--gpus-per-session is for the liveavatar backend"):
            load_config(env={}, overrides={"backend": "preview", "gpus_per_session": 2})

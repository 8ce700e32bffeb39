"""`liveavatar generate` end to end with the preview backend: file timing, clip caps, presets, multi-role."""

from __future__ import annotations

import argparse
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from liveavatar.media_io import decode_audio, default_portrait_path, load_image
from liveavatar.offline import generate
from liveavatar.offline.mux import probe

ASSETS = Path(__file__).parent / "assets"


def cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    generate.add_arguments(parser)
    return generate.run(parser.parse_args(list(argv)))


def decoded_frames(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def test_preview_video_matches_the_input_audio(tmp_path: Path) -> None:
    out = tmp_path / "talk.mp4"
    audio = ASSETS / "speech_en_16k_b.wav"
    assert (
        cli(
            "--backend",
            "preview",
            "--audio",
            str(audio),
            "--size",
            "256*256",
            "--prompt",
            "A woman talks.",
            "-o",
            str(out),
        )
        == 0
    )
    info = probe(out)
    seconds = decode_audio(audio).duration
    block = 12 / 25
    assert info["fps"] == 25 and (info["width"], info["height"]) == (256, 256)
    assert abs(info["frames"] - seconds * 25) <= 12
    assert abs(info["video_seconds"] - seconds) <= block and abs(info["audio_seconds"] - seconds) <= block
    assert not list(tmp_path.glob("*.partial*"))


def test_num_clip_caps_the_length_and_quick_preset_sets_the_size(tmp_path: Path) -> None:
    out = tmp_path / "short.mp4"
    audio = str(ASSETS / "speech_en_16k.wav")
    assert cli("--backend", "preview", "--audio", audio, "--preset", "quick", "--num_clip", "2", "-o", str(out)) == 0
    info = probe(out)
    assert (info["width"], info["height"]) == (384, 256)
    assert info["frames"] == 2 * 32 and abs(info["audio_seconds"] - 64 / 25) < 0.1


def test_flags_override_the_preset() -> None:
    parser = argparse.ArgumentParser()
    generate.add_arguments(parser)
    args = parser.parse_args(["--preset", "high", "--sample_steps", "2", "--backend", "preview", "--audio", "x.wav"])
    settings = generate.resolve_settings(args)
    assert str(settings.size) == "704*384" and settings.values["sample_steps"] == 2
    assert settings.values["enable_online_decode"] is True and settings.values["infer_frames"] == 48


def test_two_role_script_switches_at_a_block_boundary_without_a_seam(tmp_path: Path) -> None:
    portrait = load_image(default_portrait_path())
    cv2.imwrite(str(tmp_path / "a.png"), cv2.cvtColor(portrait, cv2.COLOR_RGB2BGR))
    cv2.imwrite(str(tmp_path / "b.png"), np.ascontiguousarray(portrait[:, ::-1]))  # mirrored, red/blue swapped
    audio = ASSETS / "speech_en_16k_b.wav"
    (tmp_path / "roles.yaml").write_text(
        f"segments:\n"
        f"  - {{image: a.png, audio: {audio}, prompt: A woman speaks first.}}\n"
        f"  - {{image: b.png, audio: {audio}, prompt: Another person answers.}}\n"
    )
    out = tmp_path / "dialogue.mp4"
    assert (
        cli("--backend", "preview", "--script", str(tmp_path / "roles.yaml"), "--size", "256*256", "-o", str(out)) == 0
    )
    frames = decoded_frames(out).astype(np.float32)
    blocks_a = -(-len(decode_audio(audio).samples) // 7680)
    seam = blocks_a * 12
    assert abs(len(frames) - (seam + decode_audio(audio).duration * 25)) <= 12
    look_a = cv2.resize(portrait, (256, 256), interpolation=cv2.INTER_AREA).astype(np.float32)
    look_b = look_a[:, ::-1, ::-1]
    dist_a = np.abs(frames - look_a).mean(axis=(1, 2, 3))
    dist_b = np.abs(frames - look_b).mean(axis=(1, 2, 3))
    assert np.all(dist_a[:seam] < dist_b[:seam] / 2) and np.all(dist_b[seam:] < dist_a[seam:] / 2)
    assert frames.std(axis=(1, 2, 3)).min() > 20  # no blank frame anywhere, the seam included
    steps = np.abs(np.diff(frames[seam - 3 : seam + 3], axis=0)).mean(axis=(1, 2, 3))
    assert steps[2] > 20 and np.delete(steps, 2).max() < 10  # the identity changes exactly at the seam
    assert steps.min() > 0  # and no frame around it is a duplicate of its neighbour


@pytest.mark.slow  # ~75 s of CPU, nearly all of it building the tiny random pipeline
def test_generate_with_the_tiny_random_dit(tmp_path: Path) -> None:
    pytest.importorskip(
        "liveavatar.backends.liveavatar.generator", reason="the liveavatar backend is not in this tree yet"
    )
    out = tmp_path / "tiny.mp4"
    audio = ASSETS / "speech_en_16k_b.wav"
    code = cli(
        "--backend",
        "liveavatar",
        "--random_weights",
        "tiny",
        "--audio",
        str(audio),
        "--size",
        "128*128",
        "--num_clip",
        "1",
        "--infer_frames",
        "12",
        "-o",
        str(out),
    )
    assert code == 0
    info = probe(out)
    assert info["frames"] == 12 and info["fps"] == 25 and abs(info["audio_seconds"] - 12 / 25) < 0.1

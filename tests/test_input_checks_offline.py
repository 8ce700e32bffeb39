"""Input checks of `liveavatar generate`: one-line errors with a non-zero exit, and quality warnings."""

from __future__ import annotations

import argparse
import logging
import wave
from pathlib import Path

import cv2
import numpy as np
import pytest

from liveavatar.backends.preview.face import detect_faces
from liveavatar.generator import Size
from liveavatar.media_io import decode_audio, default_portrait_path, load_image
from liveavatar.offline import generate
from liveavatar.offline.inputs import check_prompt, load_portrait, load_speech

ASSETS = Path(__file__).parent / "assets"
SPEECH = str(ASSETS / "speech_en_16k_b.wav")


def cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    generate.add_arguments(parser)
    return generate.run(parser.parse_args(list(argv)))


def write_wav(path: Path, samples: np.ndarray, rate: int) -> Path:
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes((np.clip(samples, -1, 1) * 32767).astype(np.int16).tobytes())
    return path


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--audio", "missing.wav"], "audio not found: missing.wav"),
        (["--audio", SPEECH, "--size", "700x"], "--size 700x: must look like 704*384"),
        (["--audio", SPEECH, "--size", "700*384"], "must be a multiple of 16"),
        (["--audio", SPEECH, "--infer_frames", "30"], "--infer-frames must be a positive multiple of 4"),
        (["--audio", SPEECH, "--num_clip", "0"], "--num-clip must be at least 1"),
        (["--audio", SPEECH, "-o", "out.avi"], "must end in .mp4"),
        (["--script", "roles.yaml", "--image", "a.png"], "--script already names each role"),
        (["--image", str(default_portrait_path())], "missing --audio"),
        (["--audio", SPEECH, "--backend", "liveavatar"], "the liveavatar backend needs --ckpt-dir"),
        (["--audio", SPEECH, "--image", "face.gif"], "must be a JPG, PNG or WebP"),
        (["--script", "nowhere.yaml"], "script not found"),
    ],
)
def test_bad_inputs_stop_with_one_line_and_a_non_zero_exit(
    extra: list[str], message: str, capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "face.gif").write_bytes(b"GIF89a")
    backend = [] if "--backend" in extra else ["--backend", "preview"]
    assert cli(*backend, *extra) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not list(tmp_path.glob("*.mp4"))


def test_unreadable_files_are_reported_not_raised(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fake_png = tmp_path / "face.png"
    fake_png.write_text("not an image")
    fake_wav = tmp_path / "voice.wav"
    fake_wav.write_text("not audio either")
    assert cli("--backend", "preview", "--audio", SPEECH, "--image", str(fake_png), "-o", str(tmp_path / "o.mp4")) == 2
    assert "cannot read image" in capsys.readouterr().err
    assert cli("--backend", "preview", "--audio", str(fake_wav), "-o", str(tmp_path / "o.mp4")) == 2
    err = capsys.readouterr().err
    assert "voice.wav" in err and len(err.strip().splitlines()) == 1


def test_small_image_and_faceless_image_warn(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    small = tmp_path / "small.png"
    cv2.imwrite(str(small), cv2.resize(cv2.imread(str(default_portrait_path())), (256, 256)))
    blank = tmp_path / "wall.png"
    cv2.imwrite(str(blank), np.full((600, 600, 3), 128, np.uint8))
    with caplog.at_level(logging.WARNING):
        load_portrait(small, Size(256, 256))
        assert "below 512x512" in caplog.text and "no face" not in caplog.text
        load_portrait(blank, Size(256, 256))
        assert "no face found" in caplog.text


def test_several_faces_warn_and_the_largest_is_centred(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    face = cv2.imread(str(default_portrait_path()))
    group = np.full((640, 1400, 3), 200, np.uint8)
    group[60:572, 300:812] = face
    group[160:544, 960:1344] = cv2.resize(face, (384, 384))
    path = tmp_path / "group.jpg"
    cv2.imwrite(str(path), group)
    with caplog.at_level(logging.WARNING):
        fitted, _ = load_portrait(path, Size(512, 512))
    assert "faces found" in caplog.text and "largest one will be animated" in caplog.text
    assert fitted.shape == (512, 512, 3)
    faces = detect_faces(fitted)
    cx, _ = faces[0].centre
    assert abs(cx - 256) < 40  # the larger face sits in the middle of the crop


def test_low_rate_and_quiet_audio_warn(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    speech = decode_audio(SPEECH, rate=8_000).samples
    narrow = write_wav(tmp_path / "phone.wav", speech, 8_000)
    quiet = write_wav(tmp_path / "quiet.wav", decode_audio(SPEECH).samples * 0.01, 16_000)
    with caplog.at_level(logging.WARNING):
        samples = load_speech(narrow)
        assert "8000 Hz, below 16 kHz" in caplog.text
        assert abs(len(samples) / 16_000 - len(speech) / 8_000) < 0.05
        load_speech(quiet)
        assert "very quiet" in caplog.text


def test_trim_silence_cuts_only_the_leading_silence(tmp_path: Path) -> None:
    speech = decode_audio(SPEECH).samples
    padded = write_wav(tmp_path / "late.wav", np.concatenate([np.zeros(16_000 * 2, np.float32), speech]), 16_000)
    kept = load_speech(padded, trim_silence=False)
    trimmed = load_speech(padded, trim_silence=True)
    assert len(kept) == len(speech) + 32_000
    cut = (len(kept) - len(trimmed)) / 16_000
    assert 1.6 < cut <= 2.0


@pytest.mark.parametrize(
    ("prompt", "message"),
    [("", "prompt is empty"), ("a woman", "very short"), ("word " * 230, "over ~200")],
)
def test_prompt_warnings(prompt: str, message: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        check_prompt(prompt)
    assert message in caplog.text


def test_a_good_prompt_raises_no_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        check_prompt("A smiling astronaut in an orange suit talks warmly in front of a flag.")
    assert not caplog.records


def test_portrait_is_fitted_to_the_target_size() -> None:
    fitted, _ = load_portrait(default_portrait_path(), Size(704, 384))
    assert fitted.shape == (384, 704, 3)
    assert load_image(default_portrait_path()).shape == (512, 512, 3)

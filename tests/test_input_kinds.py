"""Inputs by kind: text files as spreadsheets and editors save them, portraits in every mode Pillow opens,
problems reported all at once before a run, output errors as one line, one minimum portrait size."""

from __future__ import annotations

import argparse
import errno
import io
import logging
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from liveavatar.media_io import (
    MIN_PORTRAIT_SIDE,
    TRANSPARENT_BACKGROUND,
    decode_image,
    default_portrait_path,
    load_image,
)
from liveavatar.offline import batch, generate, render
from liveavatar.offline.script import load_script
from server.portrait import decode_portrait
from server.protocol import ProtocolError

ASSETS = Path(__file__).parent / "assets"
SPEECH = ASSETS / "speech_en_16k_b.wav"
WHITE = np.array(TRANSPARENT_BACKGROUND, np.uint8)


def generate_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    generate.add_arguments(parser)
    return generate.run(parser.parse_args(list(argv)))


def batch_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    batch.add_arguments(parser)
    return batch.run(parser.parse_args(list(argv)))


def as_saved(text: str, bom: bool, newline: str) -> bytes:
    return (b"\xef\xbb\xbf" if bom else b"") + text.replace("\n", newline).encode("utf-8")


# ---- text files: byte-order mark and line endings -----------------------------------------------------

TEXT_SAVES = [(bom, nl) for bom in (False, True) for nl in ("\n", "\r\n", "\r")]


@pytest.mark.parametrize(("bom", "newline"), TEXT_SAVES)
def test_csv_manifest_reads_the_same_with_any_bom_and_line_ending(tmp_path: Path, bom: bool, newline: str) -> None:
    text = "image,audio,prompt\nme.png,a.wav,Ünïcode prompt – “quoted”\nme.png,b.wav,second\n"
    (tmp_path / "jobs.csv").write_bytes(as_saved(text, bom, newline))
    jobs = batch.load_jobs(tmp_path / "jobs.csv")
    assert [(Path(j["image"]).name, Path(j["audio"]).name, j["prompt"]) for j in jobs] == [
        ("me.png", "a.wav", "Ünïcode prompt – “quoted”"),
        ("me.png", "b.wav", "second"),
    ]


@pytest.mark.parametrize(("bom", "newline"), TEXT_SAVES)
def test_yaml_manifest_and_script_read_the_same_with_any_bom_and_line_ending(
    tmp_path: Path, bom: bool, newline: str
) -> None:
    (tmp_path / "jobs.yaml").write_bytes(
        as_saved("defaults: {prompt: Hé}\njobs:\n  - {image: me.png, audio: a.wav}\n", bom, newline)
    )
    (job,) = batch.load_jobs(tmp_path / "jobs.yaml")
    assert Path(job["image"]).name == "me.png" and job["prompt"] == "Hé"
    script = "segments:\n  - image: me.png\n    audio: a.wav\n    prompt: Grüße\n"
    (tmp_path / "roles.yaml").write_bytes(as_saved(script, bom, newline))
    (segment,) = load_script(tmp_path / "roles.yaml", check_files=False)
    assert segment.image.name == "me.png" and segment.prompt == "Grüße"


def test_a_manifest_that_is_not_utf8_is_one_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "jobs.csv").write_bytes("image,audio,prompt\nme.png,a.wav,caf\xe9\n".encode("latin-1"))
    assert batch_cli(str(tmp_path / "jobs.csv"), "--backend", "preview", "-o", str(tmp_path / "out")) == 2
    assert "is not UTF-8 text" in capsys.readouterr().err


# ---- every problem at once, before any job -----------------------------------------------------------


def test_batch_reports_every_problem_before_any_job_starts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    image = default_portrait_path()
    (tmp_path / "jobs.csv").write_text(
        "name,image,audio,prompt,size,output,seed,imgae,audio\u200b\n"
        f"good,{image},{SPEECH},A woman talks.,,,,,\n"
        f"gone,{image},{tmp_path / 'missing.wav'},Nobody.,,,,,\n"
        f"small,{image},{SPEECH},Too small.,100*100,,,,\n"
        f"twin1,{image},{SPEECH},Same output.,,same.mp4,x1,,\n"
        f"twin2,{image},{SPEECH},Same output.,,same.mp4,,,\n",
        encoding="utf-8",
    )
    out = tmp_path / "out"
    assert batch_cli(str(tmp_path / "jobs.csv"), "--backend", "preview", "-o", str(out)) == 2
    err = capsys.readouterr().err
    for expected in (
        "unknown column 'imgae' (did you mean 'image'?)",
        "unknown column 'audio\\u200b' (did you mean 'audio'?)",  # repr shows what the eye cannot
        "job 2 (gone): audio not found:",
        "job 3 (small): --size 100*100: width 100 must be a multiple of 16",
        "job 4 (twin1): seed must be a whole number, got 'x1'",
        f"job 4 (twin1) and job 5 (twin2) both write {(out / 'same.mp4').resolve()}",
    ):
        assert expected in err, f"{expected!r} missing from:\n{err}"
    assert err.startswith("liveavatar batch: error: 6 problems in") and "nothing was run" in err
    assert not out.exists(), "no job ran, nothing was written"


def test_generate_lists_every_problem_of_a_script(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "roles.yaml").write_text(
        "segments:\n"
        f"  - {{image: {default_portrait_path()}, audio: nowhere.wav, promt: Hello there everyone.}}\n"
        f"  - {{image: {default_portrait_path()}, transition: -2}}\n"
    )
    out = tmp_path / "roles.mp4"
    assert generate_cli("--backend", "preview", "--script", str(tmp_path / "roles.yaml"), "-o", str(out)) == 2
    err = capsys.readouterr().err
    for expected in (
        "segment 1: unknown key 'promt' (did you mean 'prompt'?)",
        "segment 1: audio not found",
        "segment 2 has no audio",
        "segment 2: transition must be >= 0",
    ):
        assert expected in err
    assert not out.exists()


# ---- portraits: the pixels a viewer sees --------------------------------------------------------------


def encoded(img: Image.Image, fmt: str, **options: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **options)
    return buf.getvalue()


def half_transparent_rgba() -> tuple[Image.Image, np.ndarray]:
    """Left half opaque red, right half fully transparent over green, a middle column half transparent."""
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[:, :32] = (200, 30, 30, 255)
    rgba[:, 32:] = (0, 255, 0, 0)
    rgba[:, 31] = (200, 30, 30, 128)
    want = np.empty((64, 64, 3), np.uint8)
    want[:, :32] = (200, 30, 30)
    want[:, 32:] = WHITE
    want[:, 31] = np.rint(np.array([200, 30, 30]) * 128 / 255 + WHITE * (127 / 255))
    return Image.fromarray(rgba), want


def palette_with_transparency() -> tuple[bytes, np.ndarray]:
    img = Image.new("P", (64, 64), 0)
    img.putpalette([0, 0, 0, 40, 90, 200] + [0] * 762)
    img.paste(1, (0, 0, 32, 64))
    want = np.empty((64, 64, 3), np.uint8)
    want[:, :32] = (40, 90, 200)
    want[:, 32:] = WHITE
    return encoded(img, "PNG", transparency=0), want


def sixteen_bit_gray() -> tuple[bytes, np.ndarray]:
    ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (64, 1))
    want = np.repeat(np.rint(ramp / 257).astype(np.uint8)[..., None], 3, axis=2)
    return encoded(Image.fromarray(ramp), "PNG"), want


def sixteen_bit_rgb() -> tuple[bytes, np.ndarray]:
    import cv2

    rgb16 = np.zeros((64, 64, 3), np.uint16)
    rgb16[..., 0], rgb16[..., 1], rgb16[..., 2] = 60000, 30000, 1000
    ok, png = cv2.imencode(".png", rgb16[..., ::-1])
    assert ok
    return png.tobytes(), np.broadcast_to(np.array([234, 117, 4], np.uint8), (64, 64, 3))


def cmyk_jpeg() -> tuple[bytes, np.ndarray]:
    rgb = np.zeros((64, 64, 3), np.uint8)
    rgb[:, :32] = (220, 40, 40)
    rgb[:, 32:] = (30, 160, 60)
    return encoded(Image.fromarray(rgb).convert("CMYK"), "JPEG", quality=95), rgb


def exif_rotated_jpeg() -> tuple[bytes, np.ndarray]:
    """Stored 80 wide x 40 high with a red top-left corner, tagged "rotate 90° clockwise to view"."""
    stored = np.full((40, 80, 3), 120, np.uint8)
    stored[:20, :20] = (230, 20, 20)
    exif = Image.Exif()
    exif[0x0112] = 6
    want = np.ascontiguousarray(np.rot90(stored, k=-1))  # viewed: 40 wide x 80 high, red at the top right
    return encoded(Image.fromarray(stored), "JPEG", quality=95, exif=exif.tobytes()), want


def portrait_kinds() -> dict[str, tuple[bytes, np.ndarray, bool]]:
    """kind -> (file bytes, the pixels a viewer sees, whether it has transparency)."""
    rgba, rgba_want = half_transparent_rgba()
    la = Image.fromarray(
        np.dstack(
            [np.full((64, 64), 90, np.uint8), np.tile(np.r_[np.full(32, 255), np.zeros(32)], (64, 1)).astype(np.uint8)]
        )
    )
    la_want = np.broadcast_to(np.where(np.arange(64)[None, :, None] < 32, np.uint8(90), WHITE), (64, 64, 3)).astype(
        np.uint8
    )
    return {
        "png_rgba": (encoded(rgba, "PNG"), rgba_want, True),
        "webp_rgba": (encoded(rgba, "WEBP", lossless=True), rgba_want, True),
        "png_gray_alpha": (encoded(la, "PNG"), la_want, True),
        "png_palette_transparency": (*palette_with_transparency(), True),
        "png_16bit_gray": (*sixteen_bit_gray(), False),
        "png_16bit_rgb": (*sixteen_bit_rgb(), False),
        "jpeg_cmyk": (*cmyk_jpeg(), False),
        "jpeg_exif_rotated": (*exif_rotated_jpeg(), False),
    }


KINDS = portrait_kinds()


@pytest.mark.parametrize("kind", list(KINDS))
def test_portrait_modes_give_the_visible_pixels(kind: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data, want, transparent = KINDS[kind]
    path = tmp_path / f"portrait.{'jpg' if kind.startswith('jpeg') else kind.split('_')[0]}"
    path.write_bytes(data)
    with caplog.at_level(logging.WARNING):
        got = load_image(path)
    assert got.shape == want.shape and got.dtype == np.uint8
    diff = np.abs(got.astype(int) - want.astype(int))
    assert diff.mean() < 3 if kind.startswith("jpeg") else diff.max() <= 1  # JPEG rings at edges
    assert ("transparent areas" in caplog.text) == transparent
    if transparent:
        assert "white" in caplog.text
    upload = decode_portrait(data, max_bytes=1 << 20, max_pixels=1 << 20) if kind != "png_gray_alpha" else got
    assert np.array_equal(upload, got), "the server decodes uploads the same way"


# ---- output errors -----------------------------------------------------------------------------------


def failing_writer(err: int, when: str) -> type:
    """An Mp4Writer stand-in that writes a partial file, then fails as the disk or folder would."""

    class Writer(render.Mp4Writer):
        def __init__(self, path: Path, *args: object, **kwargs: object) -> None:
            if when == "open":
                raise OSError(err, os.strerror(err), str(path))
            super().__init__(path, *args, **kwargs)

        def write_frames(self, frames: np.ndarray) -> None:
            super().write_frames(frames)
            if self.frames_written > 12:
                raise OSError(err, os.strerror(err))

    return Writer


@pytest.mark.parametrize(
    ("err", "when"), [(errno.ENOSPC, "write"), (errno.EACCES, "open"), (errno.EROFS, "open"), (errno.EDQUOT, "write")]
)
def test_output_errors_are_one_line_exit_2_and_leave_no_file(
    err: int, when: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(render, "Mp4Writer", failing_writer(err, when))
    out = tmp_path / "talk.mp4"
    assert generate_cli("--backend", "preview", "--audio", str(SPEECH), "--size", "128*128", "-o", str(out)) == 2
    err_text = capsys.readouterr().err.strip()
    assert err_text == f"liveavatar generate: error: cannot write {out}: {os.strerror(err)}"
    assert list(tmp_path.iterdir()) == []


def test_output_under_a_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "taken").write_text("a file, not a folder")
    out = tmp_path / "taken" / "talk.mp4"
    assert generate_cli("--backend", "preview", "--audio", str(SPEECH), "--size", "128*128", "-o", str(out)) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"liveavatar generate: error: cannot write {out}: File exists"
    ]
    assert not out.exists()


# ---- one minimum portrait size -----------------------------------------------------------------------


@pytest.mark.parametrize(("width", "height"), [(1, 1), (MIN_PORTRAIT_SIDE - 1, 200)])
def test_tiny_portraits_are_refused_offline_as_by_the_server(
    width: int, height: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = encoded(Image.new("RGB", (width, height), (128, 100, 90)), "PNG")
    (tmp_path / "tiny.png").write_bytes(data)
    assert (
        generate_cli(
            "--backend",
            "preview",
            "--image",
            str(tmp_path / "tiny.png"),
            "--audio",
            str(SPEECH),
            "-o",
            str(tmp_path / "o.mp4"),
        )
        == 2
    )
    assert f"at least {MIN_PORTRAIT_SIDE} px a side" in capsys.readouterr().err
    with pytest.raises(ProtocolError, match=f"at least {MIN_PORTRAIT_SIDE} px a side"):
        decode_portrait(data, max_bytes=1 << 20, max_pixels=1 << 20)
    edge = encoded(Image.new("RGB", (MIN_PORTRAIT_SIDE, MIN_PORTRAIT_SIDE)), "PNG")
    assert decode_portrait(edge, max_bytes=1 << 20, max_pixels=1 << 20).shape == (32, 32, 3)
    assert decode_image(edge).shape == (32, 32, 3)


# ---- prompt advice only where the prompt is used ------------------------------------------------------


@pytest.mark.parametrize(("backend", "warned"), [("preview", False), ("liveavatar", True)])
def test_prompt_advice_only_for_backends_that_use_the_prompt(
    backend: str, warned: bool, caplog: pytest.LogCaptureFixture
) -> None:
    parser = argparse.ArgumentParser()
    generate.add_arguments(parser)
    args = parser.parse_args(
        [
            "--backend",
            backend,
            "--random_weights",
            "tiny",
            "--audio",
            str(SPEECH),
            "--prompt",
            "a friendly tutor",
            "--size",
            "256*256",
        ]
    )
    with caplog.at_level(logging.WARNING):
        generate.build_segments(args, generate.resolve_settings(args))
    assert ("prompt is very short" in caplog.text) == warned

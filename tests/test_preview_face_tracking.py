"""The preview animates the face chosen on the whole portrait, at every output size, in every path.

The face is found once on the whole portrait and carried through the crop to the output size; it is
never looked for again on the crop (where a detector can take a collar or a shuttle for a face). Each
case renders a block of speech and checks, frame by frame, that what moves lies on the chosen face.
The face's place in the output is worked out here independently of the code under test: the portrait
is scaled to cover the output (the documented rule) and the crop is found by matching the poster
against the scaled portrait.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np
import pytest

from liveavatar.backends.preview.face import detect_faces, fallback_face
from liveavatar.backends.preview.generator import PreviewGenerator
from liveavatar.generator import AudioWindow, AvatarSpec, Size
from liveavatar.media_io import decode_audio, default_portrait_path, load_image
from liveavatar.offline import generate

ASSETS = Path(__file__).parent / "assets"
SIZES = ["704*384", "688*368", "384*256", "512*512", "1280*720", "384*640", "256*256"]
Box = tuple[float, float, float, float]

BUNDLED = load_image(default_portrait_path())
_FACE = detect_faces(BUNDLED)[0]
HEAD = BUNDLED[
    int(_FACE.y - 0.4 * _FACE.h) : int(_FACE.y + 1.5 * _FACE.h),
    int(_FACE.x - 0.35 * _FACE.w) : int(_FACE.x + 1.35 * _FACE.w),
]
"""The bundled portrait's head (hair to neck), pasted into canvases to make portraits of our own."""


def paste_heads(height: int, width: int, heads: list[tuple[int, int, int]]) -> tuple[np.ndarray, list[Box]]:
    """A grey-gradient canvas with the bundled head pasted at (x, y) scaled to `side` px tall; returns
    the picture and each pasted face's box (the bundled face box carried by the same paste)."""
    ramp = np.linspace(140, 200, width, dtype=np.float32)[None, :, None]
    canvas = np.broadcast_to(ramp, (height, width, 3)).astype(np.uint8).copy()
    boxes = []
    for x, y, side in heads:
        s = side / HEAD.shape[0]
        head = cv2.resize(
            HEAD, (round(HEAD.shape[1] * s), side), interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_CUBIC
        )
        canvas[y : y + head.shape[0], x : x + head.shape[1]] = head
        boxes.append((x + 0.35 * _FACE.w * s, y + 0.4 * _FACE.h * s, _FACE.w * s, _FACE.h * s))
    return canvas, boxes


def no_face(height: int = 480, width: int = 640) -> np.ndarray:
    """Smooth coloured blobs: texture to move, nothing a face detector takes for a face."""
    rng = np.random.default_rng(3)
    small = rng.integers(60, 200, (6, 8, 3)).astype(np.uint8)
    return cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC)


def portraits() -> dict[str, tuple[np.ndarray, Box, list[Box]]]:
    """name -> (picture, the face that must move, faces that must stay still)."""
    off_centre, (off,) = paste_heads(600, 1000, [(700, 80, 320)])
    two, (big, little) = paste_heads(640, 1200, [(80, 100, 400), (800, 250, 200)])
    small, (tiny,) = paste_heads(1500, 2000, [(1200, 300, 220)])
    blank = no_face()
    f = _FACE
    return {
        "bundled": (BUNDLED, (f.x, f.y, f.w, f.h), []),
        "off_centre": (off_centre, off, []),
        "two_faces": (two, big, [little]),
        "small_face": (small, tiny, []),
        "no_face": (blank, tuple(vars(fallback_face(*blank.shape[:2])).values()), []),
    }


PORTRAITS = portraits()


def speech_windows(gen: PreviewGenerator, blocks: int) -> list[AudioWindow]:
    samples = decode_audio(ASSETS / "speech_en_16k.wav").samples
    n = gen.audio_samples_per_block
    start = 8000  # past the lead-in silence
    return [AudioWindow(samples[start + i * n : start + (i + 1) * n], speech=True, index=i) for i in range(blocks)]


def crop_offset(picture: np.ndarray, poster: np.ndarray) -> tuple[float, int, int]:
    """Scale of the cover fit and where the output's crop sits in the scaled picture (by matching)."""
    h, w = picture.shape[:2]
    out_h, out_w = poster.shape[:2]
    s = max(out_w / w, out_h / h)
    scaled = cv2.resize(
        picture, (round(w * s), round(h * s)), interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_CUBIC
    )
    score = cv2.matchTemplate(scaled, poster, cv2.TM_SQDIFF_NORMED)
    _, _, (left, top), _ = cv2.minMaxLoc(score)
    return s, left, top


def to_output(box: Box, s: float, left: int, top: int) -> Box:
    x, y, w, h = box
    return x * s - left, y * s - top, w * s, h * s


def assert_motion_on_face(frames: np.ndarray, poster: np.ndarray, face: Box, still: list[Box], label: str) -> None:
    """Every frame's changed pixels centre on `face` and stay around its head; `still` faces never move."""
    x, y, w, h = face
    moved_frames = 0
    for i, frame in enumerate(frames):
        changed = np.abs(frame.astype(np.int16) - poster.astype(np.int16)).max(axis=2) > 16
        ys, xs = np.nonzero(changed)
        for sx, sy, sw, sh in still:
            region = changed[max(0, int(sy)) : int(sy + sh), max(0, int(sx)) : int(sx + sw)]
            assert not region.any(), f"{label}: frame {i} moves the face that should stay still"
        if len(xs) < 20:
            continue
        moved_frames += 1
        cx, cy = xs.mean(), ys.mean()
        assert x - 0.25 * w <= cx <= x + 1.25 * w and y - 0.25 * h <= cy <= y + 1.4 * h, (
            f"{label}: frame {i} moves around ({cx:.0f}, {cy:.0f}), not the face at {face}"
        )
        near = (np.abs(xs - (x + w / 2)) <= 1.6 * w) & (ys >= y - 1.0 * h) & (ys <= y + 2.1 * h)
        assert near.mean() >= 0.9, f"{label}: frame {i} moves {1 - near.mean():.0%} of its changes away from the face"
    assert moved_frames >= len(frames) // 2, f"{label}: the face hardly moves while speaking"


def check_spec(spec: AvatarSpec, size: Size, picture: np.ndarray, face: Box, still: list[Box], label: str) -> None:
    gen = PreviewGenerator()
    state = gen.open(spec, size)
    poster = gen.poster(state)
    assert poster.shape == (size.height, size.width, 3)
    s, left, top = crop_offset(picture, poster)
    frames = np.concatenate([gen.step(state, window) for window in speech_windows(gen, 2)])
    assert_motion_on_face(
        frames, poster, to_output(face, s, left, top), [to_output(b, s, left, top) for b in still], label
    )


def offline_spec(tmp_path: Path, picture: np.ndarray, size: str) -> AvatarSpec:
    """The spec `liveavatar generate --backend preview --image ... --size ...` renders."""
    path = tmp_path / "portrait.png"
    cv2.imwrite(str(path), cv2.cvtColor(picture, cv2.COLOR_RGB2BGR))
    parser = argparse.ArgumentParser()
    generate.add_arguments(parser)
    args = parser.parse_args(
        ["--backend", "preview", "--image", str(path), "--audio", str(ASSETS / "speech_en_16k.wav"), "--size", size]
    )
    (segment,) = generate.build_segments(args, generate.resolve_settings(args))
    return segment.spec


@pytest.mark.parametrize("name", list(PORTRAITS))
@pytest.mark.parametrize("size", SIZES)
def test_offline_generate_animates_the_face_found_on_the_whole_portrait(tmp_path: Path, name: str, size: str) -> None:
    picture, face, still = PORTRAITS[name]
    check_spec(offline_spec(tmp_path, picture, size), Size.parse(size), picture, face, still, f"{name} at {size}")


@pytest.mark.parametrize("name", list(PORTRAITS))
@pytest.mark.parametrize("size", ["704*384", "512*512", "384*640"])
def test_live_session_animates_the_face_of_the_uploaded_portrait(name: str, size: str) -> None:
    picture, face, still = PORTRAITS[name]
    check_spec(AvatarSpec(picture), Size.parse(size), picture, face, still, f"live {name} at {size}")


def test_switch_moves_the_animation_to_the_new_portraits_face() -> None:
    size = Size(704, 384)
    picture, face, still = PORTRAITS["two_faces"]
    gen = PreviewGenerator()
    state = gen.open(AvatarSpec(BUNDLED), size)
    windows = speech_windows(gen, 3)
    gen.step(state, windows[0])
    gen.switch(state, AvatarSpec(picture))
    frames = np.concatenate([gen.step(state, w) for w in windows[1:]])
    poster = gen.poster(gen.open(AvatarSpec(picture), size))
    s, left, top = crop_offset(picture, poster)
    assert_motion_on_face(
        frames, poster, to_output(face, s, left, top), [to_output(b, s, left, top) for b in still], "switch"
    )


def test_multi_role_script_carries_each_roles_face(tmp_path: Path) -> None:
    cases = [PORTRAITS["bundled"], PORTRAITS["off_centre"], PORTRAITS["two_faces"]]
    lines = ["segments:"]
    for i, (picture, _, _) in enumerate(cases):
        cv2.imwrite(str(tmp_path / f"role{i}.png"), cv2.cvtColor(picture, cv2.COLOR_RGB2BGR))
        lines.append(f"  - {{image: role{i}.png, audio: {ASSETS / 'speech_en_16k.wav'}, prompt: Someone talks here.}}")
    (tmp_path / "roles.yaml").write_text("\n".join(lines) + "\n")
    parser = argparse.ArgumentParser()
    generate.add_arguments(parser)
    args = parser.parse_args(["--backend", "preview", "--script", str(tmp_path / "roles.yaml"), "--size", "704*384"])
    segments = generate.build_segments(args, generate.resolve_settings(args))
    for i, (segment, (picture, face, still)) in enumerate(zip(segments, cases, strict=True)):
        assert segment.spec.face is not None
        check_spec(segment.spec, Size(704, 384), picture, face, still, f"script role {i}")


def test_faces_are_found_on_several_threads_at_once() -> None:
    """The server opens sessions on several threads; a detector shared between them failed OpenCV
    assertions (`generation_failed` for a valid portrait) or crashed the process. The kind, not the
    case: the face detector and the eye detector of the landmark fit, side by side."""
    import threading

    from liveavatar.backends.preview.face import FaceBox
    from liveavatar.backends.preview.landmarks import fit_face_model

    failures: list[str] = []

    def detect_many(seed: int) -> None:
        rng = np.random.default_rng(seed)
        for _ in range(60):
            height, width = (int(v) for v in rng.integers(40, 400, 2))
            image = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
            try:
                detect_faces(image)
                fit_face_model(image, FaceBox(width * 0.1, height * 0.1, width * 0.8, height * 0.8))
            except cv2.error as exc:
                failures.append(str(exc))

    threads = [threading.Thread(target=detect_many, args=(seed,)) for seed in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures, failures[:1]

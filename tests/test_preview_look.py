"""The preview looks like the person talking: landmarks on the real mouth, the portrait's own colours,
no seam where the warp ends, and the CPU budget (25 fps at 512x512 on one core) kept with margin."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from liveavatar.backends.preview.generator import PreviewGenerator, build_rig
from liveavatar.backends.preview.rig import FacePose, FaceRig
from liveavatar.generator import AudioWindow, AvatarSpec, Size
from liveavatar.media_io import decode_audio, default_portrait_path, load_image

ASSETS = Path(__file__).parent / "assets"
PORTRAIT = load_image(default_portrait_path())
CLOSE_UP = np.ascontiguousarray(PORTRAIT[40:220, 150:330])  # the face fills a 512 frame: the most pixels to warp
POSES = [
    FacePose(jaw=0.5),
    FacePose(jaw=1.0),
    FacePose(jaw=1.0, width=1.0),
    FacePose(jaw=0.8, width=-1.0),
    FacePose(blink=1.0),
]


def rig_for(image: np.ndarray) -> FaceRig:
    return build_rig(AvatarSpec(image), Size(512, 512))


def render(rig: FaceRig, pose: FacePose) -> np.ndarray:
    out = np.empty_like(rig.image)
    rig.render(pose, out)
    return out


def edge_strength(image: np.ndarray) -> np.ndarray:
    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float32)
    return np.hypot(cv2.Sobel(gray, cv2.CV_32F, 1, 0, ksize=3), cv2.Sobel(gray, cv2.CV_32F, 0, 1, ksize=3))


def boundary(changed: np.ndarray, width: int = 3) -> np.ndarray:
    """The band just inside and outside the outline of the region the warp changed."""
    region = cv2.morphologyEx(changed.astype(np.uint8), cv2.MORPH_CLOSE, np.ones((5, 5), np.uint8))
    kernel = np.ones((2 * width + 1,) * 2, np.uint8)
    return (cv2.dilate(region, kernel) - cv2.erode(region, kernel)).astype(bool)


def test_mouth_is_found_on_the_lips_and_its_colours_come_from_the_portrait() -> None:
    rig = rig_for(PORTRAIT)
    face, m = rig.face, rig.model.mouth
    assert face.x + 0.35 * face.w < m.x < face.x + 0.65 * face.w
    assert face.y + 0.75 * face.h < m.y < face.y + 0.95 * face.h
    assert 0.15 * face.w < m.half_width < 0.35 * face.w
    lips = rig.image[
        int(m.y - m.upper) : int(m.y + m.lower), int(m.x - 0.6 * m.half_width) : int(m.x + 0.6 * m.half_width)
    ]
    assert m.lip[0] > m.lip[1] and m.lip[0] > m.lip[2]  # lips are red
    assert m.shows_teeth and m.teeth.mean() > lips.reshape(-1, 3).mean() + 20  # she smiles with her teeth
    assert m.lift > 0  # a smile curves the parting line up at the corners


def test_open_mouth_interior_is_shaded_from_the_lip_colour() -> None:
    rig = rig_for(PORTRAIT)
    m = rig.model.mouth
    opened = render(rig, FacePose(jaw=1.0))
    gap = opened[
        int(m.y + 0.3 * rig.max_open) : int(m.y + 0.7 * rig.max_open),
        int(m.x - 0.3 * m.half_width) : int(m.x + 0.3 * m.half_width),
    ]
    colour = gap.reshape(-1, 3).mean(axis=0)
    assert colour.mean() < 0.6 * m.lip.mean()  # darker than the lips: inside a mouth
    assert colour[0] > colour[1] and colour[0] > colour[2]  # the lip's own red, not a grey cut-out


def seam_excess(rig: FaceRig, pose: FacePose) -> float:
    """How much stronger than the portrait's own the frame's edges are along the outline of what moved."""
    frame = render(rig, pose)
    changed = np.abs(frame.astype(np.int16) - rig.image).max(axis=2) > 2
    assert changed.sum() > 30, "the pose moves nothing"
    band = boundary(changed)
    # Edges the warp makes on purpose, in the portrait's colours: the lips' inner edges and a lid's margin.
    x0, y0, x1, y1 = rig.mouth_box()
    band[y0:y1, x0:x1] = False
    for e in rig.eyes:
        band[int(e.y - 1.5 * e.ry) : int(e.y + 1.5 * e.ry) + 1, int(e.x - 1.3 * e.rx) : int(e.x + 1.3 * e.rx) + 1] = (
            False
        )
    # The portrait's own edge at the pixel each output pixel shows: a warp that is continuous moves and
    # stretches edges, and dropping the jaw squeezes the neck by up to a third (sharpening it that much);
    # a seam is an edge where the portrait has none.
    map_x, map_y = rig.backward_map(pose)
    own = cv2.remap(edge_strength(rig.image), map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    own = cv2.dilate(own, np.ones((3, 3), np.uint8))
    return float((edge_strength(frame)[band] - 1.35 * own[band]).max())


@pytest.mark.parametrize("name", ["portrait", "close_up"])
@pytest.mark.parametrize("pose", POSES, ids=["half", "open", "wide", "round", "blink"])
def test_warp_leaves_no_edge_stronger_than_the_portraits_own_at_its_boundary(name: str, pose: FacePose) -> None:
    rig = rig_for(PORTRAIT if name == "portrait" else CLOSE_UP)
    excess = seam_excess(rig, pose)
    assert excess <= 24.0, f"an edge {excess:.0f} stronger than the portrait's own at the warp's boundary"
    # Outside the windows the rig warps, the picture is untouched.
    changed = np.abs(render(rig, pose).astype(np.int16) - rig.image).max(axis=2) > 2
    outside = np.ones(changed.shape, bool)
    x0, y0, x1, y1 = rig.warped_box()
    outside[y0:y1, x0:x1] = False
    oy, ox = rig.roi[0].start, rig.roi[1].start
    for ys, xs in rig.eye_wins:
        outside[ys.start + oy : ys.stop + oy, xs.start + ox : xs.stop + ox] = False
    assert not changed[outside].any()


def test_the_seam_check_catches_a_warp_cut_off_at_its_window() -> None:
    rig = rig_for(PORTRAIT)
    ys, xs = rig.mouth_win
    rig.mouth_win = (slice(ys.start, (ys.start + ys.stop) // 2), xs)  # the jaw's drop ends abruptly mid-chin
    assert seam_excess(rig, FacePose(jaw=1.0)) > 100


@pytest.mark.parametrize("name", ["portrait", "close_up"])
def test_renders_at_least_25_fps_per_core_at_512_with_margin(name: str) -> None:
    previous = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        gen = PreviewGenerator()
        state = gen.open(AvatarSpec(PORTRAIT if name == "portrait" else CLOSE_UP), Size(512, 512))
        samples = decode_audio(ASSETS / "speech_en_16k.wav").samples
        n = gen.audio_samples_per_block
        windows = [AudioWindow(samples[i * n : (i + 1) * n], speech=True, index=i) for i in range(8)]
        gen.step(state, windows[0])
        start = time.thread_time()  # CPU seconds of this thread: a ratio, fair on a shared machine
        for window in windows:
            gen.step(state, window)
        fps = gen.frames_per_block * len(windows) / (time.thread_time() - start)
    finally:
        cv2.setNumThreads(previous)
    logging.getLogger(__name__).info("preview (%s) renders %.0f fps per CPU-second at 512x512", name, fps)
    assert fps >= 50, fps  # twice the 25 fps a session needs, on one core

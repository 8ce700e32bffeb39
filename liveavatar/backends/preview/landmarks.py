"""A geometric face model fitted to the detected face box, refined on the portrait's own pixels.

No landmark network ships inside an installable wheel we could use (mediapipe's wheel carries no face
model and pulls in opencv-contrib, matplotlib and sounddevice; dlib and face-alignment download theirs),
so the preview places its landmarks from the usual proportions of an OpenCV frontal-face box and then
looks at the lower face to find the real mouth: lips are redder than the skin around them (Lab a*), and
the parting line is the teeth or the dark line between the lips. The colours the animation needs (lips,
teeth, lashes) are read from the same pixels, so an opened mouth and a closed lid are the portrait's own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import cv2
import numpy as np

from liveavatar.backends.preview.face import FaceBox, cascade

# Where features sit inside an OpenCV frontal-face box, as fractions of its side (measured on portraits:
# the Haar box spans from the brows to just below the lips).
EYE_Y, EYE_DX, EYE_RX, EYE_RY = 0.37, 0.21, 0.085, 0.04
NOSE_Y, MOUTH_Y, MOUTH_RX, CHIN_Y = 0.62, 0.82, 0.22, 1.18
LIP_THICKNESS = 0.05


class Eye(NamedTuple):
    x: float
    y: float
    rx: float
    ry: float


@dataclass(frozen=True, eq=False)
class Mouth:
    """The lips: centre of the parting line, half-width to a corner, lip thicknesses, colours (RGB)."""

    x: float
    y: float
    half_width: float
    upper: float  # parting line to the top edge of the upper lip
    lower: float  # parting line to the bottom edge of the lower lip
    lip: np.ndarray
    teeth: np.ndarray
    shows_teeth: bool = False  # the portrait smiles with its teeth visible between the lips
    lift: float = 0.0  # how far the corners sit above the parting line's centre (a smile curves it)


@dataclass(frozen=True, eq=False)
class FaceModel:
    face: FaceBox
    mouth: Mouth
    eyes: tuple[Eye, Eye]
    nose_y: float
    chin_y: float
    lash: np.ndarray  # the darkest colour around the eyes: what a lid's edge shows


def fit_face_model(image: np.ndarray, face: FaceBox) -> FaceModel:
    """Landmarks and colours for the face at `face` in an RGB portrait."""
    eyes = _eyes(image, face)
    return FaceModel(
        face=face,
        mouth=_mouth(image, face),
        eyes=eyes,
        nose_y=face.y + NOSE_Y * face.h,
        chin_y=face.y + CHIN_Y * face.h,
        lash=_lash_colour(image, eyes),
    )


def _clip_box(image: np.ndarray, x0: float, y0: float, x1: float, y1: float) -> tuple[int, int, int, int]:
    h, w = image.shape[:2]
    return int(np.clip(x0, 0, w)), int(np.clip(y0, 0, h)), int(np.clip(x1, 0, w)), int(np.clip(y1, 0, h))


def _prior_mouth(image: np.ndarray, face: FaceBox) -> Mouth:
    f = face.w
    x, y = face.x + f / 2, face.y + MOUTH_Y * face.h
    lip = _median_colour(image, _clip_box(image, x - 0.1 * f, y - 0.05 * f, x + 0.1 * f, y + 0.05 * f))
    return Mouth(x, y, MOUTH_RX * f, LIP_THICKNESS * f, 1.3 * LIP_THICKNESS * f, lip, _teeth_from_lip(lip))


def _mouth(image: np.ndarray, face: FaceBox) -> Mouth:
    """The lips found by redness in the lower face; the proportional guess when nothing plausible is."""
    prior = _prior_mouth(image, face)
    f = face.w
    x0, y0, x1, y1 = _clip_box(
        image, prior.x - 0.34 * f, face.y + 0.71 * face.h, prior.x + 0.34 * f, face.y + 1.0 * face.h
    )
    if x1 - x0 < 8 or y1 - y0 < 8:
        return prior
    lab = cv2.cvtColor(image[y0:y1, x0:x1], cv2.COLOR_RGB2LAB).astype(np.float32)
    redness = lab[..., 1] - np.median(lab[..., 1])
    lips = redness > max(5.0, 0.45 * float(np.percentile(redness, 99)))
    # Bridge the teeth or the dark gap between the lips so both lips make one blob.
    lips = cv2.morphologyEx(
        lips.astype(np.uint8), cv2.MORPH_OPEN, np.ones((max(2, int(0.02 * f)),) * 2, np.uint8)
    ).astype(bool)
    bridge = cv2.getStructuringElement(cv2.MORPH_RECT, (max(3, int(0.04 * f)), max(3, int(0.08 * f))))
    blob = cv2.morphologyEx(lips.astype(np.uint8), cv2.MORPH_CLOSE, bridge)
    count, labels, stats, centroids = cv2.connectedComponentsWithStats(blob)
    if count < 2:
        return prior
    dist = np.hypot(centroids[1:, 0] + x0 - prior.x, centroids[1:, 1] + y0 - prior.y)
    best = 1 + int(np.argmin(dist - 0.02 * stats[1:, cv2.CC_STAT_AREA] / max(f, 1.0)))
    bx, by, bw, bh = (int(v) for v in stats[best, :4])
    centre_x = x0 + bx + bw / 2
    if not (0.25 * f <= bw <= 0.8 * f and abs(centre_x - prior.x) <= 0.12 * f and bh <= 0.3 * f):
        return prior
    # Rows of the central columns: lip rows above and below, the gap (teeth or a dark line) between.
    cols = slice(bx + bw // 4, bx + bw - bw // 4)
    frac = lips[by : by + bh, cols].mean(axis=1)
    rows = np.nonzero(frac >= 0.5)[0]
    gap = [r for r in range(bh) if frac[r] < 0.35 and rows.size and rows[0] < r < rows[-1]]
    patch = image[y0 + by : y0 + by + bh, x0:x1][:, cols]
    if gap:
        parting = float(np.mean(gap))
        shown = patch[gap[0] : gap[-1] + 1].reshape(-1, 3).astype(np.float32)
        bright = shown[shown.mean(axis=1) > np.percentile(shown.mean(axis=1), 60)]
        teeth = np.median(bright, axis=0) if len(bright) >= 4 and bright.mean() > 120 else None
    else:
        luma = patch.astype(np.float32).mean(axis=(1, 2))
        lo, hi = bh // 4, max(bh // 4 + 1, bh - bh // 4)
        parting, teeth = float(lo + np.argmin(luma[lo:hi])), None
    lift = float(np.clip(_corner_lift(labels[by : by + bh, bx : bx + bw] == best), -0.03 * f, 0.08 * f))
    lip_pixels = image[y0:y1, x0:x1][lips & (labels == best)].astype(np.float32)
    lip = np.median(lip_pixels, axis=0) if len(lip_pixels) >= 4 else prior.lip
    return Mouth(
        x=centre_x,
        y=y0 + by + parting,
        half_width=bw / 2,
        upper=max(parting, 0.02 * f),
        lower=max(bh - parting, 0.03 * f),
        lip=lip.astype(np.float32),
        teeth=(teeth if teeth is not None else _teeth_from_lip(lip)).astype(np.float32),
        shows_teeth=teeth is not None,
        lift=lift,
    )


def _corner_lift(blob: np.ndarray) -> float:
    """Rise of the lips' mid-line from the centre to the corners, from a parabola through the mouth blob."""
    rows = np.arange(blob.shape[0], dtype=np.float32)[:, None]
    count = blob.sum(axis=0)
    used = count > 0
    if used.sum() < 5:
        return 0.0
    mid = (blob * rows).sum(axis=0)[used] / count[used]
    t = (np.nonzero(used)[0] - (blob.shape[1] - 1) / 2) / (blob.shape[1] / 2)
    slope = np.polyfit(t * t, mid, 1)[0]  # mid-row against t^2: negative when the corners sit higher
    return float(-slope)


def _teeth_from_lip(lip: np.ndarray) -> np.ndarray:
    """Teeth the portrait does not show: a warm off-white in the picture's own lighting (its lip tint)."""
    return (0.25 * lip + 0.75 * np.array([226, 218, 206], np.float32)).astype(np.float32)


def _median_colour(image: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    x0, y0, x1, y1 = box
    patch = image[y0:y1, x0:x1].reshape(-1, 3)
    return np.median(patch, axis=0).astype(np.float32) if len(patch) else np.array([170, 100, 100], np.float32)


def _lash_colour(image: np.ndarray, eyes: tuple[Eye, Eye]) -> np.ndarray:
    pixels = []
    for e in eyes:
        x0, y0, x1, y1 = _clip_box(image, e.x - e.rx, e.y - e.ry, e.x + e.rx + 1, e.y + e.ry + 1)
        pixels.append(image[y0:y1, x0:x1].reshape(-1, 3))
    both = np.concatenate(pixels).astype(np.float32)
    if not len(both):
        return np.array([50, 35, 30], np.float32)
    dark = both[both.sum(axis=1) <= np.percentile(both.sum(axis=1), 15)]
    return np.median(dark, axis=0).astype(np.float32)


def _eyes(image: np.ndarray, face: FaceBox) -> tuple[Eye, Eye]:
    """Eye centres and radii: the eye cascade in the upper face, else the usual proportions."""
    x0, y0, x1, y1 = _clip_box(image, face.x, face.y, face.x + face.w, face.y + 0.6 * face.h)
    found = []
    if x1 - x0 >= 8 and y1 - y0 >= 8:
        gray = cv2.cvtColor(np.ascontiguousarray(image[y0:y1, x0:x1]), cv2.COLOR_RGB2GRAY)
        side = max(8, int(face.w * 0.15))
        # one classifier per thread: a shared one fails OpenCV assertions when two sessions open at once
        found = cascade("haarcascade_eye.xml").detectMultiScale(gray, 1.1, 5, minSize=(side, side))
    rx, ry = EYE_RX * face.w, EYE_RY * face.w
    cx = face.x + face.w / 2
    boxes = sorted(found, key=lambda b: -b[2] * b[3])[:2] if len(found) >= 2 else []
    centres = sorted((x0 + bx + bw / 2, y0 + by + bh / 2) for bx, by, bw, bh in boxes)
    if len(centres) == 2 and centres[0][0] < cx < centres[1][0]:
        (lx, ly), (rx_, ry_) = centres
        return Eye(lx, ly, rx, ry), Eye(rx_, ry_, rx, ry)
    ey = face.y + EYE_Y * face.h
    return Eye(cx - EYE_DX * face.w, ey, rx, ry), Eye(cx + EYE_DX * face.w, ey, rx, ry)

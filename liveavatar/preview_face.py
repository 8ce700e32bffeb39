"""Face finding and the cheap image warp rig behind the preview avatar.

Everything per pixel is precomputed once per portrait (`FaceRig`); a frame is then a handful of array
multiply-adds on the head region, one `cv2.remap` and a small alpha blend for the mouth interior. The
motion model is a backward map (for every output pixel, where to read the portrait), built as:
head sway/nod (rotation about the neck, masked to the head) -> jaw drop and lip parting -> eyelids.
Mouth and eyelid fields are evaluated at the head-moved coordinates so the parts stay attached.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import cv2
import numpy as np

log = logging.getLogger(__name__)

# Where features sit inside an OpenCV frontal-face box, as fractions of its side (measured on portraits:
# the Haar box spans from the brows to just below the lips).
EYE_Y, EYE_DX, EYE_RX, EYE_RY = 0.37, 0.21, 0.085, 0.04
NOSE_Y, MOUTH_Y, MOUTH_RX, CHIN_Y = 0.62, 0.82, 0.22, 1.18


@dataclass(frozen=True)
class FaceBox:
    x: float
    y: float
    w: float
    h: float

    @property
    def centre(self) -> tuple[float, float]:
        return self.x + self.w / 2, self.y + self.h / 2

    def scaled(self, s: float, dx: float = 0.0, dy: float = 0.0) -> FaceBox:
        return FaceBox(self.x * s + dx, self.y * s + dy, self.w * s, self.h * s)


_per_thread = threading.local()


def _cascade(name: str) -> cv2.CascadeClassifier:
    """One classifier per thread: `detectMultiScale` keeps scratch state in the object, and two threads
    sharing one (two sessions opening at once on the server) failed OpenCV assertions or crashed."""
    cascades: dict[str, cv2.CascadeClassifier] = _per_thread.__dict__.setdefault("cascades", {})
    if name not in cascades:
        cascade = cv2.CascadeClassifier(cv2.data.haarcascades + name)
        if cascade.empty():
            raise RuntimeError(f"OpenCV cascade {name} is missing (opencv-python-headless < 5 ships it)")
        cascades[name] = cascade
    return cascades[name]


def detect_faces(image: np.ndarray) -> list[FaceBox]:
    """All frontal faces in an RGB image, largest first (detection on a <=1024 px copy for speed)."""
    scale = min(1.0, 1024 / max(image.shape[:2]))
    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    if scale < 1.0:
        gray = cv2.resize(gray, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    gray = cv2.equalizeHist(gray)
    side = min(gray.shape[:2])
    found = _cascade("haarcascade_frontalface_default.xml").detectMultiScale(
        gray, scaleFactor=1.1, minNeighbors=5, minSize=(max(24, side // 16),) * 2
    )
    boxes = [FaceBox(*(float(v) / scale for v in box)) for box in found]
    return sorted(boxes, key=lambda b: -b.w * b.h)


def fallback_face(height: int, width: int) -> FaceBox:
    """A centred, portrait-like face box for images where no face is found."""
    side = 0.36 * min(height, width)
    return FaceBox((width - side) / 2, 0.22 * height, side, side)


def find_face(image: np.ndarray, name: str = "portrait") -> FaceBox:
    """The largest face, or the centred fallback box (with a warning) when there is none."""
    faces = detect_faces(image)
    if not faces:
        log.warning("no face found in %s; animating a centred face area instead", name)
        return fallback_face(*image.shape[:2])
    if len(faces) > 1:
        log.info("%d faces found in %s; animating the largest", len(faces), name)
    return faces[0]


def fit_portrait(image: np.ndarray, face: FaceBox, width: int, height: int) -> tuple[np.ndarray, FaceBox]:
    """Scale to cover width*height and crop with the face as central as the image allows."""
    h, w = image.shape[:2]
    s = max(width / w, height / h)
    scaled = cv2.resize(image, (round(w * s), round(h * s)), interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_CUBIC)
    cx, cy = face.centre
    left = int(np.clip(round(cx * s - width / 2), 0, scaled.shape[1] - width))
    top = int(np.clip(round(cy * s - height / 2), 0, scaled.shape[0] - height))
    crop = np.ascontiguousarray(scaled[top : top + height, left : left + width])
    return crop, face.scaled(s, -left, -top)


def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3 - 2 * x)


@dataclass
class FacePose:
    """One frame's controls, all small: radians, pixels, and 0..1 amounts."""

    roll: float = 0.0
    shift_x: float = 0.0
    shift_y: float = 0.0
    nod: float = 0.0  # vertical squash of the head about the neck, fraction
    jaw: float = 0.0  # mouth opening, 0..1
    width: float = 0.0  # -1 rounded ("oo") .. +1 wide ("ee")
    blink: float = 0.0  # 0 open .. 1 closed


class FaceRig:
    """Precomputed warp fields for one portrait at one output size."""

    def __init__(self, image: np.ndarray, face: FaceBox) -> None:
        self.image = image
        self.face = face
        h, w = image.shape[:2]
        f = face.w
        cx, cy = face.centre
        self.pivot = (cx, face.y + 1.25 * face.h)
        self.mouth = (cx, face.y + MOUTH_Y * face.h)
        self.mouth_rx = MOUTH_RX * f
        self.max_open = 0.1 * f
        # Head region: an ellipse around the face, fading to zero well inside the region's border.
        ax, ay = 0.85 * f, 1.05 * f
        hx0, hx1 = int(max(0, cx - 1.45 * ax)), int(min(w, cx + 1.45 * ax))
        hy0, hy1 = int(max(0, cy - 1.45 * ay)), int(min(h, cy + 1.45 * ay))
        self.roi = (slice(hy0, hy1), slice(hx0, hx1))
        ys, xs = np.mgrid[hy0:hy1, hx0:hx1].astype(np.float32)
        self.grid_x, self.grid_y = xs, ys
        r = np.sqrt(((xs - cx) / ax) ** 2 + ((ys - cy) / ay) ** 2)
        self.head_mask = (1.0 - _smoothstep((r - 0.85) / 0.5)).astype(np.float32)
        self.rot_x = ((ys - self.pivot[1]) * self.head_mask).astype(np.float32)
        self.rot_y = (-(xs - self.pivot[0]) * self.head_mask).astype(np.float32)
        self.nod_y = ((ys - self.pivot[1]) * self.head_mask).astype(np.float32)
        # Mouth/jaw window inside the head region (indices relative to the ROI arrays).
        mx, my = self.mouth
        self.mouth_win = self._window(mx - 0.5 * f, mx + 0.5 * f, my - 0.3 * f, face.y + CHIN_Y * face.h + 0.45 * f)
        self.nose_y = face.y + NOSE_Y * face.h
        self.chin_y = face.y + CHIN_Y * face.h
        # Per eye: centre, radii and the colour of the skin just above it (what a closing lid shows).
        self.eyes: list[tuple[float, float, float, float, np.ndarray]] = []
        for ex, ey, rx, ry in _eyes(image, face):
            skin = _ring_colour(image, ex, ey, rx, ry) * 0.9  # a lid sits in the brow's shadow
            self.eyes.append((ex, ey, rx, ry, skin.astype(np.float32)))

    def mouth_box(self) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) around the lips and the jaw's travel, in output pixels."""
        mx, my = self.mouth
        pad = self.mouth_rx * 1.2
        return int(mx - pad), int(my - 0.6 * self.mouth_rx), int(mx + pad), int(my + self.max_open + 0.6 * self.mouth_rx)

    def _window(self, x0: float, x1: float, y0: float, y1: float) -> tuple[slice, slice]:
        ys, xs = self.roi
        ry0, rx0 = ys.start, xs.start
        return (
            slice(int(np.clip(y0 - ry0, 0, ys.stop - ry0)), int(np.clip(y1 - ry0, 0, ys.stop - ry0))),
            slice(int(np.clip(x0 - rx0, 0, xs.stop - rx0)), int(np.clip(x1 - rx0, 0, xs.stop - rx0))),
        )

    def render(self, pose: FacePose, out: np.ndarray) -> None:
        """Draw one frame into `out`, a uint8 array of the portrait's shape."""
        out[...] = self.image
        map_x = self.grid_x + pose.roll * self.rot_x + pose.shift_x * self.head_mask
        map_y = self.grid_y + pose.roll * self.rot_y + pose.shift_y * self.head_mask + pose.nod * self.nod_y
        inside = None
        if pose.jaw > 0.01 or abs(pose.width) > 0.01:
            inside = self._mouth(pose, map_x, map_y)
        roi = cv2.remap(self.image, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        if inside is not None:
            alpha, shade = inside
            part = roi[self.mouth_win].astype(np.float32)
            part += alpha[..., None] * (shade - part)
            roi[self.mouth_win] = part.astype(np.uint8)
        if pose.blink > 0.02:
            for eye in self.eyes:
                self._lid(roi, eye, pose.blink, map_x, map_y)
        out[self.roi] = roi

    def _lid(self, roi: np.ndarray, eye: tuple, closed: float, map_x: np.ndarray, map_y: np.ndarray) -> None:
        """Paint the upper lid down over the eye (a warp alone only squashes the iris, it never hides it)."""
        ex, ey, rx, ry, skin = eye
        oy, ox = self.roi[0].start, self.roi[1].start
        iy, ix = int(ey) - oy, int(ex) - ox
        if not (0 <= iy < roi.shape[0] and 0 <= ix < roi.shape[1]):
            return
        # Where the head motion carried the eye: the backward map at the eye points back by that much.
        cx = ex - (map_x[iy, ix] - self.grid_x[iy, ix])
        cy = ey - (map_y[iy, ix] - self.grid_y[iy, ix])
        x0, x1 = int(max(0, cx - 1.3 * rx - ox)), int(min(roi.shape[1], cx + 1.3 * rx - ox + 1))
        y0, y1 = int(max(0, cy - 1.6 * ry - oy)), int(min(roi.shape[0], cy + 1.6 * ry - oy + 1))
        ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        xs += ox - cx
        ys += oy - cy
        inside = 1.0 - np.sqrt((xs / (1.15 * rx)) ** 2 + (ys / (1.35 * ry)) ** 2)
        lid_edge = -1.35 * ry + 2.7 * ry * closed
        cover = np.clip(inside * 4.0, 0.0, 1.0) * np.clip(lid_edge - ys + 0.5, 0.0, 1.0)
        lash = np.clip(1.0 - np.abs(ys - lid_edge) / 1.5, 0.0, 1.0) * np.clip(inside * 3.0, 0.0, 1.0)
        part = roi[y0:y1, x0:x1].astype(np.float32)
        part += cover[..., None] * (skin - part)
        part += (0.55 * closed * lash)[..., None] * (np.array([40, 28, 24], np.float32) - part)
        roi[y0:y1, x0:x1] = part.astype(np.uint8)

    def _mouth(self, pose: FacePose, map_x: np.ndarray, map_y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Open the jaw and part the lips in place on the maps; return the interior's alpha and colour."""
        win = self.mouth_win
        qx, qy = map_x[win], map_y[win]
        mx, my = self.mouth
        rx = 0.8 * self.mouth_rx * (1.0 + 0.18 * pose.width)
        du = (qx - mx) / rx
        lips = np.clip(1.0 - du * du, 0.0, 1.0) ** 0.7  # lens-shaped lip opening per column
        jaw_w = np.clip(1.6 - np.abs((qx - mx) / (2.2 * self.mouth_rx)) * 1.6, 0.0, 1.0)
        jaw_w = np.maximum(jaw_w, lips)
        drop = pose.jaw * self.max_open
        o, j, u = drop * lips, drop * jaw_w, 0.25 * drop * lips
        # Backward map, column by column: above the lips skin moves up by u, the gap reads the lip line,
        # below it the lower lip moves down by o and the jaw by j, fading out under the chin.
        up = qy + u * _smoothstep((qy - self.nose_y) / np.maximum(my - u - self.nose_y, 1.0))
        stretch = 0.15 * self.face.w
        below_shift = o + (j - o) * _smoothstep((qy - my - o) / stretch)
        below_shift *= 1.0 - _smoothstep((qy - self.chin_y - j) / (0.4 * self.face.w))
        below = qy - below_shift
        new_y = np.where(qy <= my - u, up, np.where(qy >= my + o, below, my))
        # Rounding pulls the lip corners in, widening pushes them out.
        near = np.exp(-((qx - mx) / (1.3 * self.mouth_rx)) ** 2 - ((qy - my) / (0.6 * self.mouth_rx)) ** 2)
        map_x[win] = qx - 0.15 * pose.width * (qx - mx) * near
        map_y[win] = new_y
        edge = np.minimum(qy - (my - u), (my + o) - qy)
        alpha = np.clip(edge / 1.2, 0.0, 1.0) * (o > 0.6)
        depth = np.clip((qy - (my - u)) / np.maximum(o + u, 1.0), 0.0, 1.0)[..., None]
        teeth = np.array([205, 195, 185], np.float32) * min(1.0, pose.jaw * 2)
        throat = np.array([55, 18, 22], np.float32)
        shade = throat + (teeth - throat) * np.clip(1.0 - depth * 4.0, 0.0, 1.0) * 0.6
        return (0.92 * alpha).astype(np.float32), shade.astype(np.float32)


def _ring_colour(image: np.ndarray, ex: float, ey: float, rx: float, ry: float) -> np.ndarray:
    """Mean colour of the skin around an eye (a ring outside it), robust to the eye's own dark pixels."""
    y0, y1 = int(max(0, ey - 3 * ry)), int(min(image.shape[0], ey + 3 * ry))
    x0, x1 = int(max(0, ex - 2 * rx)), int(min(image.shape[1], ex + 2 * rx))
    ys, xs = np.mgrid[y0:y1, x0:x1]
    r = np.sqrt(((xs - ex) / rx) ** 2 + ((ys - ey) / ry) ** 2)
    ring = image[y0:y1, x0:x1][(r > 1.5) & (r < 2.5)]
    return ring.mean(axis=0).astype(np.float32) if len(ring) else np.array([180, 140, 120], np.float32)


def _eyes(image: np.ndarray, face: FaceBox) -> list[tuple[float, float, float, float]]:
    """Eye centres and radii: the eye cascade in the upper face, else the usual proportions."""
    x0, y0 = int(max(0, face.x)), int(max(0, face.y))
    upper = image[y0 : int(face.y + 0.6 * face.h), x0 : int(face.x + face.w)]
    found = []
    if upper.size:
        gray = cv2.cvtColor(upper, cv2.COLOR_RGB2GRAY)
        side = max(8, int(face.w * 0.15))
        found = _cascade("haarcascade_eye.xml").detectMultiScale(gray, 1.1, 5, minSize=(side, side))
    rx, ry = EYE_RX * face.w, EYE_RY * face.w
    cx = face.x + face.w / 2
    boxes = sorted(found, key=lambda b: -b[2] * b[3])[:2] if len(found) >= 2 else []
    centres = sorted((x0 + bx + bw / 2, y0 + by + bh / 2) for bx, by, bw, bh in boxes)
    if len(centres) == 2 and centres[0][0] < cx < centres[1][0]:
        return [(ex, ey, rx, ry) for ex, ey in centres]
    ey = face.y + EYE_Y * face.h
    return [(cx - EYE_DX * face.w, ey, rx, ry), (cx + EYE_DX * face.w, ey, rx, ry)]

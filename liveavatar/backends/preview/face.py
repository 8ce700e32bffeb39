"""Face finding for the preview avatar: the face is found once on the whole portrait, then carried
through the crop to the output size (a detector run again on the crop can take a collar for a face).
The landmarks inside the face are in `landmarks`, the warp that animates them in `rig`.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import cv2
import numpy as np

log = logging.getLogger(__name__)


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


def cascade(name: str) -> cv2.CascadeClassifier:
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
    found = cascade("haarcascade_frontalface_default.xml").detectMultiScale(
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

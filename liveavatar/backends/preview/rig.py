"""The preview's image warp: the portrait's own pixels moved along the fitted face model.

A frame is one backward map (for every output pixel, where to read the portrait) and one `cv2.remap`,
plus a small shaded fill where the lips part. The map is built as head sway/nod (rotation about the
neck, masked to the head) -> jaw drop and lip parting -> upper eyelids sliding down. The mouth and lid
fields are evaluated at the head-moved coordinates so the parts stay attached, and every field is a
smooth profile that reaches zero inside its window: a map that is continuous everywhere cannot cut a
seam into the picture. The only edges the warp makes are where real ones are (the lips' inner edges,
a lid's margin), and they are drawn in the portrait's own colours.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from liveavatar.backends.preview.face import FaceBox
from liveavatar.backends.preview.landmarks import Eye, FaceModel, fit_face_model


def _smoothstep(x: np.ndarray | float) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3 - 2 * x)


def _bump(t: np.ndarray) -> np.ndarray:
    """1 at 0, falling smoothly (zero slope) to exactly 0 at |t| = 1."""
    return np.clip(1.0 - t * t, 0.0, 1.0) ** 2


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
        self.model: FaceModel = fit_face_model(image, face)
        self.eyes: tuple[Eye, Eye] = self.model.eyes
        h, w = image.shape[:2]
        f = face.w
        cx, cy = face.centre
        self.pivot = (cx, face.y + 1.25 * face.h)
        m = self.model.mouth
        self.max_open = 0.11 * f
        self.jaw_reach = max(2.4 * m.half_width, 0.4 * f)  # columns the jaw drags, centre outwards
        self.chin_fade = 0.5 * f  # below the chin the drop fades out over this much neck
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
        # Windows hold every point a field moves, with a margin for the head's own motion (a few px).
        margin = 0.08 * f + 2
        bottom = self.model.chin_y + self.max_open + self.chin_fade
        self.mouth_win = self._window(
            m.x - self.jaw_reach - margin, m.x + self.jaw_reach + margin, self.model.nose_y - margin, bottom + margin
        )
        self.eye_wins = [
            self._window(
                e.x - 1.3 * e.rx - margin,
                e.x + 1.3 * e.rx + margin,
                e.y - 3.5 * e.ry - margin,
                e.y + 1.5 * e.ry + margin,
            )
            for e in self.eyes
        ]

    def mouth_box(self) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) around the lips and the jaw's travel, in output pixels."""
        m = self.model.mouth
        pad = 1.2 * m.half_width
        return int(m.x - pad), int(m.y - m.upper - 2), int(m.x + pad), int(m.y + m.lower + self.max_open + 2)

    def warped_box(self) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) of the mouth window in output pixels: everything the jaw and lips can move."""
        ys, xs = self.mouth_win
        oy, ox = self.roi[0].start, self.roi[1].start
        return xs.start + ox, ys.start + oy, xs.stop + ox, ys.stop + oy

    def _window(self, x0: float, x1: float, y0: float, y1: float) -> tuple[slice, slice]:
        ys, xs = self.roi
        ry0, rx0 = ys.start, xs.start
        return (
            slice(int(np.clip(y0 - ry0, 0, ys.stop - ry0)), int(np.clip(y1 - ry0, 0, ys.stop - ry0))),
            slice(int(np.clip(x0 - rx0, 0, xs.stop - rx0)), int(np.clip(x1 - rx0, 0, xs.stop - rx0))),
        )

    def backward_map(self, pose: FacePose) -> tuple[np.ndarray, np.ndarray]:
        """Where each output pixel reads the portrait, over the whole frame (for checks and docs)."""
        h, w = self.image.shape[:2]
        ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
        map_x, map_y, _, _ = self._maps(pose)
        xs[self.roi], ys[self.roi] = map_x, map_y
        return xs, ys

    def _maps(
        self, pose: FacePose
    ) -> tuple[np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray] | None, list[np.ndarray]]:
        map_x = self.grid_x + pose.roll * self.rot_x + pose.shift_x * self.head_mask
        map_y = self.grid_y + pose.roll * self.rot_y + pose.shift_y * self.head_mask + pose.nod * self.nod_y
        fill = None
        if pose.jaw > 0.01 or abs(pose.width) > 0.01:
            fill = self._mouth(pose, map_x, map_y)
        lids = []
        if pose.blink > 0.02:
            lids = [
                self._lid(eye, win, pose.blink, map_x, map_y) for eye, win in zip(self.eyes, self.eye_wins, strict=True)
            ]
        return map_x, map_y, fill, lids

    def render(self, pose: FacePose, out: np.ndarray) -> None:
        """Draw one frame into `out`, a uint8 array of the portrait's shape."""
        out[...] = self.image
        map_x, map_y, fill, lids = self._maps(pose)
        roi = cv2.remap(self.image, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        if fill is not None:
            alpha, shade = fill
            part = roi[self.mouth_win].astype(np.float32)
            part += alpha[..., None] * (shade - part)
            roi[self.mouth_win] = np.clip(part + 0.5, 0, 255).astype(np.uint8)
        for win, lash in zip(self.eye_wins, lids, strict=False):
            part = roi[win].astype(np.float32)
            part += lash[..., None] * (self.model.lash - part)
            roi[win] = np.clip(part + 0.5, 0, 255).astype(np.uint8)
        out[self.roi] = roi

    def _mouth(self, pose: FacePose, map_x: np.ndarray, map_y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Drop the jaw and part the lips in place on the maps; return the mouth interior's alpha and colour.

        Column profiles: the lips part in a lens between the corners (rounding narrows it, widening
        stretches it), the jaw drags a wider band that fades smoothly to the sides. Per column, above the
        parting line the upper lip rises a little (fading to nothing at the nose), below it the lower lip
        and the chin drop (fading to nothing down the neck); the gap between reads the shaded interior.
        """
        win = self.mouth_win
        qx, qy = map_x[win].copy(), map_y[win].copy()  # the head-moved points, before this warp
        m = self.model.mouth
        dx = qx - m.x
        half = m.half_width * (1.0 + 0.12 * pose.width)
        lens = np.clip(1.0 - (dx / half) ** 2, 0.0, 1.0) ** 0.6
        jaw_cols = np.maximum(1.0 - _smoothstep((np.abs(dx) - m.half_width) / (self.jaw_reach - m.half_width)), lens)
        drop = pose.jaw * self.max_open * (1.0 - 0.25 * max(pose.width, 0.0))
        o, j, u = drop * lens, drop * jaw_cols, 0.2 * drop * lens
        part = m.y - m.lift * np.clip(dx / m.half_width, -1.0, 1.0) ** 2  # the parting line, curved by a smile
        top = part - u
        nose = self.model.nose_y
        rise = u * _smoothstep((qy - nose) / np.maximum(top - nose, 1.0))
        stretch = 0.15 * self.face.w
        fall = o + (j - o) * _smoothstep((qy - part - o) / stretch)
        fall *= 1.0 - _smoothstep((qy - self.model.chin_y - j) / self.chin_fade)
        new_y = np.where(qy <= top, qy + rise, np.where(qy >= part + o, qy - fall, part))
        # Rounding pulls the lip corners in, widening pushes them out; a compact bump leaves no trace.
        reach_y = min(m.upper + m.lower + self.max_open, m.y - nose)
        near = _bump(dx / (2.0 * m.half_width)) * _bump((qy - m.y) / reach_y)
        map_x[win] = qx - 0.14 * pose.width * dx * near
        map_y[win] = new_y
        # The interior, in the portrait's own colours: upper teeth under the lip, then the dark of the
        # mouth (the lip colour deepened), the tongue (the lip colour dimmed) rising from the bottom.
        inner = np.minimum(qy - top, part + o - qy)
        alpha = np.clip(inner + 0.5, 0.0, 1.0) * _smoothstep(lens / 0.35)  # the lips meet softly at the corners
        depth = np.clip((qy - top) / np.maximum(o + u, 1.0), 0.0, 1.0)
        # A portrait that smiles shows its upper teeth already, above the parting line: just a shadow then.
        teeth_px = (0.012 if m.shows_teeth else 0.035) * self.face.w
        teeth = 1.0 - _smoothstep((qy - top - 0.5 * teeth_px) / teeth_px)
        tongue = _smoothstep((depth - 0.6) / 0.4)
        dark = m.lip * np.array([0.26, 0.16, 0.16], np.float32)  # deep in the mouth: the lip's red, unlit
        tongue_rgb = m.lip * np.array([0.62, 0.42, 0.42], np.float32)
        shade = dark + (tongue * (0.3 + 0.7 * pose.jaw))[..., None] * (tongue_rgb - dark)
        shade = shade + (teeth * (0.5 + 0.5 * lens))[..., None] * (0.92 * m.teeth - shade)
        shade *= (0.55 + 0.45 * lens)[..., None]  # the corners sit in shadow
        return alpha.astype(np.float32), shade.astype(np.float32)

    def _lid(
        self, eye: Eye, win: tuple[slice, slice], closed: float, map_x: np.ndarray, map_y: np.ndarray
    ) -> np.ndarray:
        """Slide the upper lid down over the eye on the maps; return where its margin (lashes) lies.

        The lid is the portrait's own skin: the band just above the eye is stretched down to the lid's
        edge, so it keeps its colour and shading, and where the band starts the map is untouched.
        """
        qx, qy = map_x[win], map_y[win].copy()
        arc = np.clip(1.0 - ((qx - eye.x) / (1.15 * eye.rx)) ** 2, 0.0, 1.0) ** 0.6
        top = eye.y - 1.2 * eye.ry * arc  # the open eye's upper margin
        band = 1.4 * eye.ry
        edge = top + closed * 2.2 * eye.ry * arc  # the lid's margin now
        start = top - band
        cover = (qy >= start) & (qy < edge)
        src = start + (qy - start) * band / np.maximum(edge - start, 1e-3)
        map_y[win] = np.where(cover, src, qy)
        lash = np.clip(1.0 - np.abs(qy - edge) / 1.2, 0.0, 1.0) * arc * min(1.0, 2.0 * closed) * 0.45
        return lash.astype(np.float32)

"""Uploaded portraits: checked before they are decoded, because an upload is untrusted input.

The byte size and the pixel count (read from the header alone, without decoding) are bounded first,
so a small file that claims 50 000 x 50 000 pixels (a decompression bomb) is refused before any
memory is spent on it. Only JPG, PNG and WebP signatures are accepted, and only shapes that can be
framed (at least 32 px a side, at most 8:1: `media_io.portrait_shape_problem`, which the offline
tools apply too).
"""

from __future__ import annotations

import io
import warnings

import numpy as np

from liveavatar.media_io import portrait_shape_problem
from server.protocol import ProtocolError

_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n")


def _is_image_signature(data: bytes) -> bool:
    webp = data[:4] == b"RIFF" and data[8:12] == b"WEBP"
    return webp or any(data.startswith(sig) for sig in _SIGNATURES)


def decode_portrait(data: bytes, max_bytes: int, max_pixels: int) -> np.ndarray:
    """Validated upload -> RGB uint8 [H, W, 3]; ProtocolError(upload_too_large | bad_image) otherwise."""
    if len(data) > max_bytes:
        raise ProtocolError("upload_too_large", f"portrait is {len(data)} bytes; the limit is {max_bytes}")
    if not _is_image_signature(data):
        raise ProtocolError("bad_image", "portrait must be a JPG, PNG or WebP file")
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                width, height = img.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ProtocolError("upload_too_large", "portrait has too many pixels") from None
    except Exception as exc:  # PIL raises many types on corrupt headers
        raise ProtocolError("bad_image", f"portrait header is unreadable: {exc}") from None
    if width * height > max_pixels:
        raise ProtocolError("upload_too_large", f"portrait is {width}x{height}; the limit is {max_pixels} pixels")
    problem = portrait_shape_problem(width, height)
    if problem:
        raise ProtocolError("bad_image", problem)
    from liveavatar.media_io import MediaError, decode_image

    try:
        image = decode_image(data, "portrait")
    except MediaError as exc:
        raise ProtocolError("bad_image", str(exc)) from None
    if image.shape[0] * image.shape[1] > max_pixels:  # the header lied
        raise ProtocolError("upload_too_large", "portrait has too many pixels")
    return image

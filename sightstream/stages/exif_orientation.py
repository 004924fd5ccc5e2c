"""A still image the way viewers show it. Phones store a photo as the sensor read it, plus an
EXIF orientation (1-8) that says how to turn or mirror it; browsers, OpenCV's imdecode,
Pillow's exif_transpose and the model libraries' loaders obey it. A photo taken upright
(orientation 6) read as stored is sideways: a detector misses the face in it and results name
a portrait frame landscape.

JPEGs are read by simplejpeg, which ignores EXIF: their orientation is read here from the APP1
segment before the image data (a handful of segment headers for a camera's frame, which has
none). Other formats: Pillow's getexif (PNG eXIf, WebP EXIF)."""

from __future__ import annotations

from typing import Any

import numpy as np

ORIENTATION_TAG = 0x0112
TURNED = (5, 6, 7, 8)  # orientations whose shown image swaps width and height
SHORT, LONG, SSHORT, SLONG = 3, 4, 8, 9  # TIFF field types
_SOS, _EOI, _APP1 = 0xDA, 0xD9, 0xE1


def jpeg_orientation(data: bytes) -> int:
    """The EXIF orientation of a JPEG (1 when it has none, or it cannot be read)."""
    at, end = 2, len(data)
    while at + 4 <= end and data[at] == 0xFF:
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        if marker in (_SOS, _EOI):  # the image data: no EXIF after it counts
            break
        length = int.from_bytes(data[at + 2:at + 4], "big")
        if marker == _APP1 and data[at + 4:at + 10] == b"Exif\x00\x00":
            return _tiff_orientation(data[at + 10:at + 2 + length])
        at += 2 + length
    return 1


def _tiff_orientation(tiff: bytes) -> int:
    """The orientation tag of the first IFD of an EXIF block (a TIFF header and its IFDs)."""
    order: Any = {b"II": "little", b"MM": "big"}.get(tiff[:2])
    if order is None or len(tiff) < 8:
        return 1
    ifd = int.from_bytes(tiff[4:8], order)
    if ifd + 2 > len(tiff):
        return 1
    for k in range(int.from_bytes(tiff[ifd:ifd + 2], order)):
        entry = ifd + 2 + 12 * k
        if entry + 12 > len(tiff):
            break
        if int.from_bytes(tiff[entry:entry + 2], order) == ORIENTATION_TAG:
            kind = int.from_bytes(tiff[entry + 2:entry + 4], order)
            count = int.from_bytes(tiff[entry + 4:entry + 8], order)
            width = {SHORT: 2, SSHORT: 2, LONG: 4, SLONG: 4}.get(kind)  # as Pillow reads it: another
            if width is None or count < 1:  # type is no orientation
                return 1
            value = int.from_bytes(tiff[entry + 8:entry + 8 + width], order,  # first in its field
                                   signed=kind in (SSHORT, SLONG))
            return value if 1 <= value <= 8 else 1
    return 1


def orientation(data: bytes, im: Any) -> int:
    """The EXIF orientation of an image (its bytes, and Pillow's opening of them): every reader
    of a frame (the decoder, the live page, publish) reads it alike."""
    return jpeg_orientation(data) if data[:3] == b"\xff\xd8\xff" else pillow_orientation(im)


def pillow_orientation(im: Any) -> int:
    """The EXIF orientation of an image Pillow opened (1 when none)."""
    try:
        value = im.getexif().get(ORIENTATION_TAG, 1)
    except Exception:  # noqa: BLE001 - a damaged EXIF block: shown as stored, as viewers do
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def shown(pixels: np.ndarray, orientation: int) -> np.ndarray:
    """`pixels` (stored, height x width x channels) as viewers show them."""
    if orientation == 2:
        out = pixels[:, ::-1]
    elif orientation == 3:
        out = pixels[::-1, ::-1]
    elif orientation == 4:
        out = pixels[::-1]
    elif orientation == 5:
        out = pixels.swapaxes(0, 1)
    elif orientation == 6:
        out = np.rot90(pixels, -1)
    elif orientation == 7:
        out = pixels[::-1, ::-1].swapaxes(0, 1)
    elif orientation == 8:
        out = np.rot90(pixels, 1)
    else:
        return pixels
    return np.ascontiguousarray(out)


def shown_size(width: int, height: int, orientation: int) -> tuple[int, int]:
    return (height, width) if orientation in TURNED else (width, height)

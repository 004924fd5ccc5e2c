"""Mask encodings: COCO RLE as pycocotools writes it, packbits."""

from __future__ import annotations

import base64

import numpy as np
import pytest

from sightstream.models.masks import packbits, rle_counts, rle_encode


def rle_decode(rle: dict) -> np.ndarray:
    """pycocotools' rleFrString + decode, written out for the test."""
    s, counts, p = rle["counts"], [], 0
    while p < len(s):
        x, k, more = 0, 0, True
        while more:
            c = ord(s[p]) - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    h, w = rle["size"]
    flat = np.zeros(h * w, dtype=bool)
    pos, value = 0, False
    for n in counts:
        flat[pos:pos + n] = value
        pos, value = pos + n, not value
    return flat.reshape((w, h)).T


def test_known_encodings():
    assert rle_encode(np.zeros((2, 2), bool)) == {"size": [2, 2], "counts": "4"}  # as pycocotools
    assert rle_counts(np.array([[1, 0], [1, 1]], bool)) == [0, 2, 1, 1]  # column-major, 0s first


@pytest.mark.parametrize("seed", range(5))
def test_rle_round_trip(seed):
    rng = np.random.default_rng(seed)
    mask = rng.random((37, 53)) > 0.7
    mask[5:30, 10:40] = True  # long runs: multi-character counts
    assert np.array_equal(rle_decode(rle_encode(mask)), mask)


def test_packbits():
    mask = np.array([[1, 0, 1, 1, 0, 0, 0, 0, 1]], bool)
    assert base64.b64decode(packbits(mask)) == bytes([0b10110000, 0b10000000])

"""Mask encodings: COCO RLE as pycocotools writes and reads it, packbits."""

from __future__ import annotations

import base64

import numpy as np
import pytest

from sightstream.models.masks import packbits, packbits_frame, rle_counts, rle_decode, rle_encode


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


def test_rle_decode_inverts_encode():
    rng = np.random.default_rng(3)
    for shape in [(1, 1), (7, 5), (33, 70), (64, 64)]:
        mask = rng.random(shape) > 0.6
        mask[0, 0] = True  # a run of 1s first
        assert np.array_equal(rle_decode(rle_encode(mask)), mask)
        mask[0, 0] = False
        assert np.array_equal(rle_decode(rle_encode(mask)), mask)


def test_packbits_frame_layout():
    mask = np.zeros((3, 10), dtype=bool)
    mask[0, 0] = mask[1, 9] = mask[2, 8] = True
    blob = packbits_frame(mask)
    assert blob[:12] == (3).to_bytes(4, "big") + (10).to_bytes(4, "big") + (2).to_bytes(4, "big")
    assert blob[12:] == bytes([0b10000000, 0, 0, 0b01000000, 0, 0b10000000])

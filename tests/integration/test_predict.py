"""POST /predict over a real socket: single images (body, multipart, gzip), batches (tar,
several files), each format, each error a user can cause, and requests batched together."""

from __future__ import annotations

import asyncio
import gc
import gzip
import io
import struct
import tarfile

import numpy as np
import pytest
from aiohttp import FormData
from PIL import Image

from sightstream.config import ModelEntry
from sightstream.frames import Frame
from sightstream.models.masks import rle_decode
from tests import tiny_hf
from tests.conftest import encode
from tests.fake_adapters import Scripted, entry
from tests.integration.helpers import client_for, serving, settings_for
from tests.tiny_models import red_segmenter

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def depth_model(tmp_path_factory):
    return tiny_hf.depth_anything(tmp_path_factory.mktemp("depth") / "depth")


def predict_settings(redis_url, tmp_path, depth_path=None, **extra):
    settings = settings_for(redis_url, tmp_path, fakes={"slow": {"delay_s": 0.2}}, **extra)
    settings.models["user"] = {"track": ModelEntry(backend="transformers", task="track", path=str(tmp_path))}
    settings.models["seg"] = {"red": ModelEntry(
        backend="onnx", task="segment", path=str(red_segmenter(tmp_path / "seg.onnx")), input_size=32,
        mean=[0, 0, 0], std=[1, 1, 1], input_name="x", output_name="scores", labels=["background", "red"])}
    if depth_path:
        settings.models["depth"] = {"tiny": ModelEntry(backend="transformers", task="depth", path=str(depth_path))}
    return settings



def red_left(width=60, height=40) -> np.ndarray:
    frame = np.zeros((height, width, 3), np.uint8)
    frame[:, : width // 2] = (255, 0, 0)  # class 1 ("red")
    frame[:, width // 2:] = (0, 255, 0)
    return frame


def tar_of(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


async def test_one_image_as_body_multipart_or_gzip(redis_url, tmp_path, gradient, astronaut_jpeg):
    async with serving(predict_settings(redis_url, tmp_path)) as (d, client):
        r = await client.post("/predict/tiny/det", data=encode(gradient))
        body = await r.json()
        assert r.status == 200 and r.headers["X-Task"] == "detect"
        assert (body["width"], body["height"]) == (96, 64)
        assert [det["label"] for det in body["detections"]] == ["dog"]

        form = FormData()
        form.add_field("file", encode(gradient, "PNG"), filename="g.png", content_type="image/png")
        r = await client.post("/predict/tiny/det", data=form)
        assert r.status == 200 and (await r.json())["detections"][0]["label"] == "dog"

        r = await client.post("/predict/tiny/det", data=gzip.compress(encode(gradient, "BMP")),
                              headers={"Content-Encoding": "gzip"})
        assert r.status == 200 and (await r.json())["width"] == 96

        # The real default model: a face on the astronaut, in the photo's own pixels.
        r = await client.post("/predict/retinaface/mobilenet", data=astronaut_jpeg)
        body = await r.json()
        assert r.status == 200 and (body["width"], body["height"]) == (512, 512)
        (face,) = body["detections"]
        assert face["label"] == "face" and face["score"] > 0.9
        x1, y1, x2, y2 = face["box"]
        assert 150 < x1 < x2 < 300 and 30 < y1 < y2 < 220


async def test_a_tar_is_a_batch_answered_in_order_with_an_error_entry_per_bad_member(redis_url, tmp_path, gradient):
    async with serving(predict_settings(redis_url, tmp_path)) as (d, client):
        tar = tar_of([("a.jpg", encode(gradient)), ("notes.txt", b"not an image"),
                      ("b.png", encode(gradient, "PNG")), ("c.jpg", encode(gradient)[:200])])
        r = await client.post("/predict/tiny/det", data=tar, headers={"Content-Type": "application/x-tar"})
        body = await r.json()
        assert r.status == 200 and r.headers["X-Batch-Size"] == "4"
        names = [item["name"] for item in body["results"]]
        assert names == ["a.jpg", "notes.txt", "b.png", "c.jpg"]
        a, notes, b, c = body["results"]
        assert a["result"]["detections"][0]["label"] == "dog" and b["result"]["width"] == 96
        assert notes["error"]["code"] == "unsupported_format" and "result" not in notes
        assert c["error"]["code"] == "bad_image"

        # a link is read as the member it points to; a dangling one gets its own error entry
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as t:
            data = encode(gradient)
            info = tarfile.TarInfo("dir")
            info.type = tarfile.DIRTYPE
            t.addfile(info)  # a folder is not an entry
            info = tarfile.TarInfo("dir/a.jpg")
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
            for name, target in (("same.jpg", "dir/a.jpg"), ("gone.jpg", "dir/none.jpg")):
                info = tarfile.TarInfo(name)
                info.type, info.linkname = tarfile.SYMTYPE, target
                t.addfile(info)
        r = await client.post("/predict/tiny/det", data=buf.getvalue(), headers={"Content-Type": "application/x-tar"})
        a, same, gone = (await r.json())["results"]
        assert r.headers["X-Batch-Size"] == "3" and same["name"] == "same.jpg" and same["result"] == a["result"]
        assert gone["name"] == "gone.jpg" and "error" in gone

        form = FormData()
        for name in ("x.jpg", "y.jpg"):
            form.add_field("file", encode(gradient), filename=name, content_type="image/jpeg")
        r = await client.post("/predict/tiny/det", data=form)
        body = await r.json()
        assert r.headers["X-Batch-Size"] == "2" and [i["name"] for i in body["results"]] == ["x.jpg", "y.jpg"]


async def test_masks_as_json_png_and_packbits(redis_url, tmp_path):
    frame = red_left()
    async with serving(predict_settings(redis_url, tmp_path)) as (d, client):
        r = await client.post("/predict/seg/red", data=encode(frame, "PNG"))
        (mask,) = (await r.json())["masks"]
        expected = rle_decode(mask["rle"])
        assert mask["label"] == "red" and expected[:, :25].all() and not expected[:, 35:].any()

        r = await client.post("/predict/seg/red?format=png", data=encode(frame, "PNG"))
        assert r.content_type == "image/png"
        class_map = np.asarray(Image.open(io.BytesIO(await r.read())))
        assert np.array_equal(class_map == 1, expected)

        r = await client.post("/predict/seg/red?format=packbits", data=encode(frame, "PNG"))
        blob = await r.read()
        h, w, stride = struct.unpack(">III", blob[:12])
        assert (h, w, stride) == (40, 60, 8)
        bits = np.unpackbits(np.frombuffer(blob[12:], np.uint8).reshape(h, stride), axis=1)[:, :w]
        assert np.array_equal(bits.astype(bool), expected)

        tar = tar_of([("one.png", encode(frame, "PNG")), ("bad.png", b"\x89PNG\r\n\x1a\nbroken"),
                      ("two.png", encode(frame, "PNG"))])
        r = await client.post("/predict/seg/red?format=packbits", data=tar,
                              headers={"Content-Type": "application/x-tar"})
        blob, blocks = await r.read(), []
        while blob:
            (n,) = struct.unpack(">i", blob[:4])
            blocks.append((n, blob[4:4 + abs(n)]))
            blob = blob[4 + abs(n):]
        assert [n for n, _ in blocks] == [12 + 40 * 8, -len(blocks[1][1]), 12 + 40 * 8]
        assert blocks[1][1].decode().startswith("bad_image: ")  # a failed image: its error instead


async def test_depth_answers_a_16_bit_png(redis_url, tmp_path, gradient, depth_model):
    async with serving(predict_settings(redis_url, tmp_path, depth_model)) as (d, client):
        r = await client.post("/predict/depth/tiny", data=encode(gradient))
        assert r.status == 200 and r.content_type == "image/png"
        depth = Image.open(io.BytesIO(await r.read()))
        assert depth.size == (96, 64) and depth.mode.startswith("I")
        assert float(r.headers["X-Depth-Min"]) <= float(r.headers["X-Depth-Max"])
        r = await client.post("/predict/depth/tiny?format=json", data=encode(gradient))
        assert set(await r.json()) >= {"width", "height", "min", "max"}


async def test_every_user_error_is_a_4xx_that_says_why(redis_url, tmp_path, gradient):
    settings = predict_settings(redis_url, tmp_path, control={"port": 0, "max_upload_mb": 0.05})
    async with serving(settings) as (d, client):
        async def error(path, status, **kw):
            r = await client.post(path, **kw)
            assert r.status == status, (path, r.status, await r.text())
            return (await r.json())["error"]

        assert "no/such" in (await error("/predict/no/such", 404, data=encode(gradient)))["message"]
        assert (await error("/predict/tiny/det", 415, data=b"GIF89a..."))["code"] == "unsupported_format"
        assert (await error("/predict/tiny/det", 422, data=encode(gradient)[:100]))["code"] == "bad_image"
        assert "no image" in (await error("/predict/tiny/det", 400, data=b""))["message"]
        big = np.random.default_rng(0).integers(0, 255, (200, 200, 3), np.uint8)
        assert "too large" in (await error("/predict/tiny/det", 413, data=encode(big, "PNG")))["message"]
        bomb = gzip.compress(b"\0" * 5_000_000)  # 5 KB on the wire, 5 MB unpacked
        assert len(bomb) < 50_000
        assert "too large" in (await error("/predict/tiny/det", 413, data=bomb,
                                           headers={"Content-Encoding": "gzip"}))["message"]
        assert "takes no prompt" in (await error("/predict/tiny/det?prompt=cats", 422, data=encode(gradient)))["message"]
        assert (await client.post("/predict/tiny/det?prompt=", data=encode(gradient))).status == 200  # no prompt
        assert (await client.post("/predict/tiny/det?prompt=%20", data=encode(gradient))).status == 200  # nor blank
        r = await client.post("/predict/user/track", data=encode(gradient))
        assert r.status == 422 and "as a job" in (await r.json())["error"]["message"]
        assert "gives no image" in (await error("/predict/tiny/det?format=png", 422, data=encode(gradient)))["message"]
        assert "format" in (await error("/predict/tiny/det?format=gif", 422, data=encode(gradient)))["message"]
        assert "not a readable tar" in (await error(
            "/predict/tiny/det", 400, data=b"x" * 600, headers={"Content-Type": "application/x-tar"}))["message"]
        tar = tar_of([("a.jpg", encode(gradient)), ("b.jpg", encode(gradient))])
        with tarfile.open(fileobj=io.BytesIO(tar)) as whole:
            b = whole.getmembers()[1]
        for cut in (600, b.offset + 100, b.offset_data + 100):  # in a's data, b's header, b's data
            assert "cut short" in (await error("/predict/tiny/det", 400, data=tar[:cut],
                                               headers={"Content-Type": "application/x-tar"}))["message"]
        assert "cannot be read" in (await error("/predict/tiny/det", 400, data=encode(gradient),
                                                headers={"Content-Encoding": "gzip"}))["message"]  # not gzip
        # links to one member multiply it: 30 KB sent, 180 KB read
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as t:
            info = tarfile.TarInfo("a.bin")
            info.size = 30_000
            t.addfile(info, io.BytesIO(bytes(30_000)))
            for i in range(5):
                link = tarfile.TarInfo(f"l{i}.bin")
                link.type, link.linkname = tarfile.LNKTYPE, "a.bin"
                t.addfile(link)
        assert len(buf.getvalue()) < 50_000
        assert "links are followed" in (await error("/predict/tiny/det", 413, data=buf.getvalue(),
                                                    headers={"Content-Type": "application/x-tar"}))["message"]
        form = FormData(default_to_multipart=True)
        form.add_field("other", "x")
        assert "no `file` field" in (await error("/predict/tiny/det", 400, data=form))["message"]


async def test_multipart_bodies_past_the_parser_s_line_limits_are_400(redis_url, tmp_path, gradient):
    """aiohttp's multipart reader refuses lines over its limits with its own error, not a
    ValueError: a body of zeros with no boundary line, a part header of 9 KB."""
    multipart = {"Content-Type": "multipart/form-data; boundary=x"}
    header = b"--x\r\nContent-Disposition: form-data; name=file; filename=" + b"a" * 9000 + b"\r\n\r\n"
    async with serving(predict_settings(redis_url, tmp_path)) as (d, client):
        for body in (b"\0" * 600_000, header + encode(gradient) + b"\r\n--x--\r\n"):
            r = await client.post("/predict/tiny/det", data=body, headers=multipart)
            assert r.status == 400 and "cannot be read" in (await r.json())["error"]["message"]


async def test_requests_are_counted_under_the_model_they_named(redis_url, tmp_path, gradient):
    """A refused request names its model in the metrics, once the path names a catalogue one."""
    async with serving(predict_settings(redis_url, tmp_path)) as (d, client):
        assert (await client.post("/predict/tiny/det?prompt=cats", data=encode(gradient))).status == 422
        assert (await client.post("/predict/no/such", data=encode(gradient))).status == 404
        text = await (await client.get("/metrics")).text()
    assert 'sightstream_predict_requests_total{model="tiny/det",status="422"} 1.0' in text
    assert 'sightstream_predict_requests_total{model="unknown",status="404"} 1.0' in text


async def test_a_predicted_image_is_freed_with_its_answer(redis_url, tmp_path, gradient):
    """Nothing keeps a request's decoded image once it is answered, without waiting for the
    garbage collector: a burst of large uploads would otherwise hold gigabytes while idle."""
    async with serving(predict_settings(redis_url, tmp_path)) as (d, client):
        gc.collect()
        gc.disable()
        try:
            # type(), not isinstance(): that asks odd objects (torch's deprecated ones) for __class__
            before = {id(o) for o in gc.get_objects() if type(o) is Frame}  # other tests' leftovers
            for _ in range(3):
                assert (await client.post("/predict/tiny/det", data=encode(gradient))).status == 200
            # The answer can reach the client an instant before the CPU pool's thread drops its
            # work item (which holds the batch): give it a moment, with the collector still off.
            # Only ids are kept between looks: a list of the frames would keep them alive.
            for _ in range(100):
                alive = [id(o) for o in gc.get_objects() if type(o) is Frame and id(o) not in before]
                if not alive:
                    break
                await asyncio.sleep(0.02)
        finally:
            gc.enable()
    assert alive == [], "a Frame outlived its answer"


@pytest.mark.parametrize("budget_images", [2, 0.01])
async def test_predict_requests_together_hold_no_more_decoded_pixels_than_their_budget(
        redis_url, tmp_path, gradient, monkeypatch, budget_images):
    """A small upload can decode to a lot (a 115 KB PNG to 119 MB): a request freed its
    images only with its answer, and requests side by side added up (two tars of 40 such PNGs
    held 9.5 GB). Each chunk's pixels are reserved before decoding and freed once answered; a
    chunk over the whole budget (0.01 images) runs alone."""
    held: list[int] = []
    infer = Scripted.infer

    def observed(self, images, prompt=None):
        held.append(sum(o.image.shape[0] * o.image.shape[1] for o in gc.get_objects()
                        if type(o) is Frame and o.image is not None and id(o) not in before))
        return infer(self, images, prompt)

    monkeypatch.setattr(Scripted, "infer", observed)
    one = gradient.shape[0] * gradient.shape[1]
    settings = predict_settings(redis_url, tmp_path, control={
        "port": 0, "predict_batch_size": 2, "predict_max_pixels": int(budget_images * one),
        "predict_batch_timeout_ms": 50})
    images = tar_of([(f"{i}.png", encode(gradient, "PNG")) for i in range(6)])
    async with serving(settings) as (d, client):
        before = {id(o) for o in gc.get_objects() if type(o) is Frame}  # other tests' leftovers
        replies = await asyncio.gather(*(client.post("/predict/fake/slow", data=images,
                                                     headers={"Content-Type": "application/x-tar"})
                                         for _ in range(3)))
        assert [r.status for r in replies] == [200] * 3
        assert [len((await r.json())["results"]) for r in replies] == [6] * 3
    assert len(held) >= 9 and max(held) <= 2 * one, held


async def test_before_the_daemon_has_started_predict_is_503(redis_url, tmp_path, gradient):
    from sightstream.daemon.daemon import Daemon

    daemon = Daemon(predict_settings(redis_url, tmp_path))
    client = await client_for(daemon)
    try:
        r = await client.post("/predict/tiny/det", data=encode(gradient))
        assert r.status == 503 and (await r.json())["error"]["code"] == "unavailable"
    finally:
        await client.close()
        await daemon.stop()


async def test_a_burst_of_requests_is_batched(redis_url, tmp_path, gradient):
    settings = predict_settings(redis_url, tmp_path, control={"port": 0, "predict_batch_timeout_ms": 100})
    async with serving(settings) as (d, client):
        replies = await asyncio.gather(*(client.post("/predict/fake/slow", data=encode(gradient))
                                         for _ in range(8)))
        assert [r.status for r in replies] == [200] * 8
        assert max([(await r.json())["batch"] for r in replies]) > 1
        await client.post("/predict/no/such", data=encode(gradient))
        text = await (await client.get("/metrics")).text()
        assert 'sightstream_predict_requests_total{model="fake/slow",status="200"} 8.0' in text
        assert 'sightstream_predict_requests_total{model="unknown",status="404"} 1.0' in text


async def test_a_model_past_its_own_timeout_is_a_504_naming_it(redis_url, tmp_path, gradient):
    settings = settings_for(redis_url, tmp_path, fakes={"stuck": {"hang_first_s": 3, "timeout_s": 0.5}},
                            inference_timeout_s=60)
    async with serving(settings) as (d, client):
        r = await client.post("/predict/fake/stuck", data=encode(gradient))
        assert r.status == 504, await r.text()
        message = (await r.json())["error"]["message"]
        assert "fake/stuck did not answer within its timeout (0.5 s)" in message


def one_part(data: bytes, encoding: str) -> tuple[bytes, dict]:
    head = (f'--x\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n'
            f"Content-Type: image/png\r\nContent-Transfer-Encoding: {encoding}\r\n\r\n").encode()
    return head + data + b"\r\n--x--\r\n", {"Content-Type": "multipart/form-data; boundary=x"}


async def test_a_part_sent_base64_or_quoted_printable_is_decoded(redis_url, tmp_path, gradient):
    """Some clients still send form parts with a Content-Transfer-Encoding: the part is the
    image once decoded, not an undecodable upload; an encoding it cannot undo is a 400."""
    import base64
    import binascii

    png = encode(gradient, "PNG")
    async with serving(predict_settings(redis_url, tmp_path)) as (d, client):
        plain = await (await client.post("/predict/tiny/det", data=png)).json()
        wrapped = base64.encodebytes(png)  # lines of 76, as mail-style encoders write them
        for data, encoding in ((wrapped, "base64"), (binascii.b2a_qp(png, istext=False), "quoted-printable")):
            body, headers = one_part(data, encoding)
            r = await client.post("/predict/tiny/det", data=body, headers=headers)
            assert r.status == 200 and await r.json() == plain, encoding
        for data, encoding, says in ((b"abc", "base64", "cannot be decoded"),
                                     (png, "x-uuencode", "not supported")):
            body, headers = one_part(data, encoding)
            r = await client.post("/predict/tiny/det", data=body, headers=headers)
            assert r.status == 400 and says in (await r.json())["error"]["message"], encoding


@pytest.mark.parametrize("size", [(1025, 577), (2561, 1441)])
async def test_a_jpeg_decoded_at_reduced_scale_gives_boxes_where_the_objects_are(redis_url, tmp_path, size):
    """A side that is no multiple of the DCT scale: 577 rows at 1/8 decode to 73, each 8 rows of
    the frame (the last cut short), and mapping back by 577 / 73 rather than 8 put a box at the
    bottom 3 px high (11 px at 2561x1441)."""
    w, h = size
    image = np.full((h, w, 3), 40, np.uint8)
    x1, y1 = (w - 136) // 8 * 8, (h - 72) // 8 * 8  # on JPEG blocks: the 1/8 decode keeps its edges
    image[y1:y1 + 64, x1:x1 + 128] = 255
    settings = predict_settings(redis_url, tmp_path)
    settings.models["fake"] = {"bright": ModelEntry(**entry("Brightest"))}
    async with serving(settings) as (d, client):
        body = await (await client.post("/predict/fake/bright", data=encode(image, "JPEG"))).json()
        assert d.decode_target("fake/bright") is not None  # decoded at 1/8
    assert (body["width"], body["height"]) == size
    assert body["detections"][0]["box"] == [x1, y1, x1 + 128, y1 + 64]


async def test_a_phone_photo_is_read_as_viewers_show_it(redis_url, tmp_path, astronaut):
    """Stored sideways with EXIF orientation 6 (a phone held upright): the face is found, in
    the pixels of the photo as shown. Read as stored, no face was found at all."""
    from tests.unit.test_decoder import tagged

    async with serving(predict_settings(redis_url, tmp_path)) as (d, client):
        upright = await (await client.post("/predict/retinaface/mobilenet", data=encode(astronaut))).json()
        r = await client.post("/predict/retinaface/mobilenet", data=tagged(astronaut, "JPEG", 6, quality=95))
        body = await r.json()
    assert r.status == 200 and (body["width"], body["height"]) == (512, 512)
    (face,) = body["detections"]
    assert np.allclose(face["box"], upright["detections"][0]["box"], atol=4)

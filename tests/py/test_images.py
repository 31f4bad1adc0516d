"""gilfree.images: the ops (in process) and the real service (a subprocess on 127.0.0.1, OS-chosen port)."""
import asyncio
import concurrent.futures
import email.utils
import gzip
import io
import os
import random
import re
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib

import aiohttp
import pytest
from PIL import Image

from gilfree.errors import UnsupportedInterpreter
from gilfree.images import ops, samples
from gilfree.images.spec import ImageError, parse

MP = 1_000_000


# ---------------------------------------------------------------- images made for the tests


def encode(image, fmt, **options):
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


def halves(size=(200, 100), left=(255, 0, 0), right=(0, 0, 255)):
    """Left half one colour, right half another: orientation and flips become visible."""
    image = Image.new("RGB", size, right)
    image.paste(left, (0, 0, size[0] // 2, size[1]))
    return image


def png_declaring(width, height):
    """A tiny PNG whose header declares width x height: a decompression bomb's first bytes."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def slow_png(side):
    """A small file (a gradient compresses well) whose blur+sharpen+webp takes seconds."""
    return encode(Image.linear_gradient("L").resize((side, side)).convert("RGB"), "PNG")


SLOW_OPS = "blur=60&sharpen&format=webp&quality=100"


def spec(query, max_pixels=50 * MP, max_bytes=25 << 20):
    return parse([tuple(item.partition("=")[::2]) for item in query.split("&") if item], max_pixels, max_bytes)


def run(source, query=""):
    """ops.transform in process: (Image, mime, raw bytes)."""
    body, mime, width, height = ops.transform(source, spec(query))
    image = Image.open(io.BytesIO(body))
    assert image.size == (width, height)
    return image, mime, body


def near(pixel, colour, tolerance=40):
    return all(abs(a - b) <= tolerance for a, b in zip(pixel, colour))


# ---------------------------------------------------------------- ops, in process

PHOTO = samples.photo_jpeg(0, size=(800, 600))


@pytest.mark.parametrize("query, size", [
    ("w=400", (400, 300)),
    ("h=150", (200, 150)),
    ("w=300&h=300", (300, 300)),  # cover is the default fit
    ("w=300&h=300&fit=cover", (300, 300)),
    ("w=300&h=100&fit=fill", (300, 100)),
    ("w=300&h=300&fit=contain", (300, 300)),
    ("w=300&h=300&fit=inside", (300, 225)),
    ("w=1600&h=1600&fit=inside", (1600, 1200)),
    ("crop=10,20,300,200", (300, 200)),
    ("crop=0,0,400,300&w=100", (100, 75)),
    ("rotate=90", (600, 800)),
    ("rotate=180", (800, 600)),
    ("rotate=270&w=100", (75, 100)),
    ("", (800, 600)),
])
def test_op_output_dimensions(query, size):
    image, mime, _ = run(PHOTO, query)
    assert image.size == size
    assert (mime, image.format) == ("image/jpeg", "JPEG")  # a JPEG source stays JPEG by default


@pytest.mark.parametrize("w, h", [(1, 79), (3, 158), (110, 158), (186, 158), (408, 313)])
def test_cover_fills_boxes_whose_scale_rounds_over_a_side(w, h):
    # 800x600 into these boxes: the side that fits exactly comes out a rounding error over 600 or
    # 800 (a negative centring offset: Pillow refused the box with a 500).
    image, _, _ = run(PHOTO, f"w={w}&h={h}&fit=cover")
    assert image.size == (w, h)


def test_contain_letterboxes_and_cover_crops_the_centre():
    source = encode(halves((400, 100)), "PNG")
    contained, _, _ = run(source, "w=100&h=100&fit=contain&format=png")
    assert contained.getpixel((50, 5)) == (0, 0, 0)  # padding above the 100x25 picture
    assert near(contained.getpixel((10, 50)), (255, 0, 0)) and near(contained.getpixel((90, 50)), (0, 0, 255))
    covered, _, _ = run(source, "w=100&h=100&fit=cover&format=png")
    assert near(covered.getpixel((10, 50)), (255, 0, 0)) and near(covered.getpixel((90, 50)), (0, 0, 255))


@pytest.mark.parametrize("fmt, pil_format, mime", [
    ("jpeg", "JPEG", "image/jpeg"), ("jpg", "JPEG", "image/jpeg"),
    ("png", "PNG", "image/png"), ("webp", "WEBP", "image/webp"),
])
def test_output_formats(fmt, pil_format, mime):
    image, got_mime, _ = run(PHOTO, f"format={fmt}&w=200")
    assert (image.format, got_mime, image.size) == (pil_format, mime, (200, 150))


def test_default_format_follows_the_source_and_png_for_others():
    assert run(encode(halves(), "PNG"))[0].format == "PNG"
    assert run(encode(halves(), "WEBP"))[0].format == "WEBP"
    assert run(encode(halves(), "GIF"))[0].format == "PNG"
    assert run(encode(halves(), "BMP"))[0].format == "PNG"


def test_quality_changes_the_jpeg():
    low = run(PHOTO, "quality=10")[2]
    high = run(PHOTO, "quality=95")[2]
    assert len(low) * 3 < len(high)


def test_rotate_is_clockwise_and_flips_mirror():
    source = encode(halves(), "PNG")
    rotated, _, _ = run(source, "rotate=90")
    assert rotated.size == (100, 200)
    assert near(rotated.getpixel((50, 10)), (255, 0, 0)) and near(rotated.getpixel((50, 190)), (0, 0, 255))
    flipped, _, _ = run(source, "flip=h")
    assert near(flipped.getpixel((10, 50)), (0, 0, 255)) and near(flipped.getpixel((190, 50)), (255, 0, 0))
    top_red = Image.new("RGB", (100, 100), (0, 0, 255))
    top_red.paste((255, 0, 0), (0, 0, 100, 50))
    flipped, _, _ = run(encode(top_red, "PNG"), "flip=v")
    assert near(flipped.getpixel((50, 90)), (255, 0, 0)) and near(flipped.getpixel((50, 10)), (0, 0, 255))


def test_grayscale_blur_sharpen():
    image, _, _ = run(PHOTO, "grayscale")
    assert image.mode == "L" and image.size == (800, 600)
    original = Image.open(io.BytesIO(PHOTO)).convert("RGB")
    for query in ("blur=3", "sharpen"):
        image, _, _ = run(PHOTO, query + "&format=png")
        assert image.size == original.size
        assert image.convert("RGB").tobytes() != original.tobytes()
    edge = halves()  # a blur softens the edge between the halves
    blurred, _, _ = run(encode(edge, "PNG"), "blur=5")
    assert blurred.getpixel((99, 50)) not in ((255, 0, 0), (0, 0, 255))


def half_transparent(size=(40, 30)):
    """Left half fully transparent red (a colour nobody should see), right half opaque blue."""
    image = Image.new("RGBA", size, (255, 0, 0, 0))
    image.paste((0, 0, 255, 255), (size[0] // 2, 0, size[0], size[1]))
    return image


def palette_half_transparent(size=(40, 30)):
    """half_transparent() as a palette image: entry 0, red, is the transparent one."""
    image = Image.new("P", size, 0)
    image.putpalette([255, 0, 0, 0, 0, 255])
    image.paste(1, (size[0] // 2, 0, size[0], size[1]))
    return image


def colour_keyed(mode):
    """halves() in mode, saved as PNG with its left half's value as the transparent colour (tRNS): opened as
    that mode with info['transparency']."""
    if mode == "I;16":
        image = Image.new("I;16", (40, 30), 40000)  # 16-bit grey: the key is a 16-bit value
        image.paste(1000, (0, 0, 20, 30))
    else:
        image = halves((40, 30)).convert(mode)
    return encode(image, "PNG", transparency=image.getpixel((0, 0)))


MODE_SOURCES = {  # one source per decoded mode, 40x30
    "1": encode(halves((40, 30)).convert("1"), "PNG"),
    "L": encode(halves((40, 30)).convert("L"), "PNG"),
    "LA": encode(halves((40, 30)).convert("LA"), "PNG"),
    "P": encode(halves((40, 30)), "GIF"),
    "P with transparency": encode(palette_half_transparent(), "PNG", transparency=0),
    "L with transparency": colour_keyed("L"),
    "RGB with transparency": colour_keyed("RGB"),
    "I;16 with transparency": colour_keyed("I;16"),
    "RGB": encode(halves((40, 30)), "BMP"),
    "RGBA": encode(half_transparent(), "WEBP", lossless=True),
    "I;16": encode(Image.new("I;16", (40, 30), 40000), "PNG"),
    "CMYK": encode(halves((40, 30)).convert("CMYK"), "JPEG"),
}


@pytest.mark.parametrize("mode", MODE_SOURCES)
def test_every_source_mode_takes_every_op_and_format(mode):
    source = MODE_SOURCES[mode]
    assert Image.open(io.BytesIO(source)).mode == mode.split()[0]
    for query, size in (("blur=2", (40, 30)), ("sharpen", (40, 30)), ("w=20", (20, 15)), ("grayscale&rotate=90", (30, 40)),
                        ("w=50&h=50&fit=contain&blur=1&sharpen", (50, 50))):
        for fmt in ("jpeg", "png", "webp"):
            image, _, _ = run(source, f"{query}&format={fmt}")
            assert image.size == size, (query, fmt)


@pytest.mark.parametrize("query", ["format=jpeg", "format=webp", "grayscale&format=jpeg", "w=20",
                                   "blur=1&format=png"])
def test_16_bit_greyscale_keeps_its_grey(query):
    image, _, _ = run(MODE_SOURCES["I;16"], query)  # 40000 of 65535: 61 % grey, not white
    assert abs(image.convert("L").getpixel((10, 10)) - 40000 // 256) <= 2


TRANSPARENT_SOURCES = {
    "RGBA": encode(half_transparent(), "PNG"),
    "LA": encode(half_transparent().convert("LA"), "PNG"),
    "P": encode(palette_half_transparent(), "PNG", transparency=0),
    "GIF": encode(palette_half_transparent(), "GIF", transparency=0),
    "RGB colour key": colour_keyed("RGB"),
    "L colour key": colour_keyed("L"),
    "I;16 colour key": colour_keyed("I;16"),
}


@pytest.mark.parametrize("source", TRANSPARENT_SOURCES)
@pytest.mark.parametrize("query", ["format=jpeg", "w=20&format=jpeg", "grayscale&format=jpeg"])
def test_transparent_pixels_become_white_in_jpeg(source, query):
    image, _, _ = run(TRANSPARENT_SOURCES[source], query)
    left, right = image.convert("RGB").getpixel((2, 5)), image.convert("RGB").getpixel((image.width - 3, 5))
    assert near(left, (255, 255, 255), 10)  # not the hidden red
    assert not near(right, (255, 255, 255), 10)  # the opaque half stays


@pytest.mark.parametrize("mode", ["RGB", "L", "I;16"])
@pytest.mark.parametrize("query", ["format=png", "format=webp", "w=20&format=png", "grayscale&format=png",
                                   "blur=1&format=webp", "w=40&h=40&fit=contain&format=png"])
def test_colour_key_transparency_is_kept(mode, query):
    image, _, _ = run(colour_keyed(mode), query)
    image = image.convert("RGBA")
    top = 15 if "contain" in query else 5  # the picture, 40x30, is letterboxed at rows 5..34
    assert image.getpixel((2, top))[3] == 0 and image.getpixel((image.width - 3, top))[3] == 255
    if "contain" in query:
        assert image.getpixel((20, 1))[3] == 0  # the letterbox too


def test_contain_letterbox_is_white_in_jpeg_and_transparent_in_png():
    source = encode(half_transparent((40, 10)).convert("RGBA"), "PNG")
    image, _, _ = run(source, "w=40&h=40&fit=contain&format=jpeg")
    assert near(image.getpixel((30, 2)), (255, 255, 255), 10)
    image, _, _ = run(source, "w=40&h=40&fit=contain&format=png")
    assert image.getpixel((30, 2))[3] == 0


@pytest.mark.parametrize("orientation, size, top", [(1, (200, 100), None), (6, (100, 200), (255, 0, 0)),
                                                     (8, (100, 200), (0, 0, 255)), (3, (200, 100), None)])
def test_exif_orientation_applied_and_stripped(orientation, size, top):
    exif = Image.Exif()
    exif[0x0112] = orientation
    exif[0x010F] = "gilfree-test-camera"
    source = encode(halves(), "JPEG", exif=exif.tobytes(), quality=95)
    image, _, body = run(source, "")
    assert image.size == size
    if top:  # 6 turns the red left half to the top, 8 the blue right half
        assert near(image.getpixel((50, 10)), top)
    if orientation == 3:  # upside down: red ends on the right
        assert near(image.getpixel((190, 50)), (255, 0, 0))
    assert not image.getexif() and b"gilfree-test-camera" not in body  # metadata stripped


def test_exif_orientation_with_draft_mode_resize():
    exif = Image.Exif()
    exif[0x0112] = 6
    source = samples.photo_jpeg(1, size=(2000, 1000))
    source = encode(Image.open(io.BytesIO(source)), "JPEG", exif=exif.tobytes())
    image, _, _ = run(source, "w=250&h=250&fit=inside")
    assert image.size == (125, 250)


@pytest.mark.parametrize("query", ["w=512&h=512&fit=inside", "w=512&h=512&fit=cover", "w=300", "h=77",
                                   "w=500&h=90&fit=fill", "w=256&h=256&fit=contain", "w=100&h=400&fit=cover"])
def test_draft_decoding_gives_the_same_size_as_full_decoding(query):
    picture = samples.photo(7, size=(2048, 1365))
    from_jpeg, _, _ = run(encode(picture, "JPEG"), query)  # decoded shrunk (draft mode)
    from_png, _, _ = run(encode(picture, "PNG"), query)  # decoded whole
    assert from_jpeg.size == from_png.size
    assert from_jpeg.size[0] * 2 < 2048  # the case draft mode exists for


@pytest.mark.parametrize("size, query, fmt", [
    ((20000, 10), "format=webp", "webp"),  # WebP: 16383 a side
    ((70000, 4), "format=jpeg", "jpeg"),  # JPEG: 65500
    ((2000, 10), "h=100&format=webp", "webp"),
])
def test_output_over_the_format_limit_is_422(size, query, fmt):
    with pytest.raises(ImageError) as caught:
        run(encode(Image.new("RGB", size), "PNG"), query)
    assert (caught.value.status, caught.value.error) == (422, "output_too_large") and fmt in caught.value.detail


@pytest.mark.parametrize("size, query, output", [
    ((20000, 10), "format=png", (20000, 10)),  # PNG has no such limit
    ((2000, 10), "h=100&format=png", (20000, 100)),
    ((70000, 4), "format=webp&w=16383", (16383, 1)),
])
def test_output_within_the_format_limit(size, query, output):
    assert run(encode(Image.new("RGB", size), "PNG"), query)[0].size == output


def test_mpo_is_a_jpeg(monkeypatch):
    from PIL import JpegImagePlugin

    picture = samples.photo(8, size=(800, 600))
    source = encode(picture, "MPO", save_all=True, append_images=[picture])
    assert Image.open(io.BytesIO(source)).format == "MPO"
    drafts = []
    draft = JpegImagePlugin.JpegImageFile.draft
    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", lambda self, *args: drafts.append(args) or draft(self, *args))
    image, mime, _ = run(source, "w=100")
    assert (image.format, mime, image.size) == ("JPEG", "image/jpeg", (100, 75))  # JPEG stays JPEG
    assert drafts  # decoded shrunk, as JPEGs are


def icc_profile(space):
    """sRGB's profile with the colour space of its header (bytes 16-19) set to space."""
    from PIL import ImageCms

    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    return srgb[:16] + space + srgb[20:]


@pytest.mark.parametrize("source_mode, space, query, kept", [
    ("RGB", b"RGB ", "w=50", True),
    ("RGB", b"RGB ", "format=png", True),
    ("RGB", b"RGB ", "format=webp", True),
    ("RGB", b"RGB ", "grayscale", False),  # an RGB profile on grey pixels
    ("RGB", b"RGB ", "grayscale&format=png", False),
    ("L", b"GRAY", "", True),
    ("L", b"GRAY", "format=webp", False),  # WebP is RGB
    ("CMYK", b"CMYK", "w=50", True),
    ("CMYK", b"CMYK", "format=png", False),  # converted to RGB
])
def test_icc_profile_kept_only_on_its_colour_space(source_mode, space, query, kept):
    profile = icc_profile(space)
    source = encode(halves().convert(source_mode), "JPEG", icc_profile=profile)
    assert run(source, query)[0].info.get("icc_profile") == (profile if kept else None)


@pytest.mark.parametrize("query", ["", "w=20", "format=png", "format=webp"])
def test_jpeg_comment_stripped(query):
    source = encode(halves(), "JPEG", comment=b"internal: shot at 12 Secret St")
    image, _, body = run(source, query)
    assert b"Secret" not in body and "comment" not in image.info


@pytest.mark.parametrize("query, name", [
    ("zoom=2", "zoom"), ("w=0", "w"), ("w=abc", "w"), ("h=99999", "h"), ("fit=stretch", "fit"),
    ("crop=1,2,3", "crop"), ("crop=a,b,c,d", "crop"), ("crop=0,0,0,5", "crop"), ("rotate=45", "rotate"),
    ("flip=x", "flip"), ("grayscale=maybe", "grayscale"), ("blur=0", "blur"), ("blur=nan", "blur"),
    ("blur=500", "blur"), ("sharpen=2", "sharpen"), ("format=gif", "format"), ("quality=0", "quality"),
    ("quality=101", "quality"), ("w=10&w=20", "w"), ("w=1_0", "w"), ("w=+10", "w"),
    ("h=\uff11\uff10", "h"), ("w= 10", "w"), ("quality=" + "9" * 5000, "quality"), ("crop=0,0,1_0,5", "crop"),
    ("blur=\u0665", "blur"), ("blur=5_0", "blur"), ("blur= 5", "blur"), ("blur=+5", "blur"), ("blur=1e1", "blur"),
    ("blur=inf", "blur"), ("blur=.", "blur"),
])
def test_bad_ops_name_the_op(query, name):
    with pytest.raises(ImageError) as caught:
        spec(query)
    assert caught.value.status == 400 and f"'{name}'" in caught.value.detail


@pytest.mark.parametrize("size, query, output", [
    ((10000, 2), "w=8000&h=8000&fit=inside", (8000, 2)),  # the w x h box is over the limit, the output is not
    ((2, 10000), "w=16383&h=16383&fit=inside", (3, 16383)),
])
def test_pixel_limit_applies_to_the_output_not_the_box(size, query, output):
    assert run(encode(Image.new("L", size), "PNG"), query + "&format=png")[0].size == output


@pytest.mark.parametrize("query", ["w=8000&h=8000&fit=cover", "w=8000&h=8000&fit=fill", "w=8000&h=8000&fit=contain",
                                   "w=8000&h=8000&fit=inside", "w=16000"])
def test_output_over_the_pixel_limit_is_422(query):
    with pytest.raises(ImageError) as caught:
        run(encode(Image.new("L", (100, 100)), "PNG"), query)
    assert (caught.value.status, caught.value.error) == (422, "output_too_large") and "50000000" in caught.value.detail


def test_blur_takes_ascii_decimals():
    assert [spec(f"blur={v}").blur for v in ("2", "2.5", ".5", "7.", "100")] == [2, 2.5, 0.5, 7, 100]


def test_crop_outside_the_image_is_400():
    with pytest.raises(ImageError) as caught:
        run(PHOTO, "crop=700,0,200,100")
    assert caught.value.status == 400 and "crop" in caught.value.detail


def test_file_over_the_size_limit_is_413(tmp_path):
    path = tmp_path / "photo.jpg"
    path.write_bytes(PHOTO)
    assert ops.transform(str(path), spec("w=10", max_bytes=len(PHOTO)))[2] == 10
    with pytest.raises(ImageError) as caught:
        ops.transform(str(path), spec("w=10", max_bytes=len(PHOTO) - 1))
    assert (caught.value.status, caught.value.error) == (413, "payload_too_large")


def test_errors_pickle_by_name():
    import pickle

    error = pickle.loads(pickle.dumps(ImageError(422, "corrupt_image", "x")))
    assert (error.status, error.error, error.detail) == (422, "corrupt_image", "x")
    assert pickle.loads(pickle.dumps(spec("w=5&crop=0,0,1,1"))) == spec("w=5&crop=0,0,1,1")


# ---------------------------------------------------------------- the service


class Service:
    """python -m gilfree.images in a subprocess, on host (127.0.0.1) with the port the OS picked."""

    def __init__(self, *args, host="127.0.0.1", own_group=False):
        """own_group: in a process group of its own, which stop() signals whole, as a service manager does."""
        self.proc = subprocess.Popen([sys.executable, "-m", "gilfree.images", "--host", host, "--port", "0", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     start_new_session=own_group)
        self.kill = os.killpg if own_group else os.kill
        line = self.proc.stdout.readline()
        match = re.search(r"listening on (http://\S+:(\d+)) ", line)
        if not match:
            self.proc.kill()
            raise RuntimeError(f"service did not start: {line!r} {self.proc.stderr.read()}")
        self.executor = args[args.index("--executor") + 1] if "--executor" in args else "pool"
        self.url = match.group(1)
        self.port = int(match.group(2))

    def stop(self):
        self.kill(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            raise AssertionError("the service did not stop on SIGTERM")
        assert self.proc.returncode == 0, self.proc.stderr.read()


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    base = tmp_path_factory.mktemp("images")
    (base / "root" / "sub").mkdir(parents=True)
    (base / "root" / "sub" / "photo.jpg").write_bytes(PHOTO)
    (base / "secret.jpg").write_bytes(PHOTO)  # outside the root
    (base / "root" / "escape.jpg").symlink_to(base / "secret.jpg")
    (base / "root" / "inside-link.jpg").symlink_to(base / "root" / "sub" / "photo.jpg")
    (base / "root" / "notes.txt").write_text("not an image")
    with open(base / "root" / "huge.jpg", "wb") as f:
        f.truncate(26 << 20)  # over the default 25 MB limit, sparse
    return base / "root"


@pytest.fixture(scope="module", params=["pool", "threads", "mp"])
def service(request, root):
    server = Service("--executor", request.param, "--workers", "2", "--root", str(root))
    yield server
    server.stop()


@pytest.fixture(scope="module", params=["pool", "threads"])
def strict(request):
    """One worker, one queue slot, a 1 s budget, 1 MB bodies, 30 MP: the limits within reach."""
    server = Service("--executor", request.param, "--workers", "1", "--max-queue", "1", "--budget", "1", "--max-body-mb", "1",
                     "--max-megapixels", "30")
    yield server
    server.stop()


@pytest.fixture
async def local(root):
    """The service in the test's own process (threads executor), so a test can patch what the workers call:
    (url, port)."""
    from gilfree.images import Config
    from gilfree.images.server import make_runner

    runner = make_runner(Config(workers=1, executor="threads", worker_nice=0, root=str(root)))
    await runner.setup()
    site = aiohttp.web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield f"http://127.0.0.1:{port}", port
    await runner.cleanup()


async def post(url, body, query="", content_type="image/jpeg"):
    """(status, headers, body bytes) of POST /v1/transform."""
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{url}/v1/transform?{query}", data=body, headers={"Content-Type": content_type}) as r:
            return r.status, r.headers, await r.read()


async def get(url, path):
    async with aiohttp.ClientSession() as session:
        async with session.get(url + path) as r:
            return r.status, r.headers, await r.read()


async def raw(port, request_bytes):
    """Sends bytes as they are (no client-side path normalising); returns (status, headers+body text)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request_bytes)
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        return int(head.split()[1]), head.decode("latin-1")
    finally:
        writer.close()


async def answer(reader):
    """(status, head, body) of the next response on a raw connection."""
    head = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)).decode("latin-1")
    length = re.search(r"^Content-Length: (\d+)", head, re.M | re.I)
    body = await reader.readexactly(int(length.group(1))) if length else b""
    return int(head.split()[1]), head, body


async def stalled_upload(port, query=""):
    """A POST that sends 100 bytes of its 4420 and stops; returns (reader, writer) once its handler reads the body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"POST /v1/transform?{query} HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
                 "Content-Length: 4420\r\nExpect: 100-continue\r\n\r\n".encode())
    status, head, _ = await answer(reader)
    assert status == 100, head
    writer.write(bytes(100))
    return reader, writer


def error_of(status, body, expected_status, expected_error):
    import json

    payload = json.loads(body)
    assert set(payload) == {"error", "detail"}, payload
    assert (status, payload["error"]) == (expected_status, expected_error), payload
    return payload["detail"]


async def metrics(url):
    _, _, body = await get(url, "/metrics")
    return body.decode()


def metric(text, name):
    match = re.search(rf"^gilfree_images_{re.escape(name)} (\S+)$", text, re.M)
    return float(match.group(1)) if match else None


def gil_accounting_available():
    try:
        from gilfree import gil

        gil.counters()
    except (ImportError, UnsupportedInterpreter):
        return False
    gil.stop()
    return True


async def test_post_roundtrip_each_format(service):
    for fmt, magic in (("jpeg", b"\xff\xd8\xff"), ("png", b"\x89PNG"), ("webp", b"RIFF")):
        status, headers, body = await post(service.url, PHOTO, f"w=200&format={fmt}&quality=80")
        assert status == 200 and headers["Content-Type"] == f"image/{fmt}" and body.startswith(magic)
        assert Image.open(io.BytesIO(body)).size == (200, 150) and headers["X-Image-Size"] == "200x150"


async def test_get_under_root_and_confinement(service):
    status, _, body = await get(service.url, "/v1/transform/sub/photo.jpg?w=100&h=100&fit=inside")
    assert status == 200 and Image.open(io.BytesIO(body)).size == (100, 75)
    status, _, _ = await get(service.url, "/v1/transform/inside-link.jpg?w=10")
    assert status == 200  # a symlink that stays inside the root is fine
    for path in ("/v1/transform/escape.jpg", "/v1/transform/sub/../../secret.jpg",
                 "/v1/transform/%2e%2e/secret.jpg", "/v1/transform/sub/%2E%2E/%2E%2E/secret.jpg",
                 "/v1/transform//etc/passwd", "/v1/transform/%2Fetc%2Fpasswd", "/v1/transform/missing.jpg",
                 "/v1/transform/sub", "/v1/transform/sub/%00.jpg", "/v1/transform/sub/photo.jpg/",
                 "/v1/transform/sub//photo.jpg"):
        status, head = await raw(service.port, f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        assert status == 404, (path, head)
    status, _, body = await get(service.url, "/v1/transform/notes.txt")
    error_of(status, body, 415, "unsupported_media_type")


async def test_unreadable_file_is_404_and_errors_name_no_server_path(local, root, monkeypatch, caplog):
    url, _ = local
    def denied(path, *args):
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(ops, "open", denied, raising=False)  # as root, chmod 0 would not stop the read
    status, _, body = await get(url, "/v1/transform/sub/photo.jpg")
    assert str(root) not in error_of(status, body, 404, "not_found")

    def failing(source, spec):
        raise OSError(5, "Input/output error", source)

    monkeypatch.setattr(ops, "transform", failing)  # any unexpected error
    status, _, body = await get(url, "/v1/transform/sub/photo.jpg")
    assert str(root) not in error_of(status, body, 500, "internal_error")
    assert str(root) in caplog.text  # the log has it


async def conditional_get(url, path, **headers):
    async with aiohttp.ClientSession() as session:
        async with session.get(url + path, headers=headers) as r:
            return r.status, r.headers, await r.read()


async def test_get_answers_can_be_cached_and_revalidated_without_a_transform(local, root, monkeypatch):
    url, _ = local
    (root / "cached.jpg").write_bytes(PHOTO)
    written = os.stat(root / "cached.jpg")
    os.utime(root / "cached.jpg", ns=(written.st_atime_ns, written.st_mtime_ns - 5_000_000_000))  # not this second
    transforms = []
    real_transform = ops.transform

    def counted(source, spec):
        transforms.append(spec)
        return real_transform(source, spec)

    monkeypatch.setattr(ops, "transform", counted)
    path = "/v1/transform/cached.jpg?w=50"
    status, headers, body = await conditional_get(url, path)
    assert status == 200 and Image.open(io.BytesIO(body)).size == (50, 38)
    assert headers["Cache-Control"] == "public, max-age=3600"
    etag, last_modified = headers["ETag"], headers["Last-Modified"]
    assert re.fullmatch(r'W/"[0-9a-f]+"', etag), etag
    assert last_modified == email.utils.formatdate(os.stat(root / "cached.jpg").st_mtime, usegmt=True)

    for condition in ({"If-None-Match": etag}, {"If-None-Match": f'"other", {etag}'}, {"If-None-Match": "*"},
                      {"If-Modified-Since": last_modified}):
        status, headers, body = await conditional_get(url, path, **condition)
        assert (status, body, headers["ETag"], headers["Last-Modified"]) == (304, b"", etag, last_modified), condition
    assert len(transforms) == 1  # a 304 costs a stat, not a worker

    older = email.utils.formatdate(os.stat(root / "cached.jpg").st_mtime - 60, usegmt=True)
    status, headers, _ = await conditional_get(url, path, **{"If-Modified-Since": older})
    assert status == 200
    status, headers, _ = await conditional_get(url, path, **{"If-None-Match": '"other"', "If-Modified-Since": last_modified})
    assert status == 200  # If-None-Match decides when present
    status, headers, _ = await conditional_get(url, "/v1/transform/cached.jpg?w=60", **{"If-None-Match": etag})
    assert status == 200 and headers["ETag"] != etag  # other ops, another output

    stat_before = os.stat(root / "cached.jpg")
    os.utime(root / "cached.jpg", ns=(stat_before.st_atime_ns, stat_before.st_mtime_ns + 1))  # the file changed
    status, headers, _ = await conditional_get(url, path, **{"If-None-Match": etag})
    assert status == 200 and headers["ETag"] != etag
    assert len(transforms) == 5

    status, headers, body = await conditional_get(url, "/v1/transform/notes.txt")
    error_of(status, body, 415, "unsupported_media_type")
    assert "ETag" not in headers and "Cache-Control" not in headers  # errors are not to be cached
    assert 'gilfree_images_requests_total{status="304"} 4' in await metrics(url)


async def test_if_modified_since_answers_304_only_for_a_date_no_later_file_can_share(local, root):
    url, _ = local
    path = "/v1/transform/fresh.jpg?w=10"
    (root / "fresh.jpg").write_bytes(PHOTO)
    # Modified in a second not yet over (a replacement later in it would share its date); set
    # ahead, so that the test does not depend on when in a second it runs.
    now = time.time()
    os.utime(root / "fresh.jpg", (now + 30, now + 30))
    this_second = email.utils.formatdate(now + 30, usegmt=True)
    status, headers, _ = await conditional_get(url, path)
    assert status == 200 and headers["ETag"] and "Last-Modified" not in headers
    status, _, _ = await conditional_get(url, path, **{"If-Modified-Since": this_second})
    assert status == 200  # not a 304 for a file that may have been replaced after that date was sent

    os.utime(root / "fresh.jpg", (now - 5, now - 5))
    status, headers, _ = await conditional_get(url, path)
    last_modified = headers["Last-Modified"]
    assert status == 200 and email.utils.parsedate_to_datetime(last_modified).timestamp() == int(now - 5)
    status, _, _ = await conditional_get(url, path, **{"If-Modified-Since": last_modified})
    assert status == 304
    future = email.utils.formatdate(time.time() + 3600, usegmt=True)
    status, _, _ = await conditional_get(url, path, **{"If-Modified-Since": future})
    assert status == 200  # a date later than now is ignored, not taken as newer than the file
    status, _, _ = await conditional_get(url, path, **{"If-Modified-Since": last_modified, "If-None-Match": '"other"'})
    assert status == 200  # If-None-Match decides when present


async def test_cache_max_age_0_has_caches_revalidate_every_time(root):
    from gilfree.images import Config
    from gilfree.images.server import make_runner

    runner = make_runner(Config(workers=1, executor="threads", worker_nice=0, root=str(root), cache_max_age=0))
    await runner.setup()
    site = aiohttp.web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        status, headers, _ = await get(f"http://127.0.0.1:{runner.addresses[0][1]}", "/v1/transform/sub/photo.jpg?w=10")
        assert (status, headers["Cache-Control"]) == (200, "no-cache") and headers["ETag"]
    finally:
        await runner.cleanup()


async def test_get_of_a_file_over_the_body_limit_is_413(local):
    url, _ = local
    status, _, body = await get(url, "/v1/transform/huge.jpg?w=10")
    error_of(status, body, 413, "payload_too_large")


async def test_unreadable_body_is_400_and_a_client_leaving_is_no_500(local, caplog):
    url, port = local
    garbage = b"not gzip at all" * 10
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /v1/transform HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Encoding: gzip\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(garbage), garbage))
    status, _, body = await answer(reader)
    error_of(status, body, 400, "bad_request")
    writer.close()
    _, writer = await stalled_upload(port)
    writer.transport.abort()  # gone mid-body
    await wait_for_metric(url, 'requests_total{status="499"}', 1)
    text = await metrics(url)
    assert metric(text, 'requests_total{status="500"}') is None and "unexpected error" not in caplog.text


def content_encoded(data, encoding):
    if encoding == "deflate":
        return zlib.compress(data)
    if encoding == "raw deflate":  # no zlib header, as some clients send it
        compressor = zlib.compressobj(wbits=-zlib.MAX_WBITS)
        return compressor.compress(data) + compressor.flush()
    return gzip.compress(data)


async def post_encoded(port, body, encoding, query="w=10"):
    """(status, head, body) of a POST whose body is sent as it is, with Content-Encoding: encoding."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"POST /v1/transform?{query} HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
                 f"Content-Encoding: {encoding}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    try:
        return await answer(reader)
    finally:
        writer.close()


@pytest.mark.parametrize("encoding", ["gzip", "x-gzip", "deflate", "raw deflate"])
async def test_gzip_and_deflate_bodies_are_decoded(local, encoding):
    _, port = local
    status, _, body = await post_encoded(port, content_encoded(PHOTO, encoding), encoding.split()[-1])
    assert status == 200 and Image.open(io.BytesIO(body)).width == 10


async def test_other_content_encodings_are_415_json_and_counted(local, caplog):
    url, port = local
    for encoding in ("br", "zstd", "gzip, br", "compress"):
        status, _, body = await post_encoded(port, PHOTO, encoding)
        assert encoding in error_of(status, body, 415, "unsupported_media_type")
    assert metric(await metrics(url), 'requests_total{status="415"}') == 4
    assert "Traceback" not in caplog.text and "install" not in caplog.text


def test_encoded_body_decodes_within_the_limit():
    import dataclasses

    def decode(body, limit=1 << 20):
        return ops.transform(body, dataclasses.replace(spec("w=10", max_bytes=limit), encoding="gzip"))

    assert decode(gzip.compress(PHOTO))[2] == 10
    bomb = gzip.compress(bytes(2 << 20))  # 2 KB that decode to 2 MB
    for body, status, error in ((bomb, 413, "payload_too_large"), (gzip.compress(PHOTO)[:-20], 400, "bad_request"),
                                (b"not gzip" * 10, 400, "bad_request")):
        with pytest.raises(ImageError) as caught:
            decode(body)
        assert (caught.value.status, caught.value.error) == (status, error)


async def test_malformed_http_is_aiohttps_own_400_in_one_log_line(local, caplog):
    _, port = local
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /v1/transform HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
                 b"Transfer-Encoding: chunked\r\n\r\nZZ\r\n")
    status, head, _ = await answer(reader)
    assert status == 400 and "text/plain" in head  # as documented: aiohttp answers before any handler runs
    writer.close()
    assert "chunk size" in caplog.text and "Traceback" not in caplog.text


async def test_a_client_leaving_during_processing_is_499_and_its_queued_task_never_runs(local, monkeypatch):
    import threading

    url, port = local
    release, ran = threading.Event(), []

    def blocking(source, spec):
        ran.append(spec.w)
        release.wait(30)
        return b"x", "image/png", 1, 1

    monkeypatch.setattr(ops, "transform", blocking)
    try:
        writers = []
        for width in (1, 2):  # the first runs on the one worker, the second waits for it
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(f"GET /v1/transform/sub/photo.jpg?w={width} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            writers.append(writer)
            await wait_for_metric(url, "in_flight", width)
        for writer in writers:
            writer.transport.abort()
        await wait_for_metric(url, 'requests_total{status="499"}', 2)
    finally:
        release.set()
    await wait_for_metric(url, "busy_workers", 0)
    text = await metrics(url)
    assert ran == [1] and metric(text, 'requests_total{status="200"}') is None and metric(text, "in_flight") == 0


async def test_service_applies_exif_orientation(service):
    exif = Image.Exif()
    exif[0x0112] = 6
    status, _, body = await post(service.url, encode(halves(), "JPEG", exif=exif.tobytes()))
    image = Image.open(io.BytesIO(body))
    assert status == 200 and image.size == (100, 200) and not image.getexif()


async def test_bad_input_corpus(service):
    jpeg = samples.photo_jpeg(2, size=(640, 480))
    png = encode(samples.photo(3, size=(320, 240)), "PNG")
    rng = random.Random(5)
    cases = [
        (jpeg[: len(jpeg) // 2], "image/jpeg", 422, "corrupt_image"),
        (jpeg[:400], "image/jpeg", 422, "corrupt_image"),
        (png[: len(png) // 2], "image/png", 422, "corrupt_image"),
        (png[:60], "image/png", 422, "corrupt_image"),
        (bytes(rng.randrange(256) for _ in range(5000)), "image/jpeg", 415, "unsupported_media_type"),
        (b"", "image/png", 415, "unsupported_media_type"),
        (png_declaring(100_000, 100_000), "image/png", 422, "too_many_pixels"),
        (jpeg, "text/plain", 415, "unsupported_media_type"),
        (jpeg, "application/json", 415, "unsupported_media_type"),
        (encode(halves(), "TIFF"), "image/tiff", 415, "unsupported_media_type"),
        (b"GIF89a" + bytes(20), "image/gif", 422, "corrupt_image"),
    ]
    for body, content_type, status, error in cases:
        got = await post(service.url, body, "w=50", content_type)
        error_of(got[0], got[2], status, error)
    status, _, body = await post(service.url, jpeg, "w=64")  # still up and right
    assert status == 200 and Image.open(io.BytesIO(body)).width == 64


async def test_unknown_op_and_bad_value_are_400_naming_it(service):
    status, _, body = await post(service.url, PHOTO, "w=10&resize=2")
    assert "resize" in error_of(status, body, 400, "unknown_op")
    status, _, body = await post(service.url, PHOTO, "fit=squash")
    assert "'fit'" in error_of(status, body, 400, "bad_value")
    status, _, body = await get(service.url, "/v1/transform/sub/photo.jpg?quality=900")
    assert "'quality'" in error_of(status, body, 400, "bad_value")


async def test_routing_errors_are_json(service):
    status, _, body = await get(service.url, "/nowhere")
    error_of(status, body, 404, "not_found")
    async with aiohttp.ClientSession() as session:
        async with session.put(f"{service.url}/v1/transform") as r:
            error_of(r.status, await r.read(), 405, "method_not_allowed")
            assert "POST" in r.headers["Allow"]


async def test_100_concurrent_requests_all_correct(service):
    sources = [encode(samples.photo(seed, size=(320, 240)), "JPEG", quality=80) for seed in range(5)]

    async def one(session, i):
        width = 20 + i  # distinct per request: a mixed-up answer shows
        async with session.post(f"{service.url}/v1/transform?w={width}&format=png",
                                data=sources[i % 5], headers={"Content-Type": "image/jpeg"}) as r:
            body = await r.read()
            return r.status, Image.open(io.BytesIO(body)).size if r.status == 200 else body

    connector = aiohttp.TCPConnector(limit=100)
    async with aiohttp.ClientSession(connector=connector) as session:
        results = await asyncio.gather(*(one(session, i) for i in range(100)))
    assert results == [(200, (20 + i, round((20 + i) * 3 / 4))) for i in range(100)]
    text = await metrics(service.url)
    assert metric(text, 'requests_total{status="200"}') >= 100 and metric(text, "in_flight") == 0
    if service.executor == "pool":  # bodies and results went through the pool's shared memory
        assert metric(text, 'transferred_bytes_total{direction="in"}') > sum(map(len, sources)) * 20
        assert metric(text, 'transferred_bytes_total{direction="out"}') > 0


def tree_task_niceness(pid):
    """{tid: niceness} of every thread of pid and of its descendants (/proc stat field 19)."""
    parents = {}
    for stat in os.listdir("/proc"):
        if stat.isdigit():
            try:
                with open(f"/proc/{stat}/stat") as f:
                    parents[int(stat)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                pass
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(child for child, parent in parents.items() if parent == current)
    niceness = {}
    for process in tree:
        for tid in os.listdir(f"/proc/{process}/task"):
            with open(f"/proc/{process}/task/{tid}/stat") as f:
                niceness[int(tid)] = int(f.read().rsplit(")", 1)[1].split()[16])
    return niceness


async def test_workers_run_nicer_than_the_front(service, root):
    status, _, _ = await get(service.url, "/v1/transform/sub/photo.jpg?w=16")
    assert status == 200  # a worker exists and ran a task
    niceness = tree_task_niceness(service.proc.pid)
    front = niceness[service.proc.pid]  # the event loop's thread
    assert front == os.getpriority(os.PRIO_PROCESS, os.getpid())  # the service's own, inherited
    assert list(niceness.values()).count(front + 10) >= 1  # the default --worker-nice


async def test_health_and_metrics(service):
    status, headers, body = await get(service.url, "/health")
    assert status == 200 and body == b'{"status": "ok"}'
    text = await metrics(service.url)
    for name in ("requests_total", "request_duration_seconds", "queue_depth", "busy_workers",
                 "worker_restarts_total", "in_flight", "workers"):
        assert f"# TYPE gilfree_images_{name} " in text
    assert metric(text, "workers") == 2
    # The GIL series are there exactly when gilfree.gil can account on this interpreter.
    held = metric(text, "gil_held_fraction")
    assert (held is not None) == gil_accounting_available(), text
    if held is not None:
        assert 0 <= held <= 1 and metric(text, "gil_held_seconds_total") > 0
    assert metric(text, 'request_duration_seconds_bucket{le="+Inf"}') == metric(text, "request_duration_seconds_count")


async def test_body_limit_413_before_reading_it_all(strict):
    # Headers promise 100 MB; only 1 KB is sent: the answer must come without the rest.
    status, head = await raw(strict.port, b"POST /v1/transform HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
                                          b"Content-Length: 104857600\r\n\r\n" + bytes(1024))
    assert status == 413, head
    big = encode(samples.photo(4, size=(1200, 900)), "PNG")  # > 1 MB
    assert len(big) > 1 << 20
    status, _, body = await post(strict.url, big, content_type="image/png")
    error_of(status, body, 413, "payload_too_large")

    async def chunks():  # no Content-Length: the limit applies while streaming
        for start in range(0, len(big), 65536):
            yield big[start:start + 65536]

    status, _, body = await post(strict.url, chunks(), content_type="image/png")
    error_of(status, body, 413, "payload_too_large")


async def test_refused_body_closes_the_connection(strict):
    reader, writer = await asyncio.open_connection("127.0.0.1", strict.port)
    writer.write(b"POST /v1/transform HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
                 b"Content-Length: 104857600\r\n\r\n" + bytes(1024))
    status, head, body = await answer(reader)
    error_of(status, body, 413, "payload_too_large")
    assert "connection: close" in head.lower()
    with pytest.raises(ConnectionError):  # reset once the service closed: it does not take the rest in
        for _ in range(64):  # aiohttp's own 10 s drain took in all 64 MB
            writer.write(bytes(1 << 20))
            await asyncio.wait_for(writer.drain(), 10)
    writer.close()


async def test_expect_100_continue_comes_after_the_checks(strict):
    async def ask(query, headers):
        reader, writer = await asyncio.open_connection("127.0.0.1", strict.port)
        writer.write(f"POST /v1/transform?{query} HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n{headers}\r\n".encode())
        return reader, writer, await answer(reader)

    for query, headers, expected in (("", "Content-Type: image/jpeg\r\nContent-Length: 104857600\r\n", 413),
                                     ("", "Content-Type: text/plain\r\nContent-Length: 100\r\n", 415),
                                     ("zoom=2", "Content-Type: image/jpeg\r\nContent-Length: 100\r\n", 400)):
        _, writer, (status, head, _) = await ask(query, headers)
        assert status == expected, head  # not 100: the body is not wanted
        writer.close()
    reader, writer, (status, head, _) = await ask("w=10", f"Content-Type: image/jpeg\r\nContent-Length: {len(PHOTO)}\r\n")
    assert status == 100, head
    writer.write(PHOTO)
    status, _, body = await answer(reader)
    assert status == 200 and Image.open(io.BytesIO(body)).width == 10
    writer.close()


async def test_pixel_limit_422_from_the_header(strict):
    over = encode(Image.new("RGB", (6000, 6000)), "PNG")  # 36 MP, a small file
    status, _, body = await post(strict.url, over, content_type="image/png")
    assert "36000000 pixels" in error_of(status, body, 422, "too_many_pixels")
    status, _, body = await post(strict.url, png_declaring(40_000, 40_000), content_type="image/png")
    error_of(status, body, 422, "too_many_pixels")
    status, _, _ = await post(strict.url, encode(Image.new("RGB", (5000, 5000)), "PNG"), "w=10", "image/png")
    assert status == 200  # 25 MP is under the 30 MP limit


async def test_budget_504_then_the_service_goes_on(strict):
    started = time.monotonic()
    status, _, body = await post(strict.url, slow_png(5000), SLOW_OPS, "image/png")
    error_of(status, body, 504, "timeout")
    assert time.monotonic() - started < 5
    await wait_for_metric(strict.url, "busy_workers", 0)
    status, _, _ = await post(strict.url, PHOTO, "w=10")
    assert status == 200
    restarts = metric(await metrics(strict.url), "worker_restarts_total")
    # The pool kills and replaces the worker; a thread cannot be stopped and runs the task to its end.
    assert restarts >= 1 if strict.executor == "pool" else restarts == 0


async def test_queue_full_503_with_retry_after(strict):
    slow = slow_png(5000)
    async with aiohttp.ClientSession() as session:
        async def send():
            async with session.post(f"{strict.url}/v1/transform?{SLOW_OPS}", data=slow,
                                    headers={"Content-Type": "image/png"}) as r:
                return r.status

        first = [asyncio.ensure_future(send()) for _ in range(2)]  # one runs, one waits: capacity 2
        await wait_for_metric(strict.url, "in_flight", 2)
        async with session.post(f"{strict.url}/v1/transform", data=PHOTO, headers={"Content-Type": "image/jpeg"}) as r:
            error_of(r.status, await r.read(), 503, "overloaded")
            assert r.headers["Retry-After"] == "1"
        assert sorted(await asyncio.gather(*first)) == [504, 504]  # the 1 s budget ends both
    await wait_for_metric(strict.url, "busy_workers", 0)
    status, _, _ = await post(strict.url, PHOTO, "w=10")
    assert status == 200


async def test_stalled_upload_gives_its_slot_back_at_the_budget(strict):
    stalled = [await stalled_upload(strict.port) for _ in range(2)]  # every slot: one worker, one queued
    for reader, writer in stalled:
        status, head, body = await answer(reader)
        error_of(status, body, 408, "request_timeout")
        assert "close" in head.lower()
        writer.close()
    await wait_for_metric(strict.url, "in_flight", 0)
    status, _, _ = await post(strict.url, PHOTO, "w=10")
    assert status == 200


async def test_sigterm_does_not_wait_for_a_stalled_upload():
    server = Service("--executor", "threads", "--workers", "1", "--budget", "1")
    _, writer = await stalled_upload(server.port)
    server.stop()  # within its 20 s; aiohttp's own shutdown would wait 60 s for the handler
    writer.close()


async def test_an_answer_not_taken_in_within_the_budget_is_cut_off_and_a_stop_waits_no_longer():
    noise = Image.frombytes("RGB", (1500, 1500), random.Random(9).randbytes(1500 * 1500 * 3))
    big = encode(noise, "PNG")  # its PNG answer, 6.7 MB, is more than both sockets' buffers take
    budget = 3
    server = Service("--executor", "threads", "--workers", "1", "--budget", str(budget))

    async def unread():
        sock = socket.create_connection(("127.0.0.1", server.port))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        _, writer = await asyncio.open_connection(sock=sock)
        writer.write(b"POST /v1/transform?format=png HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(big), big))
        return writer

    writers = [await unread()]
    try:
        await wait_for_metric(server.url, 'requests_total{status="504"}', 1)  # counted 200 before its write
        assert metric(await metrics(server.url), 'requests_total{status="200"}') is None
        writers.append(await unread())
        await asyncio.sleep(1)  # processed, or nearly: either way its answer is due by its arrival + budget
        started = time.monotonic()
    finally:
        server.stop()
    assert time.monotonic() - started < 1.5 * budget  # twice the budget: aiohttp waited for the write, then again
    for writer in writers:
        writer.transport.abort()


async def test_a_client_leaving_during_its_answer_is_499():
    noise = Image.frombytes("RGB", (1500, 1500), random.Random(9).randbytes(1500 * 1500 * 3))
    big = encode(noise, "PNG")
    server = Service("--executor", "threads", "--workers", "1")
    try:
        sock = socket.create_connection(("127.0.0.1", server.port))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        _, writer = await asyncio.open_connection(sock=sock)
        writer.write(b"POST /v1/transform?format=png HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(big), big))
        await wait_for_metric(server.url, "in_flight", 1)
        await wait_for_metric(server.url, "in_flight", 0)  # processed: its answer is being written
        writer.transport.abort()
        await wait_for_metric(server.url, 'requests_total{status="499"}', 1)
        assert metric(await metrics(server.url), 'requests_total{status="200"}') is None
    finally:
        server.stop()


async def test_mp_executor_stops_on_sigterm_to_its_process_group():
    server = Service("--executor", "mp", "--workers", "2", own_group=True)
    status, _, _ = await post(server.url, PHOTO, "w=10")
    assert status == 200  # the workers are up, one waiting on the task queue holds its lock
    server.stop()  # the workers take no signal meant for the server; Pool.terminate() stops them


async def test_ipv6_host():
    try:
        socket.create_server(("::1", 0), family=socket.AF_INET6).close()
    except OSError:
        pytest.skip("no IPv6 loopback here")
    server = Service("--executor", "threads", "--workers", "1", host="::1")
    try:
        assert server.url == f"http://[::1]:{server.port}"
        status, _, body = await get(server.url, "/health")
        assert status == 200
    finally:
        server.stop()


async def closed_by_server(reader, timeout=10):
    """Seconds until the server closes a connection it answered nothing on."""
    started = time.monotonic()
    assert await asyncio.wait_for(reader.read(), timeout) == b""
    return time.monotonic() - started


async def test_head_timeout_closes_incomplete_heads_and_idle_keepalive():
    server = Service("--executor", "threads", "--workers", "1", "--head-timeout", "1")
    try:
        connections = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(4)]
        for i, (_, writer) in enumerate(connections[1:]):  # the first sends nothing, the others half a head
            writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n"[: 10 + 10 * i])
        status, _, _ = await get(server.url, "/health")
        assert status == 200
        waits = await asyncio.gather(*(closed_by_server(reader) for reader, _ in connections))
        assert all(wait < 3 for wait in waits), waits
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await answer(reader))[0] == 200
        assert await closed_by_server(reader) < 3  # idle after its answer: the same timer
        for _, writer in [*connections, (reader, writer)]:
            writer.close()
    finally:
        server.stop()


async def test_running_out_of_descriptors_is_one_log_line():
    import resource

    server = Service("--executor", "threads", "--workers", "1", "--head-timeout", "1")
    try:
        in_use = len(os.listdir(f"/proc/{server.proc.pid}/fd"))
        hard = resource.prlimit(server.proc.pid, resource.RLIMIT_NOFILE)[1]
        resource.prlimit(server.proc.pid, resource.RLIMIT_NOFILE, (in_use + 3, hard))
        connections = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(10)]
        for _, writer in connections:
            writer.write(b"GET /health HTTP/1.1\r\n")
        await asyncio.sleep(1.5)  # accept() fails with EMFILE until the head timeout frees descriptors
        await asyncio.gather(*(closed_by_server(reader, 20) for reader, _ in connections))
        status, _, _ = await get(server.url, "/health")
        assert status == 200
        for _, writer in connections:
            writer.close()
    finally:
        server.stop()
    log = server.proc.stderr.read()
    assert log.count("Too many open files") == 1 and "Traceback" not in log, log[:2000]


async def test_out_of_descriptors_accept_is_retried_once_a_second_not_thousands_of_times():
    import errno

    from gilfree.images.server import BACKLOG, listen

    sock = listen("127.0.0.1", 0)
    failing_until = time.monotonic() + 1.5
    failures = []

    class OutOfDescriptors(type(sock)):  # asyncio's server on the service's socket, accept() failing for 1.5 s
        def _accept(self):
            if time.monotonic() < failing_until:
                failures.append(time.monotonic())
                raise OSError(errno.EMFILE, "Too many open files")
            return super()._accept()

    sock = OutOfDescriptors(sock.family, sock.type, sock.proto, sock.detach())
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda loop, context: None)  # asyncio reports each failure: not the point here
    accepted = asyncio.Event()

    class Accepted(asyncio.Protocol):
        def connection_made(self, transport):
            accepted.set()
            transport.close()

    server = await loop.create_server(Accepted, sock=sock, backlog=BACKLOG)
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", sock.getsockname()[1])
        await asyncio.wait_for(accepted.wait(), 5)  # retried after the failures: the client gets in
        writer.close()
    finally:
        server.close()
        loop.set_exception_handler(None)
    assert 1 <= len(failures) <= 3, f"{len(failures)} failed accept() calls in 1.5 s"  # one a second


def test_port_in_use_is_one_line_and_exit_1():
    with socket.create_server(("127.0.0.1", 0)) as taken:
        done = subprocess.run([sys.executable, "-m", "gilfree.images", "--host", "127.0.0.1", "--port",
                               str(taken.getsockname()[1]), "--workers", "1"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and done.stdout == ""  # it never listened, nor started workers
    assert len(done.stderr.splitlines()) == 1 and "in use" in done.stderr, done.stderr


@pytest.mark.parametrize("args", [["--root", "/nonexistent"], ["--root", __file__], ["--max-body-mb", "-1"],
                                  ["--max-megapixels", "0"], ["--budget", "nan"], ["--budget", "inf"],
                                  ["--budget", "-2"], ["--budget", "soon"], ["--host", ""], ["--port", "70000"],
                                  ["--workers", "0"], ["--workers", "1025"],
                                  ["--head-timeout", "0"], ["--cache-max-age", "-1"],
                                  ["--max-megapixels", "0.0000001"], ["--max-body-mb", "0.0000001"]])
def test_cli_refuses_bad_options(args, capsys):
    from gilfree.images.__main__ import parse_args

    with pytest.raises(SystemExit) as caught:
        parse_args(args)
    assert caught.value.code == 2 and args[0] in capsys.readouterr().err


def test_cli_takes_good_options(tmp_path):
    from gilfree.images.__main__ import parse_args

    config = parse_args(["--root", str(tmp_path), "--budget", "2.5", "--max-body-mb", "0.5", "--host", "::"])
    assert (config.root, config.budget, config.max_body, config.host) == (str(tmp_path), 2.5, 1 << 19, "::")
    assert parse_args(["--head-timeout", "0.5"]).head_timeout == 0.5 and parse_args([]).head_timeout == 10
    assert parse_args(["--cache-max-age", "0"]).cache_max_age == 0 and parse_args([]).cache_max_age == 3600


async def wait_for_metric(url, name, value, timeout=20):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metric(await metrics(url), name) == value:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{name} never reached {value}: {await metrics(url)}")


async def test_worker_crash_is_500_for_that_request_only_and_each_worker_death_is_one_log_line():
    server = Service("--workers", "1", "--budget", "1")
    try:
        async with aiohttp.ClientSession() as session:
            async def send(body, query, content_type):
                async with session.post(f"{server.url}/v1/transform?{query}", data=body,
                                        headers={"Content-Type": content_type}) as r:
                    return r.status, await r.read()

            victim = asyncio.ensure_future(send(slow_png(5000), SLOW_OPS, "image/png"))
            await wait_for_metric(server.url, "busy_workers", 1)
            text = await metrics(server.url)
            pid = int(re.search(r'worker_busy\{slot="0",pid="(\d+)"\} 1', text).group(1))
            os.kill(pid, signal.SIGKILL)
            status, body = await victim
            assert "SIGKILL" in error_of(status, body, 500, "worker_crashed")
            status, body = await send(PHOTO, "w=32", "image/jpeg")  # the replacement serves
            assert status == 200 and Image.open(io.BytesIO(body)).width == 32
            assert metric(await metrics(server.url), "worker_restarts_total") == 1
            status, body = await send(b"", "", "image/png")
            assert status == 415
            slow = asyncio.ensure_future(send(slow_png(5000), SLOW_OPS, "image/png"))
            await wait_for_metric(server.url, "busy_workers", 1)
            timed_out = int(re.search(r'worker_busy\{slot="0",pid="([1-9]\d*)"\} 1', await metrics(server.url)).group(1))
            error_of(*await slow, 504, "timeout")
            await wait_for_metric(server.url, "worker_restarts_total", 2)  # killed at the task's own timeout
            status, _ = await send(PHOTO, "w=32", "image/jpeg")  # the replacement has started: it served
            assert status == 200
            idle = int(re.search(r'worker_busy\{slot="0",pid="([1-9]\d*)"\} 0', await metrics(server.url)).group(1))
            os.kill(idle, signal.SIGKILL)
            await wait_for_metric(server.url, "worker_restarts_total", 3)
    finally:
        server.stop()
    log = [line for line in server.proc.stderr.read().splitlines() if line.startswith("image worker")]
    assert log == [f"image worker {pid} (slot 0) was killed by SIGKILL while running a task; a new worker replaces it",
                   f"image worker {timed_out} (slot 0) ran a task over its 1 s budget: killed while running a task; "
                   "a new worker replaces it",
                   f"image worker {idle} (slot 0) was killed by SIGKILL while idle; a new worker replaces it"], log


def test_the_pools_shutdown_at_a_stop_stops_a_task_still_running():
    """At a stop every request has ended: a task still running lost its request to the budget. Its worker is
    killed, not waited for until the task's own timeout."""
    from gilfree.images.executors import make_executor

    executor = make_executor("pool", 1, task_timeout=60)
    running, queued = executor.submit(time.sleep, 20), executor.submit(time.sleep, 20)
    deadline = time.monotonic() + 10
    while not executor.stats()["running"] and time.monotonic() < deadline:
        time.sleep(0.01)
    [worker] = [w["pid"] for w in executor.stats()["workers"]]
    executor.shutdown(wait=True, cancel_futures=True)
    for future in (running, queued):
        assert isinstance(future.exception(timeout=0), concurrent.futures.CancelledError)
    deadline = time.monotonic() + 10
    while not process_ended(worker) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert process_ended(worker)


def process_ended(pid):
    """Whether pid is gone or a zombie (its parent, the killed template or then PID 1, may reap it later)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] == "Z"
    except FileNotFoundError:
        return True


def pool_templates(pid):
    """pids of the gilfree.Pool template processes the service pid started (a zombie's cmdline is empty)."""
    found = []
    for child in subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split():
        try:
            with open(f"/proc/{child}/cmdline", "rb") as f:
                if b"template_main" in f.read():
                    found.append(int(child))
        except FileNotFoundError:
            pass
    return found


async def test_a_pool_whose_template_died_is_replaced_once_then_health_says_503():
    server = Service("--workers", "1")
    try:
        [template] = pool_templates(server.proc.pid)
        os.kill(template, signal.SIGKILL)
        await asyncio.sleep(0.2)
        status, _, body = await post(server.url, PHOTO, "w=32")
        if status != 200:  # sent before the pool heard of the death: failed like a worker crash
            error_of(status, body, 500, "worker_crashed")
            status, _, body = await post(server.url, PHOTO, "w=32")
        assert status == 200 and Image.open(io.BytesIO(body)).width == 32  # a new pool serves
        text = await metrics(server.url)
        assert metric(text, "worker_restarts_total") == 1
        [(busy_pid, busy)] = re.findall(r'^gilfree_images_worker_busy\{slot="0",pid="(\d+)"\} (\d)$', text, re.M)
        assert os.path.exists(f"/proc/{busy_pid}") and busy == "0"  # the new pool's worker, not a dead pid
        deadline = time.monotonic() + 10
        while os.path.exists(f"/proc/{template}") and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert not os.path.exists(f"/proc/{template}")  # the dead template was reaped, not left <defunct>
        status, _, body = await get(server.url, "/health")
        assert (status, body) == (200, b'{"status": "ok"}')

        [template] = pool_templates(server.proc.pid)  # the new pool's template dies soon after it started:
        os.kill(template, signal.SIGKILL)  # no rebuild loop; /health tells a supervisor to restart the service
        deadline = time.monotonic() + 10
        while (status := (await get(server.url, "/health"))[0]) == 200 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        status, _, body = await get(server.url, "/health")
        assert "restart the service" in error_of(status, body, 503, "unavailable")
        status, _, body = await post(server.url, PHOTO, "w=32")
        error_of(status, body, 503, "unavailable")
        assert metric(await metrics(server.url), "worker_restarts_total") == 2
    finally:
        server.stop()
    log = server.proc.stderr.read().splitlines()
    assert len(log) == 2, log  # one line each: rebuilt, then given up
    assert log[0] == "the image worker pool broke (the pool's template process was killed by SIGKILL): replaced by a new pool"
    assert log[1].startswith("the image worker pool failed for good: the pool's template process was killed by SIGKILL, ")
    assert log[1].endswith("restart the service. Transforms and /health answer 503 from now on")


def mp_workers(pid):
    """pids of the multiprocessing workers the service pid spawned (not its resource tracker)."""
    found = []
    for child in subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split():
        with open(f"/proc/{child}/cmdline", "rb") as f:
            if b"spawn_main" in f.read():
                found.append(int(child))
    return found


async def test_mp_metrics_forget_a_task_lost_with_its_worker():
    server = Service("--executor", "mp", "--workers", "1", "--budget", "2")
    try:
        text = await metrics(server.url)
        assert (metric(text, "busy_workers"), metric(text, "queue_depth")) == (0, 0)
        victim = asyncio.ensure_future(post(server.url, slow_png(5000), SLOW_OPS, "image/png"))
        await wait_for_metric(server.url, "busy_workers", 1)
        [worker] = mp_workers(server.proc.pid)
        os.kill(worker, signal.SIGKILL)
        status, _, body = await victim
        error_of(status, body, 504, "timeout")  # mp never hears of the task again: the budget ends the request
        await wait_for_metric(server.url, "busy_workers", 0)  # was 1 for good
        status, _, _ = await post(server.url, PHOTO, "w=10")  # the pool's replacement serves
        assert status == 200
        text = await metrics(server.url)
        assert (metric(text, "busy_workers"), metric(text, "queue_depth"), metric(text, "in_flight")) == (0, 0, 0)
    finally:
        server.stop()


async def test_the_app_ends_the_gil_accounting_it_started(root):
    from gilfree import _gilhook
    from gilfree.images import Config
    from gilfree.images.server import make_runner

    runner = make_runner(Config(workers=1, executor="threads", worker_nice=0, root=str(root)))
    await runner.setup()
    assert _gilhook.installed()  # /metrics reports the GIL held fraction
    await runner.cleanup()
    assert not _gilhook.installed()


def test_without_the_images_extra_the_error_names_it():
    code = "import sys; sys.modules['PIL'] = None\nimport gilfree.images"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        "ImportError: gilfree.images needs aiohttp and Pillow (PIL is missing): pip install 'gilfree[images]'")

"""Worker-side image work: pure functions of (source, Spec), importable by name so they pickle.

Order of operations: decode (JPEG draft mode when the target is much smaller) -> EXIF orientation
-> crop -> resize (w, h, fit) -> rotate (clockwise) -> flip -> grayscale -> blur -> sharpen -> encode.
Metadata (EXIF, XMP, comments) is dropped; the ICC colour profile is kept when the output is in its
colour space, so colours stay right.
"""
import io
import os
import zlib

from PIL import Image, ImageChops, ImageFilter, ImageOps

from .spec import ImageError

SOURCE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")
_JPEG = ("JPEG", "MPO")  # MPO: a JPEG with more pictures after the first (cameras' files); Pillow names it apart
MIME = {"jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp"}
MAX_OUTPUT_SIDE = {"jpeg": 65500, "webp": 16383}  # the encoders' limits; PNG's is beyond the pixel limit
# The pixel limit is checked here against the header before decoding, with the operator's value;
# Pillow's own fixed bomb check would otherwise warn or refuse on its different threshold.
Image.MAX_IMAGE_PIXELS = None

_ORIENTATION_TAG = 0x0112
_SWAPS_SIDES = (5, 6, 7, 8)  # EXIF orientations that turn the image a quarter
_ROTATE_CLOCKWISE = {90: Image.Transpose.ROTATE_270, 180: Image.Transpose.ROTATE_180, 270: Image.Transpose.ROTATE_90}
_FLIP = {"h": Image.Transpose.FLIP_LEFT_RIGHT, "v": Image.Transpose.FLIP_TOP_BOTTOM}
_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM")
_PIXEL_INFO = ("transparency",)  # the palette entry or colour that is transparent
_COLOUR_KEYED = ("1", "L", "I", "I;16", "RGB")  # modes whose transparency (PNG tRNS) is one colour value
# An ICC profile describes one colour space (bytes 16-19 of its header); the output mode's must match.
_ICC_SPACE = {"1": b"GRAY", "L": b"GRAY", "LA": b"GRAY", "P": b"RGB ", "RGB": b"RGB ", "RGBA": b"RGB ", "CMYK": b"CMYK"}
# Decoders report truncated or corrupt data with any of these.
_CORRUPT = (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, zlib.error, Image.DecompressionBombError)


def transform(source, spec):
    """Runs ``spec`` on ``source`` (image bytes, or a path to read). Returns (bytes, mime, w, h).

    Raises ImageError for anything the client must hear about (400, 404, 413, 415, 422).
    """
    image = _open(source, spec)
    fmt = spec.format or _default_format(image.format)
    try:
        quarter_turn = image.getexif().get(_ORIENTATION_TAG) in _SWAPS_SIDES
        full = image.size[::-1] if quarter_turn else image.size  # upright, before any draft shrink
        _draft(image, spec, full, quarter_turn)
        image.load()
        ImageOps.exif_transpose(image, in_place=True)  # in place: no 8 MB copy of an upright 2K image
    except _CORRUPT as exc:
        raise ImageError(422, "corrupt_image", f"cannot decode the {image.format} image: {exc}") from None
    icc = image.info.get("icc_profile")
    # The encoders fall back on info (a JPEG's comment, PNG's profile): only what the pixels need stays.
    image.info = {key: image.info[key] for key in _PIXEL_INFO if key in image.info}
    image = _eight_bit(_alpha_from_key(image))
    if spec.crop:
        image = _crop(image, spec.crop)
        full = image.size
    image = _resize(image, spec, full)
    if spec.rotate:
        image = image.transpose(_ROTATE_CLOCKWISE[spec.rotate])
    if spec.flip:
        image = image.transpose(_FLIP[spec.flip])
    if spec.grayscale:
        image = image.convert("LA" if _has_alpha(image) else "L")
    if spec.blur or spec.sharpen:
        image = _filterable(image)
    if spec.blur:
        image = image.filter(ImageFilter.GaussianBlur(spec.blur))
    if spec.sharpen:
        image = image.filter(ImageFilter.SHARPEN)
    return _encode(image, fmt, spec.quality, icc), MIME[fmt], image.width, image.height


def _open(source, spec):
    if isinstance(source, str):
        source = _read(source, spec.max_bytes)
    if spec.encoding != "identity":
        source = _decode(source, spec.encoding, spec.max_bytes)
    try:
        image = Image.open(io.BytesIO(source), formats=SOURCE_FORMATS)
    except Image.UnidentifiedImageError:
        if _signed(source):  # the right magic bytes, an unreadable header: damaged, not foreign
            raise ImageError(422, "corrupt_image", "the image header is damaged or truncated") from None
        raise ImageError(415, "unsupported_media_type",
                         "not an image, or not one of " + ", ".join(SOURCE_FORMATS)) from None
    except _CORRUPT as exc:
        raise ImageError(422, "corrupt_image", f"cannot read the image header: {exc}") from None
    pixels = image.width * image.height
    if pixels > spec.max_pixels:
        raise ImageError(422, "too_many_pixels",
                         f"{image.width}x{image.height} is {pixels} pixels, over the {spec.max_pixels} limit")
    return image


def _read(path, limit):
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > limit:  # refused from its size, before any of it is in memory
                raise ImageError(413, "payload_too_large", f"the file's {size} bytes are over the {limit} byte limit")
            return f.read()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError):
        raise ImageError(404, "not_found", "no such image") from None  # unreadable is missing, to a client


def _decode(body, encoding, limit):
    """body without its Content-Encoding (gzip or deflate), refused over limit bytes: a small body can hold gigabytes."""
    wbits = zlib.MAX_WBITS if encoding == "deflate" else 16 + zlib.MAX_WBITS
    if encoding == "deflate" and body[:1] and body[0] & 0x0F != 8:  # no zlib header: raw deflate, which clients send too
        wbits = -zlib.MAX_WBITS
    decoder = zlib.decompressobj(wbits)
    try:
        data = decoder.decompress(body, limit + 1)
    except zlib.error as exc:
        raise ImageError(400, "bad_request", f"the body does not follow its Content-Encoding {encoding}: {exc}") from None
    if len(data) > limit:
        raise ImageError(413, "payload_too_large", f"the body decodes to more than the {limit} byte limit")
    if not decoder.eof:
        raise ImageError(400, "bad_request", f"the body ends before its {encoding} stream does")
    return data


def _signed(data):
    head = bytes(data[:12])
    return head.startswith(_SIGNATURES) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")


def _default_format(source_format):
    name = "jpeg" if source_format in _JPEG else (source_format or "").lower()
    return name if name in MIME else "png"


def _draft(image, spec, full, quarter_turn):
    """Lets libjpeg decode at 1/2, 1/4 or 1/8 scale when the target is at least twice smaller."""
    if image.format not in _JPEG or spec.crop or not (spec.w or spec.h):
        return
    width, height = full
    target = _target_size(full, spec)
    # cover and fill need the source to cover the box on both sides; contain and inside on one.
    scale = (max if spec.fit in ("cover", "fill") else min)(target[0] / width, target[1] / height)
    # libjpeg's scaled IDCT filters as it shrinks, so decoding straight to the smallest scale that
    # still covers the target (as libvips' shrink-on-load does) leaves Lanczos a small final step.
    need = (max(1, int(width * scale)), max(1, int(height * scale)))
    image.draft(image.mode, need[::-1] if quarter_turn else need)


def _target_size(size, spec):
    """The box the resize aims at: (w, h) given, or the missing side from the aspect ratio."""
    width, height = size
    if spec.w and spec.h:
        return spec.w, spec.h
    if spec.w:
        return spec.w, max(1, round(height * spec.w / width))
    if spec.h:
        return max(1, round(width * spec.h / height)), spec.h
    return None


def _crop(image, box):
    x, y, w, h = box
    if x + w > image.width or y + h > image.height:
        raise ImageError(400, "bad_value",
                         f"op 'crop': {x},{y},{w},{h} reaches outside the {image.width}x{image.height} image")
    return image.crop((x, y, x + w, y + h))


def _resize(image, spec, full):
    """Sizes come from the full upright size, so a draft-shrunk decode gives the same output size."""
    target = _target_size(full, spec)
    if target is None:
        return image
    width, height = full
    box_w, box_h = target
    both = spec.w and spec.h
    output = _fitted(full, target) if both and spec.fit == "inside" else target  # the others fill the box
    if output[0] * output[1] > spec.max_pixels:
        raise ImageError(422, "output_too_large",
                         f"the output would be {output[0]}x{output[1]} pixels, over the {spec.max_pixels} pixel limit")
    if not both or spec.fit == "fill":
        return _lanczos(image, (box_w, box_h))
    if spec.fit == "cover":
        scale = max(box_w / width, box_h / height)
        # min(): the side that fits exactly can come out a rounding error over the source's, and
        # Pillow refuses a box reaching outside the image.
        crop_w, crop_h = min(width, box_w / scale), min(height, box_h / scale)
        left, top = (width - crop_w) / 2, (height - crop_h) / 2
        shrink_x, shrink_y = image.width / width, image.height / height  # the draft's, else 1
        box = (left * shrink_x, top * shrink_y,
               min(image.width, (left + crop_w) * shrink_x), min(image.height, (top + crop_h) * shrink_y))
        return _lanczos(image, (box_w, box_h), box)
    inner = _fitted(full, target)
    image = _lanczos(image, inner)
    if spec.fit == "inside":
        return image
    # contain: letterbox into exactly w x h, transparent where the image has alpha, black otherwise.
    mode = image.mode if image.mode in ("RGB", "RGBA", "L", "LA") else "RGBA" if _has_alpha(image) else "RGB"
    canvas = Image.new(mode, (box_w, box_h))
    canvas.paste(image.convert(mode), ((box_w - inner[0]) // 2, (box_h - inner[1]) // 2))
    return canvas


def _fitted(size, box):
    """size scaled to fit inside box, aspect ratio kept."""
    scale = min(box[0] / size[0], box[1] / size[1])
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


def _alpha_from_key(image):
    """A transparent colour (PNG tRNS on a grey or RGB image) as an alpha channel: resizing, filters and the
    encoders keep an alpha channel, and drop or misapply a colour key."""
    if image.mode not in _COLOUR_KEYED or "transparency" not in image.info:
        return image
    if image.mode.startswith("I"):  # Pillow's own conversion misses a 16-bit key and clips the grey to white
        key = image.info.pop("transparency")
        grey = image.convert("I")
        # 255 wherever the value is above or below the key: I to L clips to 0..255.
        alpha = ImageChops.lighter(grey.point(lambda v: (v - key) * 255).convert("L"),
                                   grey.point(lambda v: (key - v) * 255).convert("L"))
        image = _eight_bit(image)
        image.putalpha(alpha)
        return image
    return image.convert("RGBA" if image.mode == "RGB" else "LA")


def _eight_bit(image):
    """16-bit greyscale (PNG) scaled to 8 bits: Pillow's own conversion clips everything above 255 to white."""
    if image.mode.startswith("I"):
        return image.point(lambda value: value / 256).convert("L")
    return image


def _filterable(image):
    """image in a mode Pillow resamples and filters properly: palettes expanded, 1-bit as greyscale."""
    if image.mode in ("P", "PA"):
        return image.convert("RGBA" if _has_alpha(image) else "RGB")
    if image.mode == "1":
        return image.convert("L")
    return image


def _lanczos(image, size, box=None):
    image = _filterable(image)  # 1-bit and palette images would resample with NEAREST
    # reducing_gap=3: integer pre-reduction first; Pillow documents it as indistinguishable from fair.
    return image.resize(size, Image.Resampling.LANCZOS, box=box, reducing_gap=3.0)


def _has_alpha(image):
    return image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)


def _on_white(image):
    """Composited onto white: JPEG has no alpha, and the colours under transparent pixels are not for showing."""
    if image.mode not in ("LA", "RGBA"):
        image = image.convert("RGBA")
    flat = Image.new(image.mode[:-1], image.size, "white")
    flat.paste(image, mask=image.getchannel("A"))
    return flat


def _encode(image, fmt, quality, icc):
    limit = MAX_OUTPUT_SIDE.get(fmt)
    if limit and max(image.size) > limit:
        raise ImageError(422, "output_too_large",
                         f"the output would be {image.width}x{image.height} pixels; {fmt} allows at most {limit} a side")
    options = {"quality": quality}
    if fmt == "jpeg":
        if _has_alpha(image):
            image = _on_white(image)
        elif image.mode not in ("RGB", "L", "CMYK"):
            image = image.convert("L" if image.mode == "1" else "RGB")
    elif fmt == "webp":
        if image.mode not in ("RGB", "RGBA"):
            image = image.convert("RGBA" if _has_alpha(image) else "RGB")
    else:  # png: lossless, quality does not apply
        options = {}
        if image.mode == "CMYK":
            image = image.convert("RGB")
    if icc and icc[16:20] == _ICC_SPACE.get(image.mode):  # else it would misdescribe the pixels: dropped
        options["icc_profile"] = icc
    out = io.BytesIO()
    image.save(out, fmt.upper(), **options)
    return out.getvalue()

"""The transform request as a value: parsed and validated in the HTTP front, run in a worker.

``Spec`` and ``ImageError`` live in an importable module so they pickle by name: the front builds a
Spec, the worker receives it; the worker raises an ImageError, the front receives it.
"""
import re
from dataclasses import dataclass

FITS = ("contain", "cover", "fill", "inside")
OUTPUT_FORMATS = ("jpeg", "png", "webp")
_DECIMAL = re.compile(r"[0-9]+(?:\.[0-9]*)?|\.[0-9]+")
MAX_SIDE = 16383  # the largest w or h: WebP's limit (each format's own is checked on encoding)
DEFAULT_QUALITY = 85
CONTENT_ENCODINGS = ("identity", "gzip", "x-gzip", "deflate")  # a body's, decoded in the worker


class ImageError(Exception):
    """A request the service refuses: carries the HTTP status and the JSON error body's fields."""

    def __init__(self, status, error, detail):
        super().__init__(status, error, detail)
        self.status = status
        self.error = error
        self.detail = detail


@dataclass(frozen=True)
class Spec:
    """One transform: every op with its validated value (None/False when absent)."""

    w: int | None = None
    h: int | None = None
    fit: str = "cover"
    crop: tuple[int, int, int, int] | None = None
    rotate: int = 0
    flip: str | None = None
    grayscale: bool = False
    blur: float | None = None
    sharpen: bool = False
    format: str | None = None
    quality: int = DEFAULT_QUALITY
    max_pixels: int = 50_000_000
    max_bytes: int = 25 << 20  # a source file's limit, as the body's
    encoding: str = "identity"  # the body's Content-Encoding


def _bad(op, value, expected):
    return ImageError(400, "bad_value", f"op {op!r}: {value!r} is not {expected}")


def _int(op, value, lo, hi):
    # ASCII digits only (int() also takes '+1', '1_0', ' 1' and other scripts' digits), no more than hi has.
    if value.isascii() and value.isdigit() and len(value) <= len(str(hi)):
        number = int(value)
        if lo <= number <= hi:
            return number
    raise _bad(op, value, f"an integer in {lo}..{hi}")


def _flag(op, value):
    if value in ("", "1", "true"):
        return True
    if value in ("0", "false"):
        return False
    raise _bad(op, value, "a flag (empty, 1, true, 0 or false)")


def _choice(op, value, choices):
    if value not in choices:
        raise _bad(op, value, "one of " + "|".join(choices))
    return value


def _crop(value):
    parts = value.split(",")
    if len(parts) != 4:
        raise _bad("crop", value, "x,y,w,h")
    x, y = (_int("crop", p, 0, 1 << 30) for p in parts[:2])
    w, h = (_int("crop", p, 1, 1 << 30) for p in parts[2:])
    return (x, y, w, h)


def _sigma(value):
    # ASCII decimals only, as integers (float() also takes '5_0', ' 5', '1e1', 'nan' and other scripts' digits).
    if _DECIMAL.fullmatch(value) and 0 < float(value) <= 100:
        return float(value)
    raise _bad("blur", value, "a sigma in (0, 100]")


_PARSERS = {
    "w": lambda v: _int("w", v, 1, MAX_SIDE),
    "h": lambda v: _int("h", v, 1, MAX_SIDE),
    "fit": lambda v: _choice("fit", v, FITS),
    "crop": _crop,
    "rotate": lambda v: int(_choice("rotate", v, ("0", "90", "180", "270"))),
    "flip": lambda v: _choice("flip", v, ("h", "v")),
    "grayscale": lambda v: _flag("grayscale", v),
    "blur": _sigma,
    "sharpen": lambda v: _flag("sharpen", v),
    "format": lambda v: _choice("format", v.lower().replace("jpg", "jpeg"), OUTPUT_FORMATS),
    "quality": lambda v: _int("quality", v, 1, 100),
}


def parse(query, max_pixels, max_bytes=Spec.max_bytes):
    """Builds a Spec from (name, value) pairs; raises ImageError(400) naming the first bad op."""
    values = {}
    for name, value in query:
        parser = _PARSERS.get(name)
        if parser is None:
            raise ImageError(400, "unknown_op", f"unknown op {name!r}; known: {', '.join(_PARSERS)}")
        if name in values:
            raise ImageError(400, "bad_value", f"op {name!r} given more than once")
        values[name] = parser(value)
    # The pixel limit applies to the output, which only the source's size tells (fit=inside): the worker checks it.
    return Spec(max_pixels=max_pixels, max_bytes=max_bytes, **values)

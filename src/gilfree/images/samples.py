"""Photo-like test images made on the spot (the benchmark, the demo and the tests share them).

Soft colour fields, blurred shapes, a few hard edges and sensor-like grain: JPEG sizes and codec
work close to a real 2K photo's, each seed a distinct picture.
"""
import io
import random

from PIL import Image, ImageDraw, ImageFilter

SIZE_2K = (2048, 1365)  # 3:2 like most camera photos, DIV2K-like width


def photo(seed, size=SIZE_2K):
    """Returns a photo-like RGB Image, distinct for each seed."""
    rng = random.Random(seed)
    width, height = size
    # Background: two gradients in random directions, colourised: sky/ground-like fields.
    small = (max(8, width // 8), max(8, height // 8))
    channels = []
    for _ in range(3):
        gradient = Image.linear_gradient("L").rotate(rng.uniform(0, 360), resample=Image.Resampling.BILINEAR)
        channels.append(gradient.resize(small).point(lambda v, a=rng.uniform(0.3, 1), b=rng.randint(0, 90): int(v * a + b)))
    image = Image.merge("RGB", channels).resize(size, Image.Resampling.BICUBIC)
    # Blurred shapes: out-of-focus subjects.
    layer = Image.new("RGB", size)
    draw = ImageDraw.Draw(layer)
    for _ in range(rng.randint(12, 24)):
        x, y = rng.randrange(width), rng.randrange(height)
        r = rng.randint(width // 40, width // 6)
        colour = tuple(rng.randrange(256) for _ in range(3))
        draw.ellipse((x - r, y - r, x + r, y + r * rng.uniform(0.5, 1.5)), fill=colour)
    mask = layer.convert("L").point(lambda v: 170 if v else 0).filter(ImageFilter.GaussianBlur(width / 200))
    image = Image.composite(layer.filter(ImageFilter.GaussianBlur(width / 300)), image, mask)
    # Hard edges: buildings, branches.
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(20, 40)):
        points = [(rng.randrange(width), rng.randrange(height)) for _ in range(2)]
        draw.line(points, fill=tuple(rng.randrange(256) for _ in range(3)), width=rng.randint(1, 6))
    # Grain: what makes photos expensive to encode.
    noise = Image.effect_noise(size, rng.uniform(20, 40)).convert("RGB")
    return Image.blend(image, noise, rng.uniform(0.10, 0.18))


def photo_jpeg(seed, size=SIZE_2K, quality=92):
    """The photo() for seed as JPEG bytes, camera-like quality."""
    out = io.BytesIO()
    photo(seed, size).save(out, "JPEG", quality=quality)
    return out.getvalue()

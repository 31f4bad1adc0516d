"""gilfree.images: an image-processing HTTP service whose event loop never does image work.

``python -m gilfree.images --host 127.0.0.1 --port 8080 [--workers N] [--root DIR]
[--executor pool|threads|mp]``; see docs/images.md. Needs the ``images`` extra (aiohttp, Pillow).
"""
try:
    import aiohttp  # noqa: F401 - the extra's two dependencies, checked up front for a clear message
    import PIL  # noqa: F401
except ImportError as exc:
    raise ImportError(f"gilfree.images needs aiohttp and Pillow ({exc.name} is missing): pip install 'gilfree[images]'",
                      name=exc.name) from None

from .app import Config, create_app
from .server import serve

__all__ = ["Config", "create_app", "serve"]

"""Pickling for the pool: protocol 5, large buffers out-of-band through the shared arena.

`owner` is the process's end of the engine (``_engine.Engine`` in the parent,
``_engine.Worker`` in a worker): ``export(buffer)`` places a buffer in the arena (or finds the
block it already lives in) and returns a reference tuple; received references arrive as views:
``bytes`` objects for exact bytes, ``SharedBuffer`` objects for everything else.
"""
import io
import os
import itertools
import pickle
import weakref

from ._engine import BUF_BYTES, OUT_OF_BAND_MIN

_OOB_TYPES = (bytes, memoryview)


def _large(obj):
    return type(obj) in _OOB_TYPES and len(obj) >= OUT_OF_BAND_MIN


def _has_large_buffer(obj):
    """True when obj, or an item one level down, is a large bytes or memoryview.

    Plain pickle puts bytes in-band and refuses memoryview; only then is the slower pickler
    with persistent ids needed. Deeper nesting still works, with a copy."""
    if _large(obj):
        return True
    if type(obj) in (tuple, list):
        return any(_large(x) or (type(x) is dict and any(map(_large, x.values()))) for x in obj)
    if type(obj) is dict:
        return any(map(_large, obj.values()))
    return False


def _memoryview_reduce(view):
    return memoryview, (pickle.PickleBuffer(view),)


class _BufferPickler(pickle.Pickler):
    """Sends large exact bytes by persistent id (they arrive as bytes) and memoryviews as
    PickleBuffers (they arrive as read-only memoryviews)."""

    def __init__(self, file, owner, refs, buffer_callback):
        super().__init__(file, 5, buffer_callback=buffer_callback)
        self._owner = owner
        self._refs = refs

    def persistent_id(self, obj):
        if type(obj) is bytes and len(obj) >= OUT_OF_BAND_MIN:
            index = sum(1 for ref in self._refs if ref[3] & BUF_BYTES)
            self._refs.append(self._owner.export(obj))
            return index
        return None

    def reducer_override(self, obj):
        if type(obj) is memoryview:
            return _memoryview_reduce(obj)
        return NotImplemented


class Codec:
    """Encodes and decodes messages for one end of the engine."""

    def __init__(self, owner):
        self._owner = owner

    def dumps(self, obj):
        """Returns (payload, refs); refs hold arena references until the message is sent."""
        refs = []

        def out_of_band(buffer):
            view = buffer.raw()
            if view.nbytes < OUT_OF_BAND_MIN:
                return True
            refs.append(self._owner.export(view))
            return False

        try:
            if not _has_large_buffer(obj):
                try:
                    payload = pickle.dumps(obj, 5, buffer_callback=out_of_band)
                except TypeError:
                    # A memoryview somewhere deeper: the full pickler handles it.
                    self.release(refs)
                    refs.clear()
                else:
                    if b"__main__" not in payload:
                        return payload, refs
                    self.release(refs)
                    refs.clear()
                    return self._dumps_by_value(obj, refs, out_of_band)
            file = io.BytesIO()
            _BufferPickler(file, self._owner, refs, out_of_band).dump(obj)
            payload = file.getvalue()
            if b"__main__" in payload:
                self.release(refs)
                refs.clear()
                return self._dumps_by_value(obj, refs, out_of_band)
            return payload, refs
        except BaseException:
            self.release(refs)
            raise

    def _dumps_by_value(self, obj, refs, out_of_band):
        """Things defined in the parent's __main__ do not exist in workers: send them by value."""
        import cloudpickle

        return cloudpickle.dumps(obj, 5, buffer_callback=out_of_band), refs

    def release(self, refs):
        for ref in refs:
            self._owner.release(ref[0])

    @staticmethod
    def loads(payload, views):
        if not views:
            return pickle.loads(payload)
        by_id = [v for v in views if type(v) is bytes]
        out_of_band = [v for v in views if type(v) is not bytes]
        if not by_id:
            return pickle.loads(payload, buffers=out_of_band)
        unpickler = pickle.Unpickler(io.BytesIO(payload), buffers=out_of_band)
        unpickler.persistent_load = by_id.__getitem__
        return unpickler.load()


# ---------------------------------------------------------------- functions

_by_value_keys = itertools.count(1)
_function_cache = weakref.WeakKeyDictionary()  # fn -> _ByValue, or _BY_REFERENCE
_BY_REFERENCE = object()
_worker_functions = {}


def _load_by_value(key, blob):
    """Worker side: unpickles a function sent by value once, then reuses it."""
    fn = _worker_functions.get(key)
    if fn is None:
        fn = _worker_functions[key] = pickle.loads(blob)
    return fn


class _ByValue:
    __slots__ = ("key", "blob")

    def __init__(self, key, blob):
        self.key = key
        self.blob = blob

    def __reduce__(self):
        return _load_by_value, (self.key, self.blob)


def _pickles_by_reference(fn):
    module = getattr(fn, "__module__", None)
    qualname = getattr(fn, "__qualname__", "")
    if module in (None, "__main__") or "<locals>" in qualname or "<lambda>" in qualname:
        return False
    try:
        return b"__main__" not in pickle.dumps(fn, 5)
    except Exception:
        return False


def encode_function(fn):
    """What to pickle for fn: fn itself when workers can import it, otherwise a by-value
    wrapper pickled once per function object (cloudpickle)."""
    try:
        encoded = _function_cache[fn]
    except (KeyError, TypeError):
        pass
    else:
        return fn if encoded is _BY_REFERENCE else encoded
    if _pickles_by_reference(fn):
        encoded = _BY_REFERENCE
    else:
        import cloudpickle

        encoded = _ByValue((_process_token(), next(_by_value_keys)), cloudpickle.dumps(fn, 5))
    try:
        _function_cache[fn] = encoded
    except TypeError:
        pass  # not weak-referenceable: encoded again next time
    return fn if encoded is _BY_REFERENCE else encoded


def _process_token():
    return os.getpid()

"""Pickling for the pool: protocol 5, large buffers out-of-band through the shared arena.

`owner` is the process's end of the engine (``_engine.Engine`` in the parent,
``_engine.Worker`` in a worker): ``export(buffer)`` places a buffer in the arena (or finds the
block it already lives in) and returns a reference tuple; received references arrive as views:
``bytes`` objects for exact bytes, ``SharedBuffer`` objects for everything else.
"""
import io
# _pickle, not pickle: the pure-Python module pulls in `re`, slowing worker start-up.
import _pickle as pickle
import sys
import types
import weakref

from ._engine import BUF_BYTES, OUT_OF_BAND_MIN, has_large_buffer

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


class _IdUnpickler(pickle.Unpickler):
    def __init__(self, file, by_id, buffers):
        super().__init__(file, buffers=buffers)
        self._by_id = by_id

    def persistent_load(self, pid):
        return self._by_id[pid]


class _OutOfBandNeeded(Exception):
    pass


def _in_band_only(buffer):
    """The common case's buffer_callback: small PickleBuffers stay in the pickle; a large one
    stops it (the object is pickled again with an exporting callback)."""
    if buffer.raw().nbytes < OUT_OF_BAND_MIN:
        return True
    raise _OutOfBandNeeded


_NO_REFS = ()  # shared: a payload without arena references (nobody appends to it)


class Codec:
    """Encodes and decodes messages for one end of the engine."""

    def __init__(self, owner):
        self._owner = owner

    def dumps(self, obj):
        """Returns (payload, refs); refs hold arena references until the message is sent."""
        if not has_large_buffer(obj):
            # No large bytes or memoryview within three levels, the common case: plain pickle.
            # Small PickleBuffers stay in it; a large one (a numpy array, a share() handle)
            # means pickling again with the large buffers out-of-band. A large bytes deeper
            # down still works, copied in-band.
            refs = _NO_REFS
            try:
                try:
                    payload = pickle.dumps(obj, 5, buffer_callback=_in_band_only)
                except _OutOfBandNeeded:
                    refs = []
                    payload = pickle.dumps(obj, 5, buffer_callback=self._out_of_band(refs))
            except (TypeError, pickle.PicklingError, AttributeError):
                self.release(refs)  # a memoryview, or something only cloudpickle can do
            else:
                if b"__main__" not in payload:
                    return payload, refs
                self.release(refs)
        return self._dumps_large(obj)

    def _out_of_band(self, refs):
        """A pickle buffer_callback exporting large buffers to the arena, refs collecting them."""

        def out_of_band(buffer):
            view = buffer.raw()
            if view.nbytes < OUT_OF_BAND_MIN:
                return True
            refs.append(self._owner.export(view))
            return False

        return out_of_band

    def _dumps_large(self, obj):
        """Large buffers out-of-band (bytes by persistent id, the rest by PickleBuffer), and
        whatever the parent's __main__ defines by value."""
        refs = []
        out_of_band = self._out_of_band(refs)
        try:
            try:
                payload = self._dumps_with_ids(obj, refs, out_of_band)
            except (TypeError, pickle.PicklingError, AttributeError):
                # Classes or functions made at run time (e.g. in a task sent by value).
                payload = b"__main__"
            if b"__main__" in payload:
                self.release(refs)
                refs.clear()
                import cloudpickle

                payload = cloudpickle.dumps(obj, 5, buffer_callback=out_of_band)
            return payload, refs
        except BaseException:
            self.release(refs)
            raise

    def _dumps_with_ids(self, obj, refs, out_of_band):
        file = io.BytesIO()
        _BufferPickler(file, self._owner, refs, out_of_band).dump(obj)
        return file.getvalue()

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
        return _IdUnpickler(io.BytesIO(payload), by_id, buffers=out_of_band).load()


def round_trip(obj):
    """obj pickled and unpickled in this process, its buffers in-band: raises what a receiver
    would. For rare paths (it pickles obj once more)."""
    try:
        payload = pickle.dumps(obj, 5)
    except (TypeError, pickle.PicklingError, AttributeError):
        import cloudpickle  # classes that came by value: not found by name here

        payload = cloudpickle.dumps(obj, 5)
    return pickle.loads(payload)


# ---------------------------------------------------------------- functions

_blobs = weakref.WeakKeyDictionary()  # cacheable fn -> its pickled bytes
_functions = {}  # worker side: pickled bytes -> fn
_FUNCTIONS_KEPT = 1024
_module_globals = {}  # worker side: module name -> the globals its by-value functions share


def _pickles_by_reference(fn, blob):
    module = getattr(fn, "__module__", None)
    qualname = getattr(fn, "__qualname__", "")
    if module in (None, "__main__") or "<locals>" in qualname or "<lambda>" in qualname:
        return False
    return b"__main__" not in blob


def cacheable(fn):
    """True when fn's pickle cannot change while fn lives, so it is pickled and loaded once: a
    function (by reference its name; by value its code and the module state it starts from in
    each worker), a class, a module's builtin. Callable instances, bound methods and partials
    carry state that may change between submits (or within a task), so each task gets its own."""
    kind = type(fn)
    return (
        kind is types.FunctionType
        or isinstance(fn, type)
        or (kind is types.BuiltinFunctionType and isinstance(fn.__self__, types.ModuleType))
    )


def function_blob(fn):
    """fn pickled, once per object when cacheable(fn): by reference when workers can import it,
    else by value (cloudpickle: lambdas, closures, functions of __main__). Workers cache the
    function under these bytes, so a task carries them but nobody unpickles them twice."""
    try:
        return _blobs[fn]  # only cacheable objects are kept
    except (KeyError, TypeError):  # TypeError: not weak-referenceable or not hashable
        pass
    try:
        blob = pickle.dumps(fn, 5)
    except Exception:
        blob = None
    if blob is None or not _pickles_by_reference(fn, blob):
        import cloudpickle

        blob = cloudpickle.dumps(fn, 5)
    if cacheable(fn):
        _blobs[fn] = blob
    return blob


def load_function(blob):
    """Worker side: the function a blob names, unpickled once if cacheable."""
    fn = _functions.get(blob)
    if fn is None:
        fn = share_module_globals(pickle.loads(blob))
        if cacheable(fn):
            if len(_functions) >= _FUNCTIONS_KEPT:
                _functions.clear()
            _functions[blob] = fn
    return fn


def share_module_globals(fn):
    """Worker side: fn, if it came by value, rebuilt onto the one globals dict of its module.

    cloudpickle gives each pickle its own copy of the module's globals; in a worker of
    ProcessPoolExecutor a module is one namespace, so what the initializer or a task sets is
    what the next task reads. Names fn brought that the shared dict lacks are added; values
    already there win (they are this worker's module state)."""
    if type(fn) is not types.FunctionType:
        return fn
    own = fn.__globals__
    name = own.get("__name__")
    module = sys.modules.get(name)
    if module is not None and vars(module) is own:
        return fn  # by reference: the module itself
    shared = _module_globals.setdefault(name, own)
    if shared is own:
        return fn  # the module's first by-value function: its globals become the shared ones
    rebuilt = {}  # id(function) -> its copy on shared; also breaks cycles

    def rebind(value):
        """value, or its copy on shared if it is a function living in own."""
        if type(value) is not types.FunctionType or value.__globals__ is not own:
            return value
        copy = rebuilt.get(id(value))
        if copy is None:
            copy = rebuilt[id(value)] = types.FunctionType(
                value.__code__, shared, value.__name__, value.__defaults__, value.__closure__
            )
            for attr in ("__kwdefaults__", "__qualname__", "__annotations__", "__module__", "__doc__"):
                setattr(copy, attr, getattr(value, attr))
            copy.__dict__.update(value.__dict__)
            # The cells are this pickle's own: functions in them move to shared too.
            for cell in value.__closure__ or ():
                try:
                    cell.cell_contents = rebind(cell.cell_contents)
                except ValueError:
                    pass  # an empty cell
        return copy

    for key, value in own.items():
        if key not in shared:
            shared[key] = rebind(value)
    return rebind(fn)

"""Pickling for the pool: protocol 5, large buffers out-of-band through the shared arena.

`owner` is the process's end of the engine (``_engine.Engine`` in the parent,
``_engine.Worker`` in a worker): ``export(buffer)`` places a buffer in the arena (or finds the
block it already lives in) and returns a reference tuple; received references arrive as views:
``bytes`` objects for exact bytes, ``SharedBuffer`` objects for everything else, which the
unpickler gets as read-only memoryviews.
"""
import _thread
import functools
import io
import itertools
# _pickle, not pickle: the pure-Python module pulls in `re`, slowing worker start-up.
import _pickle as pickle
import os
import sys
import types
import weakref

from ._engine import OUT_OF_BAND_MIN, has_large_buffer

def _memoryview_reduce(view):
    """A memoryview travels as a PickleBuffer of its contents (a non-contiguous one copied
    first, as pickling it in-band would) and arrives with its format and shape. cast() rebuilds
    only native single-character formats ('d', 'i', 'B', '?'...) and non-empty views: any other
    (a byte order like '>d', a numpy record or half float, an empty view) arrives as the bytes
    of its contents."""
    fmt, shape = view.format, view.shape
    if not view.c_contiguous:
        view = memoryview(view.tobytes())
    try:
        view.cast("B").cast(fmt, shape)
    except (TypeError, ValueError):
        return bytes, (view.tobytes(),)
    return _memoryview_of, (pickle.PickleBuffer(view), fmt, shape)


def _memoryview_of(buffer, fmt, shape):
    return memoryview(buffer).cast(fmt, shape)  # the contents arrive flat (format 'B')


class _ViewPickler(pickle.Pickler):
    """Sends memoryviews with their format and shape (see _memoryview_reduce): out-of-band ones
    arrive as read-only views of shared memory, in-band ones as writable copies."""

    def reducer_override(self, obj):
        if type(obj) is memoryview:
            return _memoryview_reduce(obj)
        return NotImplemented


class _BufferPickler(_ViewPickler):
    """Also sends large exact bytes by persistent id (they arrive as bytes)."""

    def __init__(self, file, owner, refs, buffer_callback):
        super().__init__(file, 5, buffer_callback=buffer_callback)
        self._owner = owner
        self._refs = refs
        # id -> (index, obj): persistent ids bypass the memo, so a bytes referenced again is
        # sent once and arrives as one object. obj is kept so that its id stays its own.
        self._sent = {}

    def persistent_id(self, obj):
        if type(obj) is bytes and len(obj) >= OUT_OF_BAND_MIN:
            sent = self._sent.get(id(obj))
            if sent is None:
                # The index counts exported bytes only: buffers go by PickleBuffer.
                sent = self._sent[id(obj)] = (len(self._sent), obj)
                self._refs.append(self._owner.export(obj))
            return sent[0]
        return None


# A child forked while another thread imports cloudpickle would wait forever for the import's
# module lock: forks wait for the import instead.
_importing = _thread.RLock()  # reentrant: a signal handler of the importing thread may fork
os.register_at_fork(
    before=_importing.acquire, after_in_parent=_importing.release, after_in_child=_importing.release
)


def _cloudpickle():
    with _importing:
        import cloudpickle
    return cloudpickle


def names_main(payload):
    """True when a pickle names the main script's module: "__main__", or "__mp_main__" in a
    multiprocessing spawn or forkserver child. Workers have neither: it must go by value."""
    return b"_main__" in payload  # one scan for both; a false hit only costs a by-value pickle


_MAIN_MODULES = ("__main__", "__mp_main__")
_LruCacheWrapper = type(functools.lru_cache()(len))  # what lru_cache and cache return


def _named(obj):
    """True when obj is what its module and qualified name find outside the main script: pickle
    sends it by name and workers find it."""
    module = getattr(obj, "__module__", None)
    if module in _MAIN_MODULES or module not in sys.modules:
        return False
    found = sys.modules[module]
    for part in getattr(obj, "__qualname__", "<locals>").split("."):
        found = getattr(found, part, None)
    return found is obj


def _lru_cached(wrapped, maxsize, typed):
    """An lru_cache wrapper that came by value: a new one, with its own empty cache."""
    return functools.lru_cache(maxsize, typed)(wrapped)


def _lru_cache_reduce(wrapper):
    parameters = wrapper.cache_parameters()
    return _lru_cached, (wrapper.__wrapped__, parameters["maxsize"], parameters["typed"])


@functools.cache  # made on first use: cloudpickle is imported only when needed
def by_value_pickler():
    """_ViewPickler that also pickles by value, as cloudpickle does, what workers cannot import
    (lambdas, closures, what the main script defines). What still goes by name into the main
    script's module (an object whose __reduce__ returns its global name, a per-process
    singleton) is looked up in the worker's __main__, where the initializer may have set it."""
    cloudpickle = _cloudpickle()
    from cloudpickle.cloudpickle import _dynamic_class_reduce

    class _ByValuePickler(_ViewPickler, cloudpickle.Pickler):
        def reducer_override(self, obj):
            if type(obj) is memoryview:
                return _memoryview_reduce(obj)
            # cloudpickle names __mp_main__'s functions and classes, as importable.
            if type(obj) is types.FunctionType and obj.__module__ == "__mp_main__":
                return self._dynamic_function_reduce(obj)
            if isinstance(obj, type) and obj.__module__ == "__mp_main__":
                return _dynamic_class_reduce(obj)
            # cloudpickle would send a text file opened for reading as a copy of its contents
            # (writes and later reads would not reach the file): refused, as pickle does.
            if type(obj) is io.TextIOWrapper and obj is not sys.stdout and obj is not sys.stderr:
                raise TypeError(f"cannot pickle '{type(obj).__module__}.{type(obj).__qualname__}' object")
            # lru_cache's wrapper pickles by name: one the workers cannot find by name goes as
            # a new wrapper around its function (by value if need be), a cache of its own.
            if type(obj) is _LruCacheWrapper and not _named(obj):
                return _lru_cache_reduce(obj)
            return cloudpickle.Pickler.reducer_override(self, obj)

    return _ByValuePickler


def _dumps_by_value(obj, buffer_callback):
    """obj pickled by value where workers cannot import it. Large bytes stay in-band: a
    persistent_id finding them would slow these pickles, made at each submit, by a quarter."""
    file = io.BytesIO()
    by_value_pickler()(file, 5, buffer_callback=buffer_callback).dump(obj)
    return file.getvalue()


# What cannot change in place, or is followed otherwise (a function or class by identity and
# through its own captured globals, see _Captured): compared by identity only.
_UNCHANGING = frozenset(
    (
        int, float, complex, str, bytes, bool, type(None), types.ModuleType,
        types.BuiltinFunctionType, types.FunctionType, _LruCacheWrapper,
    )
)


class _LargeBuffer(Exception):
    pass


def _no_large_buffer(buffer):
    """A digest's buffer_callback: small buffers are hashed in the pickle, a large one stops it."""
    if buffer.raw().nbytes < OUT_OF_BAND_MIN:
        return True
    raise _LargeBuffer


def _digest(value):
    """A digest of value's pickle; b"" for what is compared by identity only: what cannot change
    in place, functions and classes, and a value holding a buffer that travels out-of-band (a
    numpy array, a memoryview of OUT_OF_BAND_MIN bytes or more: hashing it would cost as much
    as copying it at each new pickle); None when value does not pickle alone (counted as
    changed). Plain pickle first (by name what the parent's __main__ defines: their identity
    is enough here), cloudpickle for what only it can pickle."""
    if type(value) in _UNCHANGING or isinstance(value, type):
        return b""
    import hashlib  # the parent's: workers never digest

    for pickler in (pickle.Pickler, by_value_pickler()):
        digest = hashlib.sha256()  # SHA extensions: at copying speed
        try:
            pickler(types.SimpleNamespace(write=digest.update), 5, buffer_callback=_no_large_buffer).dump(value)
        except _LargeBuffer:
            return b""
        except Exception:
            continue
        return digest.digest()
    return None


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
            except BaseException as exc:
                # Frees the blocks exported before the failure (a later buffer not fitting).
                self.release(refs)
                if not isinstance(exc, (TypeError, pickle.PicklingError, AttributeError)):
                    raise
                # Else a memoryview, or something only cloudpickle can do.
            else:
                if not names_main(payload):
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
            if names_main(payload):
                self.release(refs)
                refs.clear()
                payload = _dumps_by_value(obj, out_of_band)
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
        # A memoryview, not the private SharedBuffer: what a bare PickleBuffer arrives as
        # must be usable (len, indexing) and picklable again.
        out_of_band = [memoryview(v) for v in views if type(v) is not bytes]
        if not by_id:
            return pickle.loads(payload, buffers=out_of_band)
        return _IdUnpickler(io.BytesIO(payload), by_id, buffers=out_of_band).load()


def round_trip(obj):
    """obj pickled and unpickled in this process, its buffers in-band: raises what a receiver
    would. For rare paths (it pickles obj once more)."""
    try:
        payload = pickle.dumps(obj, 5)
    except (TypeError, pickle.PicklingError, AttributeError):
        # Classes that came by value: not found by name here.
        payload = _cloudpickle().dumps(obj, 5)
    return pickle.loads(payload)


# ---------------------------------------------------------------- functions

# id(cacheable fn) -> (weakref to fn, its pickled bytes or None (see function_blob),
# _Captured.current or None, the generations its pickle holds or None)
_blobs = {}
# (module, global name) -> (value last pickled, _digest of it, generation): see _Captured.generations
_generations = {}
_next_generation = itertools.count()
_functions = {}  # worker side: pickled bytes -> fn
_FUNCTIONS_KEPT = 1024
# Worker side: module name -> (the globals its by-value functions share, {global name: the
# generation of the parent's value it holds}).
_module_globals = {}


def _by_value(obj):
    """True when cloudpickle copies the function or class obj instead of naming it."""
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", "")
    return module in (None, "__main__", "__mp_main__") or "<locals>" in qualname or "<lambda>" in qualname


def _code_names(code, names):
    """Adds the names code and its nested code objects use (a superset of the globals)."""
    names.update(dict.fromkeys(code.co_names))
    for const in code.co_consts:
        if type(const) is types.CodeType:
            _code_names(const, names)


class _Captured:
    """What a function's by-value pickle copied that can be rebound while the function lives:
    the globals its code (and that of the by-value functions and classes it reaches) reads,
    its code, defaults, attributes, closure cells, class attributes, an lru_cache wrapper's
    function. current(fn) compares them by identity with the values pickled, which it keeps
    (their ids stay theirs); it is compiled into one expression, since a loop would cost more
    than the rest of a submit. A change inside a mutable value is not seen: that would cost a
    pickle per submit (a new pickle of a function sends it: see generations). scope: the
    globals of fn (of its function if fn is an lru_cache wrapper)."""

    def __init__(self, fn, scope):
        self.scope_names = []  # the names of fn's module that the pickle may copy
        self._terms = []
        self._namespace = {"fn": fn}  # dropped below: the cache must not keep fn alive
        self._visit(fn, set(), scope)
        del self._namespace["fn"]
        source = "lambda fn: " + (" and ".join(self._terms) or "True")
        self.current = eval(source, self._namespace)

    def _watch(self, owner, read):
        """Compares owner's read (".attr" or ".get(key)") with its value now; returns it."""
        name = self._name(owner)
        value = eval(name + read, self._namespace)
        self._terms.append(f"{name}{read} is {self._name(value)}")
        return value

    def _name(self, obj):
        if obj is self._namespace.get("fn"):
            return "fn"
        name = f"o{id(obj)}"
        self._namespace[name] = obj
        return name

    def _visit(self, obj, seen, scope):
        if id(obj) in seen:
            return
        if type(obj) is types.FunctionType and _by_value(obj):
            seen.add(id(obj))
            names = {}
            _code_names(obj.__code__, names)
            # Builtins the code calls: shadowing one later is too rare to pay a check for.
            builtins = obj.__builtins__ if type(obj.__builtins__) is dict else vars(obj.__builtins__)
            names = [name for name in names if name in obj.__globals__ or name not in builtins]
            if obj.__globals__ is scope:
                self.scope_names += names
            reached = [self._watch(obj.__globals__, f".get({name!r})") for name in names]
            reached += (self._watch(obj, attr) for attr in (".__code__", ".__defaults__", ".__kwdefaults__"))
            reached += obj.__defaults__ or ()
            reached += (obj.__kwdefaults__ or {}).values()
            reached += (self._watch(obj.__dict__, f".get({name!r})") for name in list(obj.__dict__))
            for i in range(len(obj.__closure__ or ())):
                try:  # through the function: a cell may hold it (recursion), and fn is weak
                    reached.append(self._watch(obj, f".__closure__[{i}].cell_contents"))
                except ValueError:  # empty (filled later, say): pickled at each submit
                    self._terms.append("False")
        elif isinstance(obj, type) and _by_value(obj):
            seen.add(id(obj))
            attributes = vars(obj)
            reached = []
            for name, value in attributes.items():
                self._watch(attributes, f".get({name!r})")
                # Methods, and those in staticmethod, classmethod and property wrappers.
                reached += (value, getattr(value, "__func__", None))
                reached += (getattr(value, attr, None) for attr in ("fget", "fset", "fdel"))
        elif type(obj) is _LruCacheWrapper and not _named(obj):
            seen.add(id(obj))
            reached = [self._watch(obj, ".__wrapped__")]
        else:
            return
        for value in reached:
            self._visit(value, seen, scope)

    def generations(self, scope):
        """{name: generation} for the globals of scope, fn's module, that its pickle copies,
        made as fn is pickled anew. A generation is new when the parent rebound the name, or
        changed its value in place (its pickle's digest differs from the one last sent; a value
        that does not pickle alone, or differently each time, counts as changed), so that a
        worker replaces the value it holds (which may be its own, set by a task or the
        initializer) only then, with the newest it was sent (generations only grow). Each value
        is digested once here; functions, classes and values holding a large buffer are
        compared by identity only (see _digest)."""
        module = scope.get("__name__")
        found = {}
        digests = {}  # id(value) -> its digest, for a value under several names
        for name in dict.fromkeys(self.scope_names):
            if name in scope:
                value = scope[name]
                digest = digests.get(id(value), False)
                if digest is False:
                    digest = digests[id(value)] = _digest(value)
                known = _generations.get((module, name))
                if known is None or known[0] is not value or digest is None or known[1] != digest:
                    known = _generations[(module, name)] = (value, digest, next(_next_generation))
                found[name] = known[2]
        return found


def cacheable(fn):
    """True when fn is pickled and loaded once while it (and, by value, what it captured) stays
    as it was: a function (by reference its name; by value its code and the module state it
    starts from in each worker), an lru_cache wrapper (by value a new one, whose cache lasts
    while the worker keeps it), a class, a module's builtin. Callable instances, bound methods
    and partials carry state that may change between submits (or within a task), so each task
    gets its own."""
    kind = type(fn)
    return (
        kind is types.FunctionType
        or kind is _LruCacheWrapper
        or isinstance(fn, type)
        or (kind is types.BuiltinFunctionType and isinstance(fn.__self__, types.ModuleType))
    )


def function_blob(fn):
    """fn pickled, once per object when cacheable(fn): by reference when workers can import it,
    else by value (cloudpickle: lambdas, closures, functions of __main__), again when something
    it captured was rebound. Workers cache the function under these bytes, so a task carries
    them but nobody unpickles them twice.

    None when fn holds a buffer of OUT_OF_BAND_MIN bytes or more (a share() handle, a numpy
    array, a memoryview; in a partial, an instance, a closure cell, a global): a blob would
    copy it in-band into every task. The task then carries with_task(fn) in its arguments, whose
    buffers travel out-of-band (a share() handle by reference to its block)."""
    cached = _blobs.get(id(fn))
    if cached is not None and cached[0]() is fn:
        try:
            if cached[2] is None or cached[2](fn):
                return cached[1]
        except ValueError:  # a cell emptied
            pass
    captured = generations = None
    try:
        try:
            blob = pickle.dumps(fn, 5, buffer_callback=_in_band_only)
        except _OutOfBandNeeded:
            raise
        except Exception:
            blob = None
        if blob is None or _by_value(fn) or names_main(blob):
            target = fn  # the function whose globals go with it
            if type(fn) is _LruCacheWrapper and not _named(fn):
                target = getattr(fn, "__wrapped__", None)
            if type(target) is types.FunctionType:
                captured = _Captured(fn, target.__globals__)
                generations = captured.generations(target.__globals__)
                captured = captured.current
                try:
                    blob = _dumps_by_value((fn, generations), _in_band_only)
                except (TypeError, pickle.PicklingError) as exc:
                    raise _by_value_error(target, exc) from exc
            else:
                blob = _dumps_by_value(fn, _in_band_only)
    except _OutOfBandNeeded:
        blob = None
    if cacheable(fn):
        try:
            ref = weakref.ref(fn, functools.partial(_forget, id(fn)))
        except TypeError:
            return blob  # not weak-referenceable: pickled at each submit
        _blobs[id(fn)] = (ref, blob, captured, generations)
    return blob


def _by_value_error(fn, exc):
    """The error for a function that must go by value and cannot: names the global or closure
    variable that does not pickle. Workers never run the main script (they start from a fresh
    template), so sending the function by name instead would not find it there."""
    code = fn.__code__
    names = {}
    _code_names(code, names)
    parts = [(f"global {name!r}", fn.__globals__[name]) for name in names if name in fn.__globals__]
    for name, cell in zip(code.co_freevars, fn.__closure__ or ()):
        try:
            parts.append((f"closure variable {name!r}", cell.cell_contents))
        except ValueError:  # an empty cell
            pass
    culprit = "something it uses"
    for label, value in parts:
        try:
            _dumps_by_value(value, None)
        except Exception:
            culprit = f"its {label} ({type(value).__name__})"
            break
    return TypeError(
        f"{fn.__module__}.{fn.__qualname__} cannot be sent to the workers: they cannot import it "
        f"(the main script, a lambda or a closure), so it is pickled by value with what it uses, "
        f"and {culprit} cannot be pickled: {exc}. Define the function in a module the workers "
        "can import, or give it the object another way (create it in the task or in the pool's "
        "initializer, or pass what pickles as an argument)"
    )


def with_task(fn):
    """What a task carries in its arguments for fn when function_blob(fn) is None: fn, with
    the generations of its globals if it goes by value (see _Captured.generations)."""
    cached = _blobs.get(id(fn))
    if cached is not None and cached[0]() is fn and cached[3] is not None:
        return fn, cached[3]
    return fn


def blob_never_stale(fn):
    """True when function_blob(fn) holds a blob for fn that nothing can make stale (by reference,
    or by value with nothing captured to rebind): callers may keep it without asking again."""
    cached = _blobs.get(id(fn))
    return cached is not None and cached[0]() is fn and cached[2] is None


def _forget(key, ref):
    """A cached function died: its entry goes, unless a new object with its id took it."""
    if _blobs.get(key, (None,))[0] is ref:
        del _blobs[key]


def load_function(blob):
    """Worker side: the function a blob names, unpickled once if cacheable."""
    fn = _functions.get(blob)
    if fn is None:
        fn = unpickled_function(pickle.loads(blob))
        if cacheable(fn):
            if len(_functions) >= _FUNCTIONS_KEPT:
                _functions.clear()
            _functions[blob] = fn
    return fn


def unpickled_function(fn):
    """Worker side: a function as unpickled from a blob or a task (with_task), on its module's
    shared globals."""
    return share_module_globals(*fn) if type(fn) is tuple else share_module_globals(fn)


def install_main(file):
    """Worker side: a fresh module becomes __main__, its namespace the shared globals of the
    parent's __main__ functions (see share_module_globals), so that what they brought pickles
    again by name (pickle looks classes and functions up in their module), as in the parent;
    gilfree's start-up code stays out of it. file: the parent's __main__.__file__, which
    multiprocessing's spawn runs in the processes a task starts."""
    import builtins

    main = types.ModuleType("__main__")
    main.__builtins__ = builtins
    if file is not None:
        main.__file__ = file
    sys.modules["__main__"] = main
    _module_globals["__main__"] = (vars(main), {})


def share_module_globals(fn, generations=None):
    """Worker side: fn, if it came by value, rebuilt onto the one globals dict of its module.

    cloudpickle gives each pickle its own copy of the module's globals; in a worker of
    ProcessPoolExecutor a module is one namespace, so what the initializer or a task sets is
    what the next task reads. Names fn brought that the shared dict lacks are added; values
    already there win (they are this worker's module state) unless generations, the parent's
    {name: generation} for fn's pickle, says the parent changed the value since the one held
    (a newer generation; an older one, from a function pickled before, does not replace it).
    An lru_cache wrapper that came by value is rebuilt around its function's rebuilt copy."""
    inner = getattr(fn, "__wrapped__", None) if type(fn) is _LruCacheWrapper else fn
    if type(inner) is not types.FunctionType:
        return fn
    own = inner.__globals__
    name = own.get("__name__")
    module = sys.modules.get(name)
    if module is not None and vars(module) is own:
        return fn  # by reference: the module itself
    generations = generations or {}
    shared, held = _module_globals.setdefault(name, (own, {}))
    if shared is own:
        held.update(generations)
        return fn  # the module's first by-value function: its globals become the shared ones
    rebuilt = {}  # id(function) -> its copy on shared; also breaks cycles

    def rebind(value):
        """value, or its copy on shared if it is a function living in own (or an lru_cache
        wrapper of one)."""
        if type(value) is _LruCacheWrapper:
            wrapped = getattr(value, "__wrapped__", None)
            if type(wrapped) is not types.FunctionType or wrapped.__globals__ is not own:
                return value
            if id(value) in rebuilt:
                return rebuilt[id(value)]
            copy = rebind(wrapped)
            # The function's closure may have reached the wrapper meanwhile.
            return rebuilt.setdefault(id(value), _lru_cached(copy, **value.cache_parameters()))
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
        generation = generations.get(key)
        if key not in shared or (generation is not None and generation > held.get(key, generation)):
            shared[key] = rebind(value)
    for key, generation in generations.items():
        if generation > held.get(key, -1):
            held[key] = generation
    return rebind(fn)

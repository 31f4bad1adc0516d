"""How tasks, functions, results and errors travel between the parent and the workers."""
import textwrap

from test_pool import run_script


def run_ok(code, **kwargs):
    """Runs a script (its functions come from __main__, so they travel by value) and returns
    what it printed; the script must succeed."""
    proc = run_script(code, **kwargs)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    return out.strip()


def test_functions_by_value_share_their_module_globals_in_a_worker():
    # As in a ProcessPoolExecutor worker, where __main__ is one module: what the initializer or a
    # task sets is what the next function reads, whichever pickle brought it.
    out = run_ok(
        """
        import gilfree
        CONFIG = None
        CACHE = {}
        def init(value):
            global CONFIG
            CONFIG = value
        def config():
            return CONFIG
        def via_helper():
            return config()
        def calling(fn):
            return lambda: fn()
        def remember(key):
            CACHE[key] = True
        def remembered():
            return sorted(CACHE)
        if __name__ == "__main__":
            with gilfree.Pool(1, initializer=init, initargs=("configured",)) as pool:
                got = [pool.submit(fn).result() for fn in (config, via_helper, lambda: CONFIG, calling(config))]
                pool.submit(remember, "a").result()
                got.append(pool.submit(remembered).result())
                print(got)
        """
    )
    assert out == str(["configured"] * 4 + [["a"]])

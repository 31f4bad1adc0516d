"""gilfree's Pool API on distributed engines: ``gilfree.cluster.dask.DaskPool`` (``pip install gilfree[dask]``).

``gilfree.Pool(cluster=...)`` picks the pool from here; importing this package does not import
``distributed`` until a pool class is asked for.
"""
import importlib

__all__ = ["DaskPool"]


def __getattr__(name):
    if name == "DaskPool":
        return importlib.import_module(f"{__name__}.dask").DaskPool
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""fusedata: offline data engineering for knowledge fusion of LLMs."""

__version__ = "0.1.0"


def load(path, **kw):
    """A fusedata dataset folder as a `datasets.Dataset` with lazily decoded top-k (fusedata/loading.py)."""
    from fusedata.loading import load as _load

    return _load(path, **kw)

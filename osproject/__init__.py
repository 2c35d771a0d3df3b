"""osproject: a file-integrity checker built as a classic Unix pre-fork server."""

__version__ = "0.2.0"


def collect_garbage_seldom() -> None:
    """Once started: what start-up made is kept out of every collection, and
    the collector runs every 20,000 new container objects, not every 700.

    The server and the client make and drop tuples, lists and dicts by the
    hundred per file, nearly all freed by reference counting at once; at
    700 the cyclic collector ran every few files and cost 3% of their CPU
    (perf, a verify of 20,000 files).  What cycles there are (a generator,
    an exception and its frames) wait at most 20,000 objects, a few MiB.
    A worker, forked from the server, inherits both settings.
    """
    import gc
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)

"""The package's layout holds: two wings that never import each other.

The server (osproject/server/) and the client (osproject/client/) share only
the core beside them: protocol.py, store.py and statuses.py.  A client that
imported the server's code, or the reverse, would tie the two together again.
"""

import ast
import os
import sys

from helpers import ROOT

PACKAGE = os.path.join(ROOT, "osproject")
CORE = {"osproject", "osproject.protocol", "osproject.store", "osproject.statuses"}


def modules(wing):
    folder = os.path.join(PACKAGE, wing)
    return sorted(os.path.join(folder, name) for name in os.listdir(folder)
                  if name.endswith(".py"))


def imported(path):
    """Every module `path` imports, by absolute name, however it spells it."""
    here = os.path.basename(os.path.dirname(path))
    package = "osproject" if here == "osproject" else "osproject." + here
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            parts = package.split(".")
            base = ".".join(parts[:len(parts) - node.level + 1]) if node.level else ""
            module = ".".join(p for p in (base, node.module) if p)
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def ours(names):
    return {n for n in names if n == "osproject" or n.startswith("osproject.")}


def test_the_wings_do_not_import_each_other():
    for wing, other in (("server", "client"), ("client", "server")):
        paths = modules(wing)
        assert len(paths) >= 6, f"osproject/{wing}/ holds too few modules"
        for path in paths:
            crossing = {n for n in ours(imported(path))
                        if n == f"osproject.{other}" or n.startswith(f"osproject.{other}.")}
            assert not crossing, f"{path} imports the {other} wing: {sorted(crossing)}"


CORE = ("protocol.py", "store.py", "statuses.py")


def test_the_core_imports_only_the_standard_library_and_itself():
    core = {"osproject." + name[:-3] for name in CORE}
    for name in CORE:
        path = os.path.join(PACKAGE, name)
        names = imported(path)
        theirs = {n for n in ours(names) if ".".join(n.split(".")[:2]) not in core}
        assert not theirs, f"{name} imports {sorted(theirs)}"
        top = {n.split(".")[0] for n in names if not n.startswith("osproject.")}
        stdlib = set(sys.stdlib_module_names)
        assert top <= stdlib, f"{name} imports {top - stdlib}"


def test_a_server_run_from_the_checkout_logs_to_its_logs_directory():
    """Its modules moved a level down once, and it silently logged elsewhere."""
    from osproject.server.cli import DEFAULT_LOG_DIR
    assert DEFAULT_LOG_DIR == os.path.join(ROOT, "logs")


def test_the_import_checker_sees_relative_imports():
    """The test above cannot pass for a checker blind to `from ..client import x`."""
    seen = imported(os.path.join(PACKAGE, "client", "cli.py"))
    assert "osproject.protocol.default_fifo" in seen
    assert "osproject.client.checkers" in seen

"""The command line of integrity-client."""

import argparse
import os
import sys

from .. import __version__, collect_garbage_seldom
from ..protocol import default_fifo
from ..statuses import EXIT_TROUBLE


def client_parser():
    p = argparse.ArgumentParser(
        prog="integrity-client",
        description="Check files against their MD5 sidecars through an integrity-server. "
                    "Exit status: 0 nothing altered, 1 something CHANGED or MISSING, "
                    "2 the check could not be done.")
    p.add_argument("paths", nargs="*", metavar="PATH", help="file or directory to check")
    p.add_argument("--fifo", help=f"server's entrance FIFO (default $INTEGRITY_FIFO or "
                                  f"{default_fifo()})")
    p.add_argument("--json", action="store_true",
                   help="one JSON object per file, then one with the summary")
    p.add_argument("--update", action="store_true",
                   help="accept the tree as it is: CHANGED files get a new baseline, "
                        "the sidecars of MISSING files are removed (still exits 1)")
    p.add_argument("--catalog", metavar="FILE",
                   help="the catalog, the client's own record of every entry (default "
                        "$INTEGRITY_CATALOG, else $XDG_STATE_HOME/osproject/catalog.sqlite, "
                        "else ~/.local/state/osproject/catalog.sqlite)")
    p.add_argument("--store", metavar="DIR",
                   help="keep sidecars mirrored under DIR instead of beside the files")
    p.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                   help="skip files and directories whose name, or path relative to "
                        "the PATH given, matches GLOB; a GLOB starting with / matches "
                        "the absolute path (repeatable)")
    p.add_argument("--quiet", "-q", action="store_true",
                   help="no progress line on the terminal (there is none unless stderr "
                        "is a terminal)")
    p.add_argument("--status", action="store_true",
                   help="show the server's pid and uptime, each worker's state, pid, "
                        "files, warnings, RSS and CPU, and the totals; no PATH needed")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return p


def main(argv=None):
    from .catalog import Catalog, CatalogError
    from .catalog import default_path as default_catalog
    from .progress import Progress
    from .report import Report
    collect_garbage_seldom()
    parser = client_parser()
    try:
        args = parser.parse_args(argv)
        if not args.paths and not args.status:
            parser.error("give at least one PATH, or --status")
        if args.paths and args.status:
            parser.error("--status shows the server: it takes no PATH")
    except SystemExit as exc:
        return EXIT_TROUBLE if exc.code else 0
    if args.status:
        return show_status(args)
    store_dir = None
    if args.store:
        # Resolved once: below it, a worker follows no symlink to a sidecar.
        store_dir = os.path.realpath(args.store)
        if not os.path.isdir(store_dir):
            print(f"integrity-client: --store {args.store}: no such directory (make it "
                  "first: a mistyped store would make every file NEW)", file=sys.stderr)
            return EXIT_TROUBLE
    roots = distinct_roots(args.paths)
    try:
        catalog = Catalog.open(args.catalog or default_catalog(), roots)
    except CatalogError as exc:
        print(f"integrity-client: {exc}", file=sys.stderr)
        return EXIT_TROUBLE
    try:
        for path in roots:
            why = unusable(path)
            if why and catalog.get(os.path.abspath(path)) is None:
                print(f"integrity-client: {path}: {why}", file=sys.stderr)
                return EXIT_TROUBLE
        report = Report(sys.stdout, as_json=args.json,
                        progress=Progress.for_terminal(sys.stderr, args.quiet))
        return run_check(args, roots, report, store_dir, catalog)
    finally:
        catalog.close()


def run_check(args, roots, report, store_dir, catalog):
    """The check itself, with what can go wrong on the way turned into exit 2."""
    from .catalog import CatalogError
    from .checkers import ClientError, check
    try:
        return check(roots, args.fifo or default_fifo(), report,
                     private_dir=uses_default_fifo(args), store_dir=store_dir,
                     excludes=args.exclude, update=args.update, catalog=catalog)
    except (ClientError, CatalogError) as exc:
        report.flush()
        print(f"integrity-client: {exc}", file=sys.stderr)
        return EXIT_TROUBLE
    except KeyboardInterrupt:
        report.abandon()
        return 130
    except Exception:  # noqa: BLE001 - a crash must not read as "something changed"
        import traceback
        report.abandon()
        traceback.print_exc()
        print("integrity-client: internal error; the check was not done", file=sys.stderr)
        return EXIT_TROUBLE


def unusable(path):
    """Why PATH cannot be checked (lstat's reason, lowercase), or None."""
    try:
        os.lstat(path)
    except OSError as exc:
        return (exc.strerror or str(exc)).lower()
    return None


def distinct_roots(paths):
    """The PATHs with overlaps dropped: a tree and a subtree of it, or one tree
    named twice, are checked once (first as given)."""
    kept: list[str] = []
    for path in paths:
        if path.startswith("//") and not path.startswith("///"):
            path = path[1:]         # POSIX leaves "//" to the system: it means "/" here
        real = os.path.realpath(path)
        if any(real == other or real.startswith(other.rstrip("/") + "/")
               for other in map(os.path.realpath, kept)):
            continue
        kept = [k for k in kept
                if not os.path.realpath(k).startswith(real.rstrip("/") + "/")]
        kept.append(path)
    return kept


def uses_default_fifo(args):
    """Is the entrance the default one, in a runtime directory that must be ours?"""
    return not args.fifo and not os.environ.get("INTEGRITY_FIFO")


def show_status(args):
    from .checkers import ClientError, server_status
    from .report import format_status
    try:
        status = server_status(args.fifo or default_fifo(), uses_default_fifo(args))
    except ClientError as exc:
        print(f"integrity-client: {exc}", file=sys.stderr)
        return EXIT_TROUBLE
    if args.json:
        import json
        print(json.dumps(status))
    else:
        sys.stdout.write(format_status(status))
    return 0

"""Command lines of integrity-server and integrity-client."""

import argparse
import os
import sys

from . import __version__
from .entrance import default_fifo
from .report import EXIT_TROUBLE

_CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOT_LOG_DIR = "/var/log/osproject"


def default_log_dir(checkout=_CHECKOUT, euid=None, environ=os.environ):
    """Where the log goes without --log-dir.

    Run from a checkout, to its logs/; installed, where logs of a daemon
    belong: /var/log/osproject/ for root, else $XDG_STATE_HOME/osproject/
    (~/.local/state/osproject/), never ./logs of wherever cron started it.
    """
    if os.path.exists(os.path.join(checkout, "setup.py")):
        return os.path.join(checkout, "logs")
    if (os.geteuid() if euid is None else euid) == 0:
        return ROOT_LOG_DIR
    state = environ.get("XDG_STATE_HOME") or os.path.join(
        environ.get("HOME") or os.path.expanduser("~"), ".local", "state")
    return os.path.join(state, "osproject")


DEFAULT_LOG_DIR = default_log_dir()

CHAOS_HELP = """\
testing aid: make faults real. liar:SLOT[:RATE[:AFTER]] makes the first worker
forked into SLOT report a wrong hash with probability RATE (default 1.0), after
AFTER honest files (default 0); its replacement is honest. crash:RATE and hang:RATE make any worker die or freeze
on an assignment with probability RATE; garble:RATE makes it answer with
garbage; stillborn:PATH makes workers die before starting while PATH exists.
Repeatable."""


def fraction(text):
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not between 0 and 1")
    return value


def parse_chaos(specs, workers):
    """Turn --chaos specs into a dict of Config fields."""
    liars, rates = {}, {"crash": 0.0, "hang": 0.0, "garble": 0.0}
    stillborn = None
    for spec in specs:
        kind, _, rest = spec.partition(":")
        try:
            if kind == "liar":
                slot, rate, after = (rest.split(":") + ["", ""])[:3]
                if not 0 <= int(slot) < workers:
                    raise ValueError(f"slot {slot} is not one of 0..{workers - 1}")
                liars[int(slot)] = {"lie": fraction(rate) if rate else 1.0,
                                    "honest_first": int(after or 0)}
            elif kind in rates and rest:
                rates[kind] = fraction(rest)
            elif kind == "stillborn" and rest:
                stillborn = os.path.abspath(rest)
            else:
                raise ValueError("expected liar:SLOT[:RATE[:AFTER]], crash:RATE, "
                                 "hang:RATE, garble:RATE or stillborn:PATH")
        except (ValueError, argparse.ArgumentTypeError) as exc:
            raise SystemExit(f"integrity-server: bad --chaos {spec!r}: {exc}") from None
    return dict(liars=liars, stillborn=stillborn, **rates)


def server_parser():
    p = argparse.ArgumentParser(
        prog="integrity-server",
        description="Serve file-integrity checks with a pool of forked, untrusted "
                    "MD5 workers. Runs in the foreground; SIGTERM or SIGINT stops it, "
                    "SIGHUP reopens the log file.")
    p.add_argument("--fifo", help=f"entrance FIFO (default $INTEGRITY_FIFO or {default_fifo()})")
    p.add_argument("--log-dir", default=DEFAULT_LOG_DIR,
                   help="directory of integrity-server.log (default %(default)s)")
    p.add_argument("--workers", type=int, default=5, help="worker processes (default 5, at least 3)")
    p.add_argument("--hang-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="kill a worker silent this long on an assignment (default 30)")
    p.add_argument("--idle-timeout", type=float, default=60.0, metavar="SECONDS",
                   help="drop a client session that sends nothing and waits for no "
                        "file this long (default 60)")
    p.add_argument("--cross-check", type=fraction, default=0.1, metavar="P",
                   help="share of new files a trusted worker hashes that another "
                        "worker re-checks (default 0.1)")
    p.add_argument("--syslog", action="store_true",
                   help="send each event line to the local syslog too (ident "
                        "integrity-server, facility daemon); fail at start if no "
                        "syslog daemon listens")
    p.add_argument("--syslog-socket", metavar="PATH",
                   help="the syslog daemon's datagram socket (default /dev/log, on "
                        "macOS /var/run/syslog); implies --syslog")
    p.add_argument("--chaos", action="append", default=[], metavar="SPEC", help=CHAOS_HELP)
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return p


def open_log(args):
    """Return the EventLog the command line asks for; None, having said why, if
    it cannot be had."""
    from .log import EventLog, Syslog, SyslogError
    to_syslog = None
    socket_path = os.path.abspath(args.syslog_socket) if args.syslog_socket else None
    try:
        if args.syslog or socket_path:
            to_syslog = Syslog(socket_path)     # None: this system's own socket
        return EventLog(args.log_dir, syslog=to_syslog)
    except SyslogError as exc:
        print(f"integrity-server: --syslog: {exc}", file=sys.stderr)
    except OSError as exc:
        if to_syslog is not None:
            to_syslog.close()
        print(f"integrity-server: cannot open log in {args.log_dir}: {exc.strerror}",
              file=sys.stderr)
    return None


def server_main(argv=None):
    from .entrance import EntranceError
    from .server import FD_SETSIZE, MAX_SESSIONS, MAX_WORKERS, Config, Server
    args = server_parser().parse_args(argv)
    if args.workers < 3:
        server_parser().error("--workers must be at least 3: a tie between two "
                              "workers needs a third to break it")
    if args.workers > MAX_WORKERS:
        server_parser().error(f"--workers must be at most {MAX_WORKERS}: select() "
                              f"watches only fds below {FD_SETSIZE}, and each worker "
                              f"takes two, as does each of up to {MAX_SESSIONS} clients")
    if args.hang_timeout < 1:
        server_parser().error("--hang-timeout must be at least 1 second")
    if args.idle_timeout < 1:
        server_parser().error("--idle-timeout must be at least 1 second")
    config = Config(fifo=args.fifo or default_fifo(),
                    private_dir=uses_default_fifo(args),
                    workers=args.workers, hang_timeout=args.hang_timeout,
                    idle_timeout=args.idle_timeout,
                    cross_check=args.cross_check, **parse_chaos(args.chaos, args.workers))
    log = open_log(args)
    if log is None:
        return EXIT_TROUBLE
    try:
        return Server(config, log).run()
    except EntranceError as exc:
        log.error("server.refused", reason=str(exc))
        return EXIT_TROUBLE
    finally:
        log.close()


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


def client_main(argv=None):
    from .catalog import Catalog, CatalogError
    from .catalog import default_path as default_catalog
    from .progress import Progress
    from .report import Report
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
    from .client import ClientError, check
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
    kept = []
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
    from .client import ClientError, server_status
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

"""The command line of integrity-server."""

import argparse
import os
import sys

from .. import __version__, collect_garbage_seldom
from ..protocol import default_fifo
from ..statuses import EXIT_TROUBLE

# osproject/server/cli.py: the checkout (or site-packages) is three levels up.
_CHECKOUT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
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
AFTER honest files (default 0); its replacement is honest. crash:RATE and
hang:RATE make any worker die or freeze on an assignment with probability RATE;
garble:RATE makes it answer with garbage; stillborn:PATH makes workers die
before starting while PATH exists. Repeatable."""


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
    p.add_argument("--workers", type=int, default=5,
                   help="worker processes (default 5, at least 3)")
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
    p.add_argument("--backoff-scale", type=fraction, default=1.0, metavar="FACTOR",
                   help="testing aid: multiply every wait before re-forking a worker "
                        "that died young (the back-off and the one-second window of "
                        "the fork rate cap) by FACTOR, above 0 and at most 1 (default 1)")
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


def main(argv=None):
    from .entrance import EntranceError
    from .loop import FD_SETSIZE, MAX_SESSIONS, MAX_WORKERS, Config, Server
    collect_garbage_seldom()
    args = server_parser().parse_args(argv)
    if args.workers < 3:
        server_parser().error("--workers must be at least 3: a tie between two "
                              "workers needs a third to break it")
    if args.workers > MAX_WORKERS:
        server_parser().error(f"--workers must be at most {MAX_WORKERS}: select() "
                              f"watches only fds below {FD_SETSIZE}, each worker takes "
                              f"two and each of up to {MAX_SESSIONS} clients three")
    if args.hang_timeout < 1:
        server_parser().error("--hang-timeout must be at least 1 second")
    if args.idle_timeout < 1:
        server_parser().error("--idle-timeout must be at least 1 second")
    if args.backoff_scale <= 0:
        server_parser().error("--backoff-scale must be above 0")
    config = Config(fifo=args.fifo or default_fifo(),
                    private_dir=uses_default_fifo(args),
                    workers=args.workers, hang_timeout=args.hang_timeout,
                    idle_timeout=args.idle_timeout,
                    cross_check=args.cross_check, backoff_scale=args.backoff_scale,
                    **parse_chaos(args.chaos, args.workers))
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


def uses_default_fifo(args):
    """Is the entrance the default one, in a runtime directory that must be ours?"""
    return not args.fifo and not os.environ.get("INTEGRITY_FIFO")

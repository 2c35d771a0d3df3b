"""`make chaos`: watch the trust model work on a generated tree.

Starts a server whose slot-1 worker always lies, whose slot-3 worker lies
30% of the time, and whose workers crash on 2% of their assignments; checks
a tree twice (creating, then verifying the baselines); then prints from the
log who was warned, who was banned, how many files were re-verified, and
checks every sidecar with the real `md5sum -c`.  Exits 1 if anything is
wrong: a failed client, a bad sidecar, a liar left running, an honest
worker warned.
"""

import collections
import os
import signal
import subprocess
import sys
import tempfile

from helpers import (
    CLIENT,
    SERVER,
    make_tree,
    md5sum_check,
    parse_logfmt,
    sidecars_under,
    wait_until,
)

FILES = 2000
CHAOS = ["liar:1", "liar:3:0.3", "crash:0.02"]


def run(tmp):
    tree = os.path.join(tmp, "tree")
    fifo = os.path.join(tmp, "server.fifo")
    log_dir = os.path.join(tmp, "logs")
    print(f"generating {FILES} files ...")
    make_tree(tree, files=FILES, dirs=40, size=4000)
    args = [sys.executable, SERVER, "--fifo", fifo, "--log-dir", log_dir]
    for spec in CHAOS:
        args += ["--chaos", spec]
    print("server:", " ".join(args[2:]))
    with open(os.path.join(tmp, "server.err"), "w") as err:
        server = subprocess.Popen(args, stderr=err)
        try:
            wait_until(lambda: os.path.exists(fifo), what="the server")
            statuses = [check(fifo, tree, label) for label in ("create", "verify")]
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(30)
    events = read_log(os.path.join(log_dir, "integrity-server.log"))
    return summarize(events, statuses, tree)


def check(fifo, tree, label):
    proc = subprocess.run([sys.executable, CLIENT, "--fifo", fifo, tree],
                          capture_output=True, text=True)
    print(f"client {label}: exit {proc.returncode}: {proc.stdout.splitlines()[-1:]}")
    if proc.returncode:
        print(proc.stderr, file=sys.stderr)
    return proc.returncode


def read_log(path):
    with open(path, encoding="utf-8") as f:
        return [parse_logfmt(line) for line in f]


def summarize(events, statuses, tree):
    by_name = collections.defaultdict(list)
    for e in events:
        by_name[e["event"]].append(e)
    liars = {e["slot"]: e["pid"] for e in reversed(by_name["worker.forked"])
             if e["slot"] in ("1", "3")}
    warned = collections.Counter((e.get("slot", "?"), e["pid"]) for e in by_name["worker.warned"])
    print("\nwarnings:")
    for (slot, pid), n in sorted(warned.items()):
        print(f"  slot {slot} pid {pid}: {n}")
    banned = {e["pid"] for e in by_name["worker.banned"]}
    print("banned:", ", ".join(f"slot {e['slot']} pid {e['pid']}"
                               for e in by_name["worker.banned"]) or "nobody")
    crashes = [e for e in by_name["worker.exited"] if e.get("exit") == "70"]
    print(f"crashes survived: {len(crashes)}, assignments requeued: "
          f"{len(by_name['assignment.requeued'])}")
    print(f"re-verified: {sum(int(e['files']) for e in by_name['worker.reverify'])} files, "
          f"repaired: {len(by_name['file.repaired'])}, cross-checks: {len(by_name['crosscheck'])}")
    failures = md5sum_check(sidecars_under(tree))
    print(f"md5sum -c: {'all sidecars OK' if not failures else failures[:3]}")
    problems = []
    if any(statuses):
        problems.append(f"client exit statuses {statuses}")
    if failures:
        problems.append("sidecars md5sum -c rejects")
    stop = next(i for i, e in enumerate(events) if e["event"] == "server.stopping")
    died = {e["pid"] for e in events[:stop] if e["event"] == "worker.exited"}
    if liars.get("1") not in banned | died:     # a crash may get it first
        problems.append("the slot-1 liar was still running at the end")
    honest_warned = [pid for (_, pid) in warned if pid not in liars.values()]
    if honest_warned:
        problems.append(f"honest workers warned: {honest_warned}")
    print("\n" + ("FAILED: " + "; ".join(problems) if problems else "chaos handled"))
    return 1 if problems else 0


if __name__ == "__main__":
    with tempfile.TemporaryDirectory(prefix="osproject-chaos-") as tmp:
        sys.exit(run(tmp))

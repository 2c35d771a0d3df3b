"""The README's "Log events" table lists every event the server emits."""

import os
import re

from helpers import ROOT

_EMIT = re.compile(r'log\.(?:info|warning|error|emit)\(\s*(?:\w+,\s*)?"([\w.]+)"')


def emitted_events():
    """Events the server's code names, and those it logs for clients (audit)."""
    from osproject.protocol import AUDIT_EVENTS
    events = set(AUDIT_EVENTS)
    package = os.path.join(ROOT, "osproject", "server")
    for name in os.listdir(package):
        if name.endswith(".py"):
            with open(os.path.join(package, name), encoding="utf-8") as f:
                events.update(_EMIT.findall(f.read()))
    return events


def documented_events():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        section = f.read().split("## Log events", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `([\w.]+)` \|", section, re.M))


def test_every_logged_event_is_documented_and_no_other():
    assert len(emitted_events()) > 25, "the pattern no longer finds the log calls"
    assert documented_events() == emitted_events()

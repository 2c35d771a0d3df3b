"""contrib/: the systemd units, the cron line and the logrotate snippet.

The programs accept the command lines they are given, systemd (where
installed) accepts the units, and the cron line does what it says against
a real server."""

import os
import shlex
import shutil
import subprocess
import sys

import pytest

from helpers import CLIENT, ROOT, SERVER, make_tree, tamper
from osproject.client import cli as client_cli
from osproject.server import cli as server_cli

pytestmark = pytest.mark.timeout(60)

CONTRIB = os.path.join(ROOT, "contrib")
UNIT = os.path.join(CONTRIB, "integrity-server.service")
CHECK = os.path.join(CONTRIB, "integrity-check.service")
TIMER = os.path.join(CONTRIB, "integrity-check.timer")
CRON = os.path.join(CONTRIB, "integrity-check.cron")
LOGROTATE = os.path.join(CONTRIB, "integrity-server.logrotate")


def unit_settings(unit=UNIT):
    """{key: [values]} of the unit's settings, sections merged."""
    settings = {}
    with open(unit, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith(("#", ";", "[")):
                key, _, value = line.partition("=")
                settings.setdefault(key, []).append(value)
    return settings


def test_exec_start_is_a_command_line_the_server_accepts():
    settings = unit_settings()
    [exec_start] = settings["ExecStart"]
    argv = shlex.split(exec_start)
    assert os.path.basename(argv[0]) == "integrity-server"
    args = server_cli.server_parser().parse_args(argv[1:])    # exits (fails) on a bad option
    assert args.syslog
    [runtime] = settings["RuntimeDirectory"]
    assert args.fifo == f"/run/{runtime}/server.fifo"
    assert settings["RuntimeDirectoryMode"] == ["0700"]
    [logs] = settings["LogsDirectory"]
    assert args.log_dir == f"/var/log/{logs}"
    assert settings["ExecReload"] == ["/bin/kill -HUP $MAINPID"]


def verify(unit_path):
    return subprocess.run(["systemd-analyze", "verify", unit_path], capture_output=True,
                          text=True, timeout=30)


def test_systemd_accepts_the_unit(tmp_path):
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (not a systemd system)")
    plain = tmp_path / "plain.service"
    plain.write_text("[Service]\nExecStart=/bin/true\n")
    if verify(str(plain)).returncode != 0:
        pytest.skip("systemd-analyze verify does not work here: "
                    + verify(str(plain)).stderr.strip()[:200])
    unit = tmp_path / "integrity-server.service"     # verify needs ExecStart to exist
    with open(UNIT, encoding="utf-8") as f:
        unit.write_text(f.read().replace("ExecStart=/usr/local/bin/integrity-server",
                                         f"ExecStart={SERVER}"))
    assert f"ExecStart={SERVER} " in unit.read_text()
    proc = verify(str(unit))
    complaints = [line for line in proc.stderr.splitlines() if str(unit) in line
                  or unit.name in line]
    assert proc.returncode == 0 and not complaints, proc.stderr


def server_args():
    [exec_start] = unit_settings()["ExecStart"]
    return server_cli.server_parser().parse_args(shlex.split(exec_start)[1:])


def test_the_nightly_check_is_a_client_command_line_on_the_servers_fifo():
    settings = unit_settings(CHECK)
    assert settings["Type"] == ["oneshot"]
    assert settings["Requires"] == settings["After"] == ["integrity-server.service"]
    [exec_start] = settings["ExecStart"]
    argv = shlex.split(exec_start)
    assert os.path.basename(argv[0]) == "integrity-client"
    args = client_cli.client_parser().parse_args(argv[1:])
    assert args.fifo == server_args().fifo and args.quiet and args.paths
    timer = unit_settings(TIMER)
    assert timer["Unit"] == ["integrity-check.service"]
    assert timer["OnCalendar"] and timer["Persistent"] == ["true"]
    assert timer["WantedBy"] == ["timers.target"]


def test_systemd_accepts_the_nightly_check_and_its_timer(tmp_path):
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (not a systemd system)")
    units = []
    for unit in (UNIT, CHECK, TIMER):                # verify needs ExecStart to exist
        copy = tmp_path / os.path.basename(unit)
        with open(unit, encoding="utf-8") as f:
            copy.write_text(f.read().replace("/usr/local/bin/", os.path.join(ROOT, "bin", "")))
        units.append(str(copy))
    if verify(units[0]).returncode != 0:
        pytest.skip("systemd-analyze verify does not work here")
    proc = subprocess.run(["systemd-analyze", "verify", *units[1:]], capture_output=True,
                          text=True, timeout=30)
    complaints = [line for line in proc.stderr.splitlines() if "integrity-" in line]
    assert proc.returncode == 0 and not complaints, proc.stderr


def cron_command(fifo, tree):
    """The cron line's command, run against `fifo` on `tree` with our client."""
    with open(CRON, encoding="utf-8") as f:
        [line] = [text for text in f.read().splitlines() if text and text[0].isdigit()]
    fields = line.split(None, 6)
    assert fields[5] == "root" and "%" not in fields[6], "a % is a newline to cron"
    command = fields[6].replace("/usr/local/bin/integrity-client",
                                f"{sys.executable} {CLIENT}")
    command = command.replace(server_args().fifo, fifo)
    return command.replace("--quiet /srv /etc/ssh", f"--quiet {tree}")


def test_the_cron_line_says_nothing_when_all_is_well_and_why_when_not(server, tmp_path):
    tree = tmp_path / "tree"
    files = make_tree(tree, files=20)
    command = cron_command(server.fifo, tree)
    quiet = subprocess.run(["sh", "-c", command], capture_output=True, text=True, timeout=60)
    assert (quiet.returncode, quiet.stdout, quiet.stderr) == (0, "", "")
    tamper(files[3])
    told = subprocess.run(["sh", "-c", command], capture_output=True, text=True, timeout=60)
    assert told.stdout.startswith("integrity-client exited 1\n"), told.stdout
    assert files[3] in told.stdout and "CHANGED" in told.stdout


def test_logrotate_moves_the_servers_log_and_has_it_reopened(server, tmp_path):
    with open(LOGROTATE, encoding="utf-8") as f:
        text = f.read()
    installed = os.path.join(server_args().log_dir, "integrity-server.log")
    assert text.split("{")[0].split("\n")[-1].strip() == installed
    assert "systemctl reload integrity-server.service" in text
    assert unit_settings()["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    if shutil.which("logrotate") is None:
        pytest.skip("logrotate is not installed")
    conf = tmp_path / "logrotate.conf"             # the snippet, on our test server
    conf.write_text(text.replace(installed, server.log_path).replace(
        "systemctl reload integrity-server.service", f"kill -HUP {server.proc.pid}"))
    subprocess.run(["logrotate", "-f", "-s", str(tmp_path / "state"), str(conf)],
                   check=True, timeout=30)
    with open(server.log_path + ".1", encoding="utf-8") as f:
        assert "event=server.started" in f.read()
    server.wait_event("log.reopened")                # in the new file
    assert "event=server.started" not in open(server.log_path, encoding="utf-8").read()

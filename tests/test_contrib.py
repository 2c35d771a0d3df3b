"""contrib/integrity-server.service: the server accepts its command line, and
systemd (where installed) accepts the unit."""

import os
import shlex
import shutil
import subprocess

import pytest

from conftest import ROOT, SERVER
from osproject import cli

pytestmark = pytest.mark.timeout(60)

UNIT = os.path.join(ROOT, "contrib", "integrity-server.service")


def unit_settings():
    """{key: [values]} of the unit's settings, sections merged."""
    settings = {}
    with open(UNIT, encoding="utf-8") as f:
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
    args = cli.server_parser().parse_args(argv[1:])    # exits (fails) on a bad option
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

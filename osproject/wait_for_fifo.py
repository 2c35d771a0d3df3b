"""`python -m osproject.wait_for_fifo FIFO PID`: wait until a server accepts clients.

Exits 0 once FIFO exists, 1 if process PID died first or 10 seconds pass.
Used by `make run`, so that its recipe needs no sleep.
"""

import os
import stat
import sys
import time


def main(fifo, pid, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if stat.S_ISFIFO(os.stat(fifo).st_mode):
                return 0
        except FileNotFoundError:
            pass
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return 1
        time.sleep(0.02)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2])))

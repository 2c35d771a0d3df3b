"""The client's live progress line on a terminal: listed, checked, rate, elapsed.

Only the client's main thread draws it, a few times a second, while it
waits for the other threads; Report clears it before printing a result, so
results and the progress line never share a line of the terminal.
"""

import os
import time

INTERVAL = 0.2          # seconds between redraws
ERASE = "\r\x1b[K"      # to column 0, clear to the end of the line


class Progress:
    """One status line on `stream`, redrawn in place by draw(), erased by clear()."""

    def __init__(self, stream, clock=time.monotonic):
        self.stream = stream
        self.clock = clock
        self.started = clock()
        self.shown = False

    @classmethod
    def for_terminal(cls, stream, quiet):
        """A Progress when `stream` is a terminal and the user did not ask for quiet."""
        try:
            tty = os.isatty(stream.fileno())
        except (AttributeError, OSError, ValueError):
            tty = False
        return cls(stream) if tty and not quiet else None

    def draw(self, listed, checked):
        elapsed = self.clock() - self.started
        rate = checked / elapsed if elapsed > 0 else 0.0
        minutes, seconds = divmod(int(elapsed), 60)
        self._write(f"{ERASE}listed {listed}  checked {checked}  "
                    f"{rate:.0f} files/s  {minutes}:{seconds:02d}")
        self.shown = True

    def clear(self):
        if self.shown:
            self._write(ERASE)
            self.shown = False

    def _write(self, text):
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):
            pass        # a terminal that went away must not fail the check

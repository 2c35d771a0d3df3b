"""The words both wings share: file statuses, exit codes, kinds of file.

A leaf of names, standard library only, like supervisord's states.py: the
client prints these statuses and exits with these codes, the server decides
and sends them.  Neither wing imports the other; both import this.
"""

import stat

# What a check finds for a file, as the server answers it and the client shows it.
OK, NEW, CHANGED, MISSING, MOVED = "OK", "NEW", "CHANGED", "MISSING", "MOVED"
UNSTABLE, ERROR, SKIPPED = "UNSTABLE", "ERROR", "SKIPPED"
STATUSES = (OK, NEW, CHANGED, MISSING, MOVED, UNSTABLE, ERROR, SKIPPED)

# Exit statuses of both commands (README: "Exit status").
EXIT_OK = 0          # nothing altered
EXIT_ALTERED = 1     # something CHANGED, MISSING, ... (the server: it gave up)
EXIT_TROUBLE = 2     # the check could not be done; a usage error


def describe_kind(mode):
    """Name the kind of a file that is not regular, from its st_mode."""
    for test, name in ((stat.S_ISLNK, "symbolic link"), (stat.S_ISFIFO, "FIFO"),
                       (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISDIR, "directory")):
        if test(mode):
            return name
    return "not a regular file"

"""What may be opened as an input file, and how a path is named in a one-line message.

Only regular files are opened: opening a FIFO blocks until a writer appears (forever, in a
directory walk), and a device or socket is no image either.
"""

from __future__ import annotations

import os
import stat

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a named pipe (FIFO)"),
          (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"))


def short_path(path: str | os.PathLike, limit: int = 160) -> str:
    """`path` for a message: a very long one keeps its two ends and says how long it is."""
    text = os.fspath(path)
    if len(text) <= limit:
        return text
    return f"{text[:limit // 2]}...{text[-limit // 4:]} ({len(text)} characters)"


def os_reason(e: OSError) -> str:
    """An OSError's reason without the path (the message names the path once, shortened)."""
    return e.strerror or type(e).__name__


def regular_file_problem(path: str | os.PathLike) -> str | None:
    """None when `path` (symlinks followed) is a regular file; otherwise why it is not one."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return ("a broken symbolic link" if os.path.islink(path)
                else "no such file or directory")
    except OSError as e:  # a symlink loop, a name too long, a directory that cannot be searched
        return os_reason(e)
    if stat.S_ISREG(mode):
        return None
    kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
    return f"{kind}, not a regular file"

"""The terminal line mesobox shares with the user on stderr: warnings and the one
live progress line (``mesobox pull`` on a terminal).

A progress line ends without a newline so that the next one overwrites it.  A warning
written meanwhile must not be glued to it: ``warn`` first returns to the start of the
line and erases it, writes the warning on a line of its own, then draws the progress
line again below it.  Standard library only (``sys``): the launch path may warn.
"""

from __future__ import annotations

import sys

ERASE = "\r\x1b[K"  # carriage return, then erase to the end of the line (ECMA-48 EL)

_line: str | None = None  # the progress line on the screen, not yet ended by a newline


def warn(message: str) -> None:
    """``mesobox: warning: MESSAGE`` on a line of its own (one write: threads may warn)."""
    text = f"mesobox: warning: {message}\n"
    sys.stderr.write(text if _line is None else f"{ERASE}{text}\r{_line}")
    sys.stderr.flush()


def progress(line: str) -> None:
    """Draw (or draw again) the progress line."""
    global _line
    _line = line
    sys.stderr.write(f"\r{line}")
    sys.stderr.flush()


def clear_progress() -> None:
    """Erase the progress line (a failure: its error line takes the place)."""
    global _line
    if _line is not None:
        sys.stderr.write(ERASE)
        sys.stderr.flush()
    _line = None


def end_progress() -> None:
    """The progress line is final: what follows starts below it."""
    global _line
    if _line is not None:
        sys.stderr.write("\n")
        sys.stderr.flush()
    _line = None

"""Sizes as users type them, for every option that takes one (``--memory``,
``--writable-tmpfs``, I/O rates, ``overlay create``): one grammar.

Docker's: a number with an optional binary unit, ``512m``, ``1.5g``, ``4096``, ``10mb``,
``2GiB``; case does not matter.  Zero and negative sizes are refused.  Stdlib only.
"""

from __future__ import annotations

_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


def parse_size(text: str, option: str) -> int:
    """Bytes of ``text``; UsageError naming ``option`` when it is not a size."""
    value = text.strip().lower()
    for suffix in ("ib", "b"):
        if value.endswith(suffix) and value[: -len(suffix)][-1:] in ("k", "m", "g", "t"):
            value = value[: -len(suffix)]
            break
    unit = value[-1:] if value[-1:] in _UNITS and not value[-1:].isdigit() else ""
    number = value[: len(value) - len(unit)]
    try:
        amount = float(number)
    except ValueError:
        amount = float("nan")
    if not amount > 0 or amount == float("inf"):
        from mesobox.errors import UsageError

        raise UsageError(f"bad size {text!r} for {option}: it must be positive",
                         hint="use a size like 512m, 1.5g or 1048576") from None
    if number.isdigit():  # exact for whole numbers of any size
        return int(number) * _UNITS[unit]
    return int(amount * _UNITS[unit])

"""Text for people: byte counts in binary units (B, KiB, MiB, GiB), an exception as one line, a value in 4 digits;
and a config value exactly, for an override."""
from __future__ import annotations

import re

UNITS = ("B", "KiB", "MiB", "GiB")
MAX_ERROR_CHARS = 1000  # an error line also goes into MLflow tags and trial attributes: keep it bounded


def human_bytes(n: float | None, short: bool = False) -> str:
    """n bytes as B, KiB, MiB or GiB with one decimal (none in B; short: none from 10 up); '-' for None."""
    if n is None:
        return "-"
    for unit in UNITS:
        if abs(n) < 1024 or unit == UNITS[-1]:
            break
        n /= 1024
    decimals = 0 if unit == "B" or (short and abs(n) >= 10) else 1
    return f"{n:.{decimals}f} {unit}"


def error_line(e: BaseException, with_type: bool = True) -> str:
    """'Type: first line of the message' (with_type=False: the line alone); the type's name if there is no message."""
    text = str(e)
    if not text:
        return type(e).__name__
    line = text.splitlines()[0]
    return (f"{type(e).__name__}: {line}" if with_type else line)[:MAX_ERROR_CHARS]


def short(v) -> str:
    """For people: 4 significant digits."""
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def override_value(v) -> str:
    """Exact, for overrides (repr keeps every digit of a float)."""
    return repr(v) if isinstance(v, float) else str(v)


_URL_PASSWORD = re.compile(r"(://[^:/@\s]+:)[^@\s]+@")


def redact_url(value):
    """A password in a URL (postgresql://user:pw@host/db) becomes ***; other values are returned as they are."""
    return _URL_PASSWORD.sub(r"\1***@", value) if isinstance(value, str) else value

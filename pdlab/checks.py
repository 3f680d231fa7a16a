"""Values a person passes to pdlab, checked at the API's edge: one checker per kind of value,
used everywhere that kind is taken, each raising a ValueError that names the value, what it
got and what to pass instead. Nothing here imports the rest of pdlab (every layer uses it).

Timeouts mean the same everywhere: a finite number of seconds > 0, at most ``MAX_SECONDS``;
None (``off`` in the magics) for no limit where a limit is optional. 0 is refused rather
than read as "none" in one place and "at once" in another.
"""

from __future__ import annotations

import math
import numbers
import os
from pathlib import Path

MAX_SECONDS = 365 * 24 * 3600.0  # a year: beyond it, timers and timestamps overflow


def number(
    value: object,
    name: str,
    *,
    least: float | None = None,
    above: float | None = None,
    most: float | None = None,
    unit: str = "",
) -> float:
    """``value`` as a finite float within the bounds given (``least`` <=, ``above`` <,
    <= ``most``), else a ValueError saying which."""
    bounds = [f">= {_shown(least)}" if least is not None else ""]
    bounds += [f"> {_shown(above)}" if above is not None else ""]
    bounds += [f"<= {_shown(most)}" if most is not None else ""]
    wanted = " and ".join(b for b in bounds if b)
    what = f"a finite number{f' of {unit}' if unit else ''}{f' {wanted}' if wanted else ''}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be {what}, got {value!r} ({type(value).__name__})")
    given, value = value, float(value)
    if (
        not math.isfinite(value)
        or (least is not None and value < least)
        or (above is not None and value <= above)
        or (most is not None and value > most)
    ):
        raise ValueError(f"{name} must be {what}, got {given:g}")
    return value


def _shown(bound: float) -> str:
    """A bound as people write it: 31,536,000 rather than 3.1536e+07."""
    return f"{int(bound):,}" if float(bound).is_integer() else f"{bound:g}"


def whole(value: object, name: str, least: int = 1, most: int | None = None) -> int:
    """``value`` if it is an int in [``least``, ``most``], else a ValueError saying which."""
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Integral)
        or value < least
        or (most is not None and value > most)
    ):
        limit = f" and <= {most:,}" if most is not None else ""
        raise ValueError(f"{name} must be a whole number >= {least}{limit}, got {value!r}")
    return int(value)


def timeout(
    value: object, name: str = "timeout", *, optional: bool = True, no_limit: str = "None"
) -> float | None:
    """``value`` as seconds to wait (see the module docstring); None stays None if
    ``optional``, which the error calls ``no_limit``."""
    if value is None and optional:
        return None
    try:
        return number(value, name, above=0, most=MAX_SECONDS, unit="seconds")
    except ValueError as exc:
        raise ValueError(f"{exc}{f'; {no_limit} for no limit' if optional else ''}") from None


def writable_folder(path: str | os.PathLike, name: str) -> Path:
    """``path`` as a folder this process can write in, created if missing; else a ValueError
    naming ``name``, the reason, and the fix."""
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(
            f"{name} {folder} can't be made a folder ({exc.strerror}): pass a folder you can "
            "write to"
        ) from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{name} {folder} is not writable: pass a folder you can write to")
    return folder


def writable_file(path: str | os.PathLike, name: str) -> Path:
    """``path`` as a file this process can write (its folder exists and is writable; it is
    not a folder), checked before the work that produces it; else a ValueError."""
    file = Path(path)
    if file.is_dir():
        raise ValueError(f"{name} {file} is a folder: pass a file's path, e.g. {file / 'run.json'}")
    if not file.parent.is_dir():
        raise ValueError(f"{name} {file}: there is no folder {file.parent}; create it first")
    if not os.access(file.parent, os.W_OK | os.X_OK) or (
        file.exists() and not os.access(file, os.W_OK)
    ):
        raise ValueError(f"{name} {file} is not writable: pass a path you can write to")
    return file

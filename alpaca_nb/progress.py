"""Progress bars for long work: tqdm.auto (a widget in Jupyter, text at a terminal), off in the built book.

``ALPACA_NB_PROGRESS=0`` turns every bar of the package off: `make book` sets it, because a bar frozen
in a static page tells a reader nothing. tqdm's own ``TQDM_DISABLE`` does not reach its notebook bars
(tqdm.notebook passes ``disable`` on explicitly), hence this switch.
"""

from __future__ import annotations

import os
from typing import Any

from tqdm.auto import tqdm

__all__ = ["PROGRESS_ENV", "progress_bar", "progress_bars_enabled"]

PROGRESS_ENV = "ALPACA_NB_PROGRESS"


def progress_bars_enabled() -> bool:
    """Return False when ``ALPACA_NB_PROGRESS=0`` asks for no progress bars."""
    return os.environ.get(PROGRESS_ENV, "1").strip() != "0"


def progress_bar(iterable: Any = None, **options: Any) -> tqdm:
    """Return a tqdm.auto bar that waits 2 s before it shows (short work shows none) and honours the switch."""
    options.setdefault("delay", 2)
    options["disable"] = options.get("disable", False) or not progress_bars_enabled()
    return tqdm(iterable, **options)

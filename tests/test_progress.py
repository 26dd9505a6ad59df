"""alpaca_nb.progress: the package's bars wait 2 s before showing, and ALPACA_NB_PROGRESS=0 turns them off."""

from __future__ import annotations

from alpaca_nb.progress import PROGRESS_ENV, progress_bar, progress_bars_enabled


def test_bars_show_after_two_seconds_by_default(monkeypatch):
    monkeypatch.delenv(PROGRESS_ENV, raising=False)
    bar = progress_bar(range(3), desc="work")
    assert progress_bars_enabled() and not bar.disable and bar.delay == 2
    assert list(bar) == [0, 1, 2]


def test_the_switch_turns_every_bar_off_and_keeps_the_work(monkeypatch):
    monkeypatch.setenv(PROGRESS_ENV, "0")
    bar = progress_bar(range(3), delay=0)
    assert not progress_bars_enabled() and bar.disable and list(bar) == [0, 1, 2]
    monkeypatch.setenv(PROGRESS_ENV, "1")
    assert progress_bar(range(1), disable=True).disable  # a caller's own disable still holds

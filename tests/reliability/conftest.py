"""The campaign's tally: each property example records whether it ended in a clear error or in a
checked result, and the terminal summary prints the split (the figures docs/reliability.md quotes).
"""

from __future__ import annotations

import collections

import pytest

_OUTCOMES: collections.Counter = collections.Counter()


class Tally:
    def clear_error(self) -> None:
        _OUTCOMES["clear error"] += 1

    def checked_result(self) -> None:
        _OUTCOMES["checked result"] += 1


@pytest.fixture(scope="session")
def tally() -> Tally:
    return Tally()


def pytest_terminal_summary(terminalreporter):
    if _OUTCOMES:
        total = sum(_OUTCOMES.values())
        split = ", ".join(f"{n} {kind}" for kind, n in sorted(_OUTCOMES.items()))
        terminalreporter.write_line(f"reliability property examples: {total} ({split})")

"""The skip log: what a run left out and why, counted by reason, with the first few examples of each.

Every loader and run that meets bad input (evaluation's pairs, the training images, the probes'
samples, GATE's and the aggregator's training pairs) skips it, counts it here and goes on. Two
tallies: whole items left out (``counts``: a pair, an image) and parts dropped from items that were
kept (``dropped``: keypoints outside their image). Evaluation calls them ``pairs`` and
``keypoints``.
"""

from __future__ import annotations

from collections import Counter


class SkipLog:
    """Counts per reason plus up to ``MAX_EXAMPLES`` examples per reason (shared by both tallies).

    ``unit`` names what is counted (``"pair"``, ``"image"``) in :meth:`summary` and :meth:`lines`.
    """

    MAX_EXAMPLES = 5

    def __init__(self, unit: str = "item"):
        self.unit = unit
        self.counts: Counter = Counter()
        self.dropped: Counter = Counter()
        self.examples: dict[str, list[str]] = {}

    def add(self, reason: str, where) -> None:
        """One item (a pair, an image) left out for ``reason``; ``where`` names it."""
        self.counts[reason] += 1
        self._example(reason, where)

    def drop(self, reason: str, n: int, where) -> None:
        """``n`` parts (keypoints) of a kept item left out for ``reason``."""
        if n:
            self.dropped[reason] += n
            self._example(reason, where)

    # evaluation's names for the two tallies (its reports speak of pairs and keypoints)
    @property
    def pairs(self) -> Counter:
        return self.counts

    @property
    def keypoints(self) -> Counter:
        return self.dropped

    def _example(self, reason: str, where) -> None:
        shown = self.examples.setdefault(reason, [])
        if len(shown) < self.MAX_EXAMPLES:
            shown.append(str(where))

    @property
    def total(self) -> int:
        """Items left out (dropped parts not counted)."""
        return sum(self.counts.values())

    def merge(self, *others: "SkipLog") -> "SkipLog":
        """Add the counts and examples of ``others`` to this log; returns it."""
        for other in others:
            self.counts.update(other.counts)
            self.dropped.update(other.dropped)
            for reason, shown in other.examples.items():
                for where in shown:
                    self._example(reason, where)
        return self

    def summary(self) -> str:
        """One line: ``"3 images skipped: 1 too small (e.g. a.png); 2 unreadable (e.g. b.jpg, c.jpg)"``."""
        if not self.total:
            return f"no {self.unit}s skipped"
        parts = [f"{n} {reason} (e.g. {', '.join(self.examples.get(reason, []))})"
                 for reason, n in sorted(self.counts.items())]
        return f"{self.total} {self.unit}s skipped: " + "; ".join(parts)

    def lines(self, part: str = "keypoint(s)", shown: int = 3) -> list[str]:
        """One line per reason, the most frequent first: items skipped, then parts dropped."""
        def example(reason):
            return ", ".join(self.examples.get(reason, [])[:shown])

        out = [f"skipped {n} {self.unit}(s): {reason} (e.g. {example(reason)})"
               for reason, n in self.counts.most_common()]
        out += [f"skipped {n} {part}: {reason} (e.g. {example(reason)})" for reason, n in self.dropped.most_common()]
        return out

    def to_json(self) -> dict:
        """``{"counts": {reason: n}, "examples": {reason: [...]}}``, plus ``"dropped"`` when parts were."""
        out = {"counts": dict(self.counts), "examples": {k: list(v) for k, v in self.examples.items()}}
        if self.dropped:
            out["dropped"] = dict(self.dropped)
        return out

    @classmethod
    def from_json(cls, data: dict, unit: str = "item") -> "SkipLog":
        log = cls(unit)
        log.counts.update(data.get("counts", {}))
        log.dropped.update(data.get("dropped", {}))
        log.examples = {k: [str(w) for w in v] for k, v in data.get("examples", {}).items()}
        return log

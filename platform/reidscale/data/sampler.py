"""P×K batch formation from a stream of rows, as plain Python (no Ray, no torch).

The stream arrives roughly clustered by identity (shards keep identities inside row
groups). ``PKBatcher`` keeps a bounded window of identities and emits a batch as soon as
the window holds ``window_identities`` of them, so memory is bounded by the window, not
by the number of identities in the dataset.

Promise of one pass over a stream (one "epoch" of one worker):
- every batch has exactly P distinct identities × K rows each;
- every row of the stream is emitted at least once;
- an identity with fewer than K rows left is topped up by sampling its rows with
  replacement (the fast-reid / torchreid RandomIdentitySampler habit);
- when fewer than P identities remain at the end, the batch is completed with identities
  kept from earlier batches (a small reservoir), so no row is left out.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Iterable, Iterator

import numpy as np


Similarity = Callable[[int, list[int]], np.ndarray]


class PKBatcher:
    """P×K batches from a stream of (identity, row).

    ``similarity(anchor, identities) -> scores`` turns on hard-negative grouping: each batch
    is one anchor identity drawn at random from the window plus the P-1 window identities most
    similar to it (e.g. cosine of last epoch's class centres), instead of P drawn uniformly.
    """

    def __init__(self, p: int, k: int, *, window_identities: int | None = None, seed: int = 0,
                 similarity: Similarity | None = None):
        if p < 2 or k < 1:
            raise ValueError(f"P×K batches need p >= 2 and k >= 1, got p={p}, k={k}")
        self.p, self.k = p, k
        self.similarity = similarity
        self.window = max(window_identities or 4 * p, p)
        self.rng = np.random.default_rng(seed)
        # identity -> list of row payloads not yet emitted
        self._open: OrderedDict[int, list] = OrderedDict()
        # identity -> rows already emitted, kept for topping up the last batch
        self._reservoir: OrderedDict[int, list] = OrderedDict()
        self.rows_in = 0
        self.rows_out = 0

    def add(self, identity: int, row) -> None:
        self._open.setdefault(int(identity), []).append(row)
        self.rows_in += 1

    def rows_of(self, identity: int) -> list:
        """The rows held for ``identity``: those not yet emitted, else those kept for topping up
        (what a ``similarity`` callback may look at; KeyError for an identity not held)."""
        return self._open.get(identity) or self._reservoir[identity]

    def _take(self, identity: int, rows: list) -> list:
        """K rows of one identity: without replacement while there are enough."""
        if len(rows) >= self.k:
            picks = self.rng.choice(len(rows), size=self.k, replace=False)
            chosen = [rows[i] for i in picks]
            for i in sorted(picks, reverse=True):
                rows.pop(i)
            return chosen
        chosen = list(rows)
        rows.clear()
        pool = chosen + self._reservoir.get(identity, [])
        extra = self.rng.choice(len(pool), size=self.k - len(chosen), replace=True)
        return chosen + [pool[i] for i in extra]

    def _remember(self, identity: int, rows: list) -> None:
        self._reservoir.setdefault(identity, []).extend(rows)
        self._reservoir.move_to_end(identity)
        while len(self._reservoir) > 2 * self.p:
            self._reservoir.popitem(last=False)

    def _choose(self, identities: list[int]) -> np.ndarray:
        if self.similarity is None or len(identities) == self.p:
            return self.rng.choice(len(identities), size=self.p, replace=False)
        anchor = int(self.rng.integers(len(identities)))
        scores = np.asarray(self.similarity(identities[anchor], identities), dtype=np.float64)
        scores[anchor] = np.inf  # the anchor itself comes first
        return np.argsort(-scores, kind="stable")[: self.p]

    def _emit(self) -> list[tuple[int, object]]:
        identities = list(self._open)
        chosen = self._choose(identities)
        batch = []
        for i in chosen:
            identity = identities[i]
            rows = self._open[identity]
            taken = self._take(identity, rows)
            batch.extend((identity, r) for r in taken)
            self._remember(identity, taken)
            if not rows:
                del self._open[identity]
        self.rows_out += len(batch)
        return batch

    def ready(self) -> Iterator[list[tuple[int, object]]]:
        """Batches that can be emitted now without breaking the window promise."""
        while len(self._open) >= self.window:
            yield self._emit()

    def flush(self) -> Iterator[list[tuple[int, object]]]:
        """End of stream: emit until every row has been out at least once."""
        while self._open:
            borrowed = []
            if len(self._open) < self.p:
                # fewer than P identities left: borrow identities already emitted
                fillers = [i for i in reversed(self._reservoir) if i not in self._open]
                borrowed = fillers[: self.p - len(self._open)]
                if len(borrowed) < self.p - len(self._open):
                    # the whole stream held fewer than P identities: no valid batch exists
                    self._open.clear()
                    return
                for identity in borrowed:
                    self._open[identity] = list(self._reservoir[identity])
            yield self._emit()
            for identity in borrowed:
                self._open.pop(identity, None)

    def extra(self) -> list[tuple[int, object]]:
        """One more batch from identities already emitted (K rows each, with replacement).

        For a worker whose stream ended before the other workers': every worker must take
        the same number of steps, and these steps repeat rows instead of inventing any.
        """
        pool = list(self._reservoir)
        if len(pool) < self.p:
            raise ValueError(
                f"cannot form an extra P×K batch: only {len(pool)} identities seen, P={self.p}; "
                "use fewer workers or a smaller P for this dataset"
            )
        chosen = self.rng.choice(len(pool), size=self.p, replace=False)
        batch = []
        for i in chosen:
            identity = pool[i]
            rows = self._reservoir[identity]
            picks = self.rng.choice(len(rows), size=self.k, replace=len(rows) < self.k)
            batch.extend((identity, rows[j]) for j in picks)
        return batch

    def batches(self, stream: Iterable[tuple[int, object]]) -> Iterator[list[tuple[int, object]]]:
        """Convenience: consume ``(identity, row)`` pairs and yield every batch."""
        for identity, row in stream:
            self.add(identity, row)
            yield from self.ready()
        yield from self.flush()


class RandomBatcher:
    """The baseline: batches of ``batch_size`` rows drawn uniformly from a shuffle window.

    No identity structure, as a plain shuffled DataLoader gives; kept so users can measure
    what P×K sampling buys them. Same interface as PKBatcher; every row is emitted once,
    the last partial batch is completed with rows already emitted.
    """

    def __init__(self, batch_size: int, *, window_rows: int | None = None, seed: int = 0):
        if batch_size < 2:
            raise ValueError(f"batch_size must be >= 2, got {batch_size}")
        self.batch_size = batch_size
        self.window = max(window_rows or 8 * batch_size, batch_size)
        self.rng = np.random.default_rng(seed)
        self._buffer: list[tuple[int, object]] = []
        self._recent: list[tuple[int, object]] = []

    def add(self, identity: int, row) -> None:
        self._buffer.append((int(identity), row))

    def _emit(self, n: int) -> list[tuple[int, object]]:
        picks = sorted(self.rng.choice(len(self._buffer), size=n, replace=False).tolist(), reverse=True)
        batch = [self._buffer[i] for i in picks]
        for i in picks:
            # swap-remove: O(1) per row, order inside the buffer does not matter
            self._buffer[i] = self._buffer[-1]
            self._buffer.pop()
        self._recent = (self._recent + batch)[-4 * self.batch_size :]
        return batch

    def ready(self) -> Iterator[list[tuple[int, object]]]:
        while len(self._buffer) >= self.window:
            yield self._emit(self.batch_size)

    def flush(self) -> Iterator[list[tuple[int, object]]]:
        while len(self._buffer) >= self.batch_size:
            yield self._emit(self.batch_size)
        if self._buffer:
            rest = self._emit(len(self._buffer))
            fill = [self._recent[i] for i in self.rng.choice(len(self._recent), size=self.batch_size - len(rest))]
            yield rest + fill

    def extra(self) -> list[tuple[int, object]]:
        if not self._recent:
            raise ValueError("cannot form an extra batch: no rows seen")
        return [self._recent[i] for i in self.rng.choice(len(self._recent), size=self.batch_size)]

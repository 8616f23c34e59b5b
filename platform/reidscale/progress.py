"""The progress bar of long work: tqdm on stderr, with log records written above it.

A log record emitted while a bar is drawn would land on the bar's own line (``make demo``
printed "index Flat:   0%|  | 0/2175 [...]/runs/demo/index/untrained/shard-00000.faiss: filled
2175 vectors"). While a bar is open, the console handlers of the root logger and of Ray's
loggers (``ray`` and ``ray.data`` have their own stderr handlers and do not propagate) write
through ``tqdm.write``, which clears the bar, prints the line and redraws the bar below it.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from typing import Iterator

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm


def console_loggers() -> list[logging.Logger]:
    """The root logger, and Ray's loggers when Ray has given them a console handler of their own."""
    def on_console(logger: logging.Logger) -> bool:
        return any(isinstance(h, logging.StreamHandler) and h.stream in (sys.stdout, sys.stderr)
                   for h in logger.handlers)

    ray = [logging.getLogger(name) for name in ("ray", "ray.data")]
    return [logging.root] + [logger for logger in ray if on_console(logger)]


@contextlib.contextmanager
def progress_bar(total: int, desc: str, unit: str) -> Iterator[tqdm]:
    """A tqdm bar counting ``unit`` against ``total`` (redrawn at most every 2 s), log records above it."""
    bar = tqdm(total=total, desc=desc, unit=unit, mininterval=2.0, file=sys.stderr)
    with logging_redirect_tqdm(console_loggers()), bar:
        yield bar

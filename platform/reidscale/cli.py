"""What every job entry point shares: parse the config, run, exit with a clear message."""

from __future__ import annotations

import json
import logging
import sys
from typing import Callable, TypeVar

from reidscale.config import ConfigError, help_text, parse_job_args

T = TypeVar("T")

# Libraries whose INFO lines are for their own developers: faiss's loader writes nine lines per
# process on a CPU without AVX512 ("Could not load library with AVX512-SPR support due to:
# ModuleNotFoundError(...)", ...) before the one that says it loaded; its warnings still show.
QUIET_LIBRARY_LOGGERS = ("faiss.loader",)

# Errors a user can act on: printed as one line, no traceback. Anything else is a bug and keeps its traceback.
EXPECTED_ERRORS = (ConfigError, ValueError, FileNotFoundError)


def _expected() -> tuple[type[BaseException], ...]:
    from reidscale.data.shards import ShardError
    from reidscale.train.checkpoint import CheckpointError
    from reidscale.train.job import TrainingError

    extra = [ShardError, CheckpointError, TrainingError]
    try:
        from reidscale.index.manifest import GalleryError

        extra.append(GalleryError)
    except ImportError:  # pragma: no cover
        pass
    return EXPECTED_ERRORS + tuple(extra)


def human_summary(summary: dict, limit: int = 20) -> list[str]:
    """A few readable lines from a job's summary: top-level numbers and short strings; the
    whole summary (sha256s, nested results) is in the job's JSON file."""
    out = []
    for key, value in summary.items():
        if isinstance(value, bool) or value is None:
            continue
        if isinstance(value, float):
            out.append(f"  {key}: {value:.4g}")
        elif isinstance(value, int):
            out.append(f"  {key}: {value}")
        elif isinstance(value, str) and len(value) <= 160 and "sha256" not in key:
            out.append(f"  {key}: {value}")
    return out[:limit]


def run_job(config_cls: type[T], fn: Callable[[T], dict], argv: list[str] | None = None, doc: str = "",
            print_summary: bool = True) -> int:
    """Parse ``[--config FILE] [key=value ...]`` into ``config_cls``, call ``fn``.

    ``--help`` anywhere prints the job's docstring and every key. A bad config is refused before
    any work (exit 2); an error the user can act on prints one line naming what went wrong (exit 1).
    ``--json`` prints the whole summary as one JSON document on stdout instead of the readable
    lines, for scripts (the log lines go to stderr either way). ``print_summary=False`` is for
    jobs whose output is the printing itself (search prints its results).
    """
    argv = sys.argv[1:] if argv is None else argv
    as_json = "--json" in argv
    argv = [a for a in argv if a != "--json"]
    if not doc:
        doc = getattr(sys.modules.get("__main__"), "__doc__", "") or ""
    if any(a in ("-h", "--help") for a in argv):
        print(help_text(config_cls, doc))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in QUIET_LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        cfg = parse_job_args(config_cls, argv)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    try:
        if as_json and print_summary:
            # stdout is the JSON document only: everything else the job prints, and Ray's relay
            # of its workers' output (which looks sys.stdout up at each line, until Ray shuts
            # down at exit), goes to stderr for the rest of the process
            json_out, sys.stdout = sys.stdout, sys.stderr
        summary = fn(cfg)
    except _expected() as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if not print_summary:
        return 0
    if as_json:  # (print_summary is true: see above)
        print(json.dumps(summary or {}, indent=2, default=str), file=json_out, flush=True)
    elif summary:
        lines = human_summary(summary)
        if lines:
            print("summary:\n" + "\n".join(lines))
    return 0

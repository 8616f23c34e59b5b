"""What every job entry point shares: parse the config, run, exit with a clear message."""

from __future__ import annotations

import json
import sys
from typing import Callable, TypeVar

from reidscale.config import ConfigError, parse_job_args

T = TypeVar("T")


def run_job(config_cls: type[T], fn: Callable[[T], dict], argv: list[str] | None = None) -> int:
    """Parse ``[--config FILE] [key=value ...]`` into ``config_cls``, call ``fn``.

    A bad config is refused before any work (exit 2); a failure in the job prints one
    line naming what went wrong (exit 1) after the traceback.
    """
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(f"usage: [--config FILE.yaml] [key=value ...]\nconfig: {config_cls.__module__}.{config_cls.__name__}")
        return 0
    try:
        cfg = parse_job_args(config_cls, argv)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    try:
        summary = fn(cfg)
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if summary is not None:
        print(json.dumps(summary, indent=2, sort_keys=True, default=str))
    return 0

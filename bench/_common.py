"""Shared bench plumbing: run a function in its own process to get its peak memory, print a
table, write bench/results/<name>.json with the machine it ran on."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Any, Callable

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def _measured(fn: Callable, args: tuple, kwargs: dict) -> tuple[Any, int]:
    result = fn(*args, **kwargs)
    return result, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def run_isolated(fn: Callable, *args, **kwargs) -> tuple[Any, int]:
    """``fn(*args, **kwargs)`` in a fresh spawned process: (its result, that process's peak RSS in bytes).

    A new interpreter per call keeps peaks independent (a forked child would start with the
    parent's pages, and RUSAGE_CHILDREN is a max over all children). ``fn`` must be importable
    (module level) and its arguments and result picklable; the peak includes the interpreter
    and imports (~50-100 MB), so build big inputs inside ``fn``.
    """
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(_measured, (fn, args, kwargs))


def machine_info() -> dict:
    """What a reader needs to compare figures: CPUs, RAM, load when measured, versions."""
    import numpy as np

    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "ram_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "load_average_1_5_15min": [round(x, 2) for x in os.getloadavg()],
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


class Periodic:
    """Calls ``sample()`` every ``interval`` seconds in a thread while the ``with`` block runs, and
    once more at its end (peak memory samplers: what they keep is theirs)."""

    def __init__(self, sample: Callable[[], None], interval: float = 0.2):
        import threading

        self.sample, self.interval = sample, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.sample()


class TreeMemory(Periodic):
    """Samples the summed PSS (proportional set size: shared pages split between the processes
    that map them) of process ``pid`` and all its descendants in a thread: ``peak``, bytes.

    Every 1 s, not faster: PSS walks every mapping, and Ray's workers map its ~7 GB object
    store; at 0.2 s the sampler took 0.16 of a core (system time) from the 2 it measured.
    """

    def __init__(self, pid: int | None = None, interval: float = 1.0):
        import psutil

        self.root, self.peak = psutil.Process(pid or os.getpid()), 0
        super().__init__(self._record, interval)

    def _record(self) -> None:
        import psutil

        total = 0
        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        for proc in procs:
            try:
                total += proc.memory_full_info().pss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        self.peak = max(self.peak, total)


def _tree_child(conn, fn, args) -> None:
    result = fn(*args)
    conn.send((result, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024))
    conn.close()


def run_process_tree(fn: Callable, *args) -> tuple[Any, int, int]:
    """``fn(*args)`` in a fresh spawned, non-daemonic process (DataLoader workers and Ray need
    children, which :func:`run_isolated`'s pool process may not have): (result, its peak RSS,
    peak summed PSS of it and all its descendants).

    The tree is sampled from this process, not inside the measured one, where the sampling
    thread would take the GIL from the loop being timed (10% of a data pipeline's rate).
    """
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_tree_child, args=(child, fn, args))
    proc.start()
    child.close()
    with TreeMemory(proc.pid) as memory:
        try:
            result, peak_rss = parent.recv()
        except EOFError:
            proc.join()
            raise RuntimeError(f"{fn.__name__} died (exit code {proc.exitcode})") from None
    proc.join()
    return result, peak_rss, memory.peak


def _busy_jiffies() -> tuple[int, int]:
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def wait_until_quiet(max_busy: float = 0.15, window: float = 1.0, timeout: float = 60.0) -> float:
    """Block until the machine's CPUs were less than ``max_busy`` busy over ``window`` seconds
    (processes a previous run left behind, such as Ray workers shutting down, would otherwise
    slow the next measurement); give up after ``timeout``. Returns the last busy share."""
    deadline = time.monotonic() + timeout
    while True:
        busy0, total0 = _busy_jiffies()
        time.sleep(window)
        busy1, total1 = _busy_jiffies()
        share = (busy1 - busy0) / max(total1 - total0, 1)
        if share < max_busy or time.monotonic() > deadline:
            return share


def best_search(search: Callable, queries, k: int, repeats: int = 2, warm: int = 64) -> tuple[float, Any]:
    """(best seconds, ids) of ``search(queries, k)`` over ``repeats`` runs after a warm-up on ``warm`` queries."""
    search(queries[:warm], k)
    best, ids = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        _, ids = search(queries, k)
        best = min(best, time.perf_counter() - t0)
    return best, ids


def recall_at_k(found, truth, k: int) -> float:
    """Mean |found ∩ truth| / k over queries (top-k ids each)."""
    import numpy as np

    return float(np.mean([len(np.intersect1d(a[:k], b[:k])) / k for a, b in zip(found, truth)]))


def gib(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.2f} GiB"


def print_table(rows: list[dict], columns: list[str] | None = None) -> None:
    """Rows of dicts as an aligned plain-text table (also valid Markdown)."""
    columns = columns or list(rows[0])
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"
    print(line(columns))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells:
        print(line(row))


def write_results(name: str, payload: dict) -> Path:
    """bench/results/<name>.json with the payload, the command line and the machine."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    doc = {
        "bench": name,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_info(),
        **payload,
    }
    tmp = path.with_suffix(".json.tmp")  # .gitignore'd; a reader never sees half a file
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    tmp.replace(path)
    return path

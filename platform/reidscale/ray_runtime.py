"""The one way a reidscale process starts or joins Ray: loopback only, quiet, and gone with its driver.

``init_ray()`` joins the cluster named by ``RAY_ADDRESS`` (``ray job submit`` sets it for the
job's driver) and otherwise starts a private Ray for this process alone: ``address="local"``,
never ``ray.init()``'s default, which silently joins whatever cluster the last ``ray start`` on
the machine recorded in /tmp/ray/ray_current_cluster, someone else's included.

Loopback. Ray binds its servers (GCS, raylet, object manager, agents, workers, client server)
to the node IP, and ``ray.init``/``ray start`` turn an asked-for 127.0.0.1 back into the
machine's address (``services.resolve_ip_for_localhost`` calls ``get_node_ip_address``,
which on Linux asks the routing table for the address facing 8.8.8.8). The one switch Ray has
for a single-machine node IP is ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (named for the
platforms where it is the default): ``get_node_ip_address`` then answers 127.0.0.1 and every
server binds loopback. It is read at ``import ray``, so a process that imported Ray before
``init_ray`` also gets the module constant set. It is only used where the whole cluster is
this machine: a private Ray, or joining a cluster whose address is loopback.

Fate. A private Ray's gcs_server/raylet die with the driver (Ray sets PR_SET_PDEATHSIG), but
the raylet's DashboardAgent and RuntimeEnvAgent notice and then block up to ~60 s reporting
to the dead GCS while holding their sockets. ``init_ray`` therefore tags the private Ray's
processes (an environment variable every Ray process inherits) and starts a small watchdog
on a pipe from the driver: when the pipe closes (the driver exited, however it died) the
watchdog gives Ray ``FATE_GRACE_S`` to stop by itself, then SIGTERMs and SIGKILLs what is left.

Preemption. Ray Train V2 starts a ``PreemptionWatcher`` actor per run that polls Ray for nodes
being drained (spot instances going away) and logs it. A private Ray is this one machine, and
nothing drains it, so ``init_ray`` turns the watcher off there (``RAY_TRAIN_ENABLE_PREEMPTION_WATCHER=0``,
unless the user set the variable): one process fewer beside a training worker on a small
machine, and no "PreemptionWatcher ... has constructor arguments in the object store"
line (ray-project/ray#53727, printed at error level by Ray's C++ logger) in every local run.
A joined cluster keeps it.

Quiet. Ray's INFO chatter (the "Started a local Ray instance" banner, Ray Data's execution
plans and progress bars glued to our own, Ray Train's per-report "Reporting training result"
and "Checkpoint successfully created") is held at WARNING unless ``verbose=True`` or
``REIDSCALE_RAY_VERBOSE=1``. Ray Train filters its workers' logs by the run's
``RunConfig(logging_config=...)``: pass ``train_logging_config()`` there.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

log = logging.getLogger(__name__)

VERBOSE_ENV = "REIDSCALE_RAY_VERBOSE"
# how our REIDSCALE_RAY_* switches are written
_ON_WORDS = ("1", "true", "yes", "on")
_OFF_WORDS = ("0", "false", "no", "off")
# a private Ray's dashboard: 0/false/no/off leaves it out (unset: Ray's default, on)
DASHBOARD_ENV = "REIDSCALE_RAY_DASHBOARD"
# the quiet_env variables quiet_ray put in os.environ itself (children inherit both)
QUIETED_ENV = "REIDSCALE_QUIETED_VARS"
# every process of a private Ray inherits this from the driver; the watchdog kills by it
OWNER_ENV = "REIDSCALE_RAY_OWNER"
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
# read by Ray Train's controller, which a private Ray starts with this process's environment
PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"
# seconds the watchdog waits for a private Ray to stop by itself once its driver is gone
FATE_GRACE_S = 3.0
_TERM_GRACE_S = 2.0

_watchdog: subprocess.Popen | None = None


def ray_verbose(verbose: bool | None = None) -> bool:
    """``verbose`` if given, else ``REIDSCALE_RAY_VERBOSE`` (1/true/yes/on)."""
    if verbose is not None:
        return bool(verbose)
    return os.environ.get(VERBOSE_ENV, "").strip().lower() in _ON_WORDS


def private_dashboard(include_dashboard: bool | None = None) -> bool | None:
    """Whether a private Ray starts its dashboard: ``include_dashboard`` if given, else
    ``REIDSCALE_RAY_DASHBOARD`` (1/true/yes/on or 0/false/no/off), else None (Ray's default: on).

    Why a switch: the dashboard's module processes (NodeHead, StateHead, JobHead, ... and their
    forkserver: 11 here) wake on timers. On a 2-core machine they cost a 1-worker training run
    3-7.5% of its images/s (docs/benchmarks.md); on a GPU node, not worth a missing dashboard. Off,
    Ray keeps a minimal dashboard.py for its job API."""
    if include_dashboard is not None:
        return include_dashboard
    value = os.environ.get(DASHBOARD_ENV, "").strip().lower()
    if not value:
        return None
    if value in _ON_WORDS:
        return True
    if value in _OFF_WORDS:
        return False
    raise ValueError(f"{DASHBOARD_ENV}={value!r}: not one of {'/'.join(_ON_WORDS)}, {'/'.join(_OFF_WORDS)}")


def quiet_env(verbose: bool | None = None) -> dict[str, str]:
    """Environment for Ray's worker processes that holds Ray Data's logs and bars back.

    Ray Data configures its ``ray.data`` logger at import in every worker from these
    (``RAY_DATA_LOG_LEVEL`` also applies to its ray-data.log files); empty when verbose.
    """
    if ray_verbose(verbose):
        return {}
    return {"RAY_DATA_LOG_LEVEL": "WARNING", "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}


def quiet_ray(verbose: bool | None = None) -> dict[str, str]:
    """Hold Ray's own INFO logs and Ray Data's progress bars back in this process.

    Sets (without overriding a value the user exported) the variables of ``quiet_env`` in
    ``os.environ``, so a private Ray's workers inherit them, and applies them to the
    ``ray``/``ray.data`` loggers and the current ``DataContext`` if Ray is already imported.
    Returns the variables, for a runtime env. When verbose, unsets the ones a quiet parent
    process set (listed in ``REIDSCALE_QUIETED_VARS``), so they do not hold it quiet.
    """
    env = quiet_env(verbose)
    if not env:
        _drop_inherited_quiet()
        return env
    ours = [key for key in env if key not in os.environ]
    for key in ours:
        os.environ[key] = env[key]
    if ours:
        # so a verbose process started from this one can tell our values from the user's
        os.environ[QUIETED_ENV] = ",".join(sorted(set(ours) | set(_quieted_keys())))
    # "ray" carries the banner and Ray Core's INFO lines; ray.data and ray.train set their
    # own levels below it
    logging.getLogger("ray").setLevel(logging.WARNING)
    _hush_bar_notice()
    if "ray.data" in sys.modules:  # configured at its import, before these variables were set
        logging.getLogger("ray.data").setLevel(os.environ["RAY_DATA_LOG_LEVEL"])
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = os.environ["RAY_DATA_DISABLE_PROGRESS_BARS"] in ("", "0")
    return env


def _quieted_keys() -> list[str]:
    return [key for key in os.environ.get(QUIETED_ENV, "").split(",") if key]


def _drop_inherited_quiet() -> None:
    """Verbose: unset the quiet variables a quiet parent process set (not ones the user exported)."""
    quiet = quiet_env(False)
    for key in _quieted_keys():
        if key in quiet and os.environ.get(key) == quiet[key]:
            del os.environ[key]
    os.environ.pop(QUIETED_ENV, None)


def _hush_bar_notice() -> None:
    # each process that runs a dataset warns once that the bars we turned off are off
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)


def train_logging_config(verbose: bool | None = None):
    """``ray.train.LoggingConfig`` for ``RunConfig(logging_config=...)``: WARNING unless verbose.

    Ray Train configures ``ray.train`` in its controller and workers itself and filters the
    console by this level; no environment variable or driver-side logger reaches it.
    """
    import ray.train

    return ray.train.LoggingConfig(log_level="INFO" if ray_verbose(verbose) else "WARNING")


def use_loopback_node_ip() -> None:
    """Make this process, and the Ray processes it starts, take 127.0.0.1 as the node IP."""
    os.environ[LOOPBACK_ENV] = "0"
    if "ray" in sys.modules:
        from ray._private import ray_constants

        # read from the environment at `import ray`; services.get_node_ip_address reads this
        ray_constants.ENABLE_RAY_CLUSTER = False


def is_loopback_address(address: str) -> bool:
    """``127.x.x.x:port``, ``localhost:port``, ``[::1]:port`` (optionally with a scheme)."""
    host = address.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
    return host == "localhost" or host == "::1" or host.startswith("127.")


def init_ray(verbose: bool | None = None, *, num_cpus: int | None = None, temp_dir: str | None = None,
             include_dashboard: bool | None = None, job_name: str = "") -> None:
    """Join ``RAY_ADDRESS`` if set, else start a private loopback Ray that dies with this process.

    Idempotent: does nothing if Ray is already initialised in this process. ``num_cpus``,
    ``temp_dir`` and ``include_dashboard`` (default: ``REIDSCALE_RAY_DASHBOARD``, else on) apply to
    a private Ray only. Ray's INFO chatter stays at WARNING unless ``verbose`` (or
    ``REIDSCALE_RAY_VERBOSE=1``). ``job_name`` (default:
    the script's name) is the job's ``job_name`` metadata, the dashboard's Name column; a
    ``ray job submit --metadata-json '{"job_name": ...}'`` keeps its own (Ray prefers it).
    """
    import ray
    from ray.job_config import JobConfig

    if ray.is_initialized():
        return
    include_dashboard = private_dashboard(include_dashboard)  # a bad setting refused before Ray starts
    env = quiet_ray(verbose)
    job_config = JobConfig(metadata={"job_name": job_name or Path(sys.argv[0] or "python").stem or "python"})
    # the driver's "ray" logger (banner, Ray Core INFO); log_to_driver stays on: our own
    # progress lines come from the training workers
    level = logging.INFO if ray_verbose(verbose) else logging.WARNING
    address = _ray_address()
    if address:
        if is_loopback_address(address):
            use_loopback_node_ip()
        # a private Ray's workers inherit os.environ; a cluster's get these through the job
        ray.init(address=address, runtime_env=_runtime_env(env), log_to_driver=True, logging_level=level,
                 job_config=job_config)
        log.info("joined the Ray cluster at %s", address)
        return
    use_loopback_node_ip()
    os.environ.setdefault(PREEMPTION_WATCHER_ENV, "0")  # nothing drains a private Ray's one node
    _watch_private_ray()
    ctx = ray.init(address="local", num_cpus=num_cpus, _temp_dir=temp_dir, include_dashboard=include_dashboard,
                   runtime_env=_runtime_env(env), log_to_driver=True, logging_level=level, job_config=job_config)
    _tell_watchdog(ray._private.worker.global_worker.node.get_session_dir_path())
    log.info("started a private Ray on 127.0.0.1 (dashboard: %s)", ctx.dashboard_url or "off")


def _ray_address() -> str:
    """The cluster ``init_ray`` joins: ``RAY_ADDRESS``, empty for a private Ray."""
    return os.environ.get("RAY_ADDRESS", "").strip()


def joined_cluster() -> bool:
    """Whether ``init_ray`` joins (or joined) a cluster named by ``RAY_ADDRESS``, not a private Ray."""
    return bool(_ray_address())


def ray_cluster_cpus() -> float:
    """The CPUs of the Ray this process started or joined, as Ray counts them now (0 before Ray starts)."""
    import ray

    return float(ray.cluster_resources().get("CPU", 0.0)) if ray.is_initialized() else 0.0


def cluster_has_gpus() -> bool:
    """Whether the Ray this process joined has GPUs; False without one (serve builds apps before Ray starts)."""
    import ray

    return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0


def resolve_use_gpu(setting: str) -> bool:
    """The ``use_gpu`` rule of every job: ``true``/``false`` as said, ``auto`` = the cluster has GPUs
    (none when this process has not started or joined Ray)."""
    if setting not in ("auto", "true", "false"):
        raise ValueError(f"use_gpu: {setting!r} is not one of auto, true, false")
    return setting == "true" or (setting == "auto" and cluster_has_gpus())


def _runtime_env(env: dict[str, str]) -> dict | None:
    """The job's runtime env when quiet: ``env`` and the ``quiet_worker`` setup hook.

    Leaves out what a submitted job already sets: Ray refuses to merge a driver's runtime env
    with the job's when both set one variable or one field.
    """
    if not env:
        return None
    job = (json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}") or "{}").get("runtime_env") or {})
    taken = set(job.get("env_vars") or {})
    runtime_env: dict = {"env_vars": {k: v for k, v in env.items() if k not in taken}}
    # a hook the job brought is kept (Ray stores an uploaded one as this variable)
    if "worker_process_setup_hook" not in job and "__RAY_WORKER_PROCESS_SETUP_HOOK_ENV_VAR" not in taken:
        runtime_env["worker_process_setup_hook"] = "reidscale.ray_runtime.quiet_worker"
    return runtime_env if runtime_env["env_vars"] or len(runtime_env) > 1 else None


def quiet_worker() -> None:
    """Ray ``worker_process_setup_hook``: Ray's INFO chatter at WARNING in each worker process."""
    import ray

    logging.getLogger("ray").setLevel(logging.WARNING)
    _hush_bar_notice()
    # Ray Train 2.60 logs every report ("Reporting training result N: ...") through a logger
    # named by its file path, outside "ray.train", so RunConfig's logging_config misses it
    context_py = os.path.join(os.path.dirname(ray.__file__), "train", "v2", "_internal", "execution", "context.py")
    logging.getLogger(context_py).setLevel(logging.WARNING)
    # "Checkpoint successfully created" per report and the worker-group start lines come from
    # children of "ray.train", whose levels Ray Train's dictConfig resets when a worker or its
    # controller starts; a logger's filters survive that (RunConfig(logging_config=
    # train_logging_config()) filters the rest of ray.train)
    for name in _TRAIN_CHATTER:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _WarningsOnly) for f in logger.filters):
            logger.addFilter(_WarningsOnly())


class _WarningsOnly(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING


_TRAIN_CHATTER = (
    "ray.train.v2._internal.execution.storage",  # Checkpoint successfully created at: ...
    "ray.train._internal.storage",
    "ray.train.v2._internal.execution.worker_group.worker_group",  # Started training worker group ...
    "ray.train.v2._internal.execution.scaling_policy.scaling_policy",  # Requesting resources ...
    "ray.train.torch.config",  # Setting up process group for: env:// ...
)


# --- fate-sharing watchdog --------------------------------------------------------------


def _watch_private_ray() -> None:
    """Tag the Ray about to start with an owner id and start its watchdog (once a process)."""
    global _watchdog
    if _watchdog is not None and _watchdog.poll() is None:
        return
    owner = f"{os.getpid()}-{uuid.uuid4().hex}"
    os.environ[OWNER_ENV] = owner
    # stdin is the pipe whose end-of-file says the driver is gone; its own session so a
    # Ctrl-C or a hang-up aimed at the driver's terminal leaves it alive to clean up
    _watchdog = subprocess.Popen(
        [sys.executable, "-c", "import sys; from reidscale.ray_runtime import watch; watch(sys.argv[1], int(sys.argv[2]))",
         owner, str(os.getpid())],
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, start_new_session=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)},
    )


def _tell_watchdog(session_dir: str) -> None:
    if _watchdog is not None and _watchdog.poll() is None:
        _watchdog.stdin.write(session_dir.encode() + b"\n")
        _watchdog.stdin.flush()


def _parents() -> dict[int, int]:
    parents = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat", "rb") as fh:
                    parents[int(name)] = int(fh.read().rsplit(b")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    return parents


def _has_env(pid: int, tag: bytes) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as fh:
            return tag in fh.read().split(b"\0")
    except OSError:
        return False


def _holds_file_under(pid: int, prefixes: tuple[str, ...]) -> bool:
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(prefixes):
                return True
        except OSError:
            continue
    return False


def session_pids(owner: str, session_dirs: tuple[str, ...] = ()) -> set[int]:
    """PIDs of one Ray: its environment tag, or a file open under one of its session dirs,
    and every descendant of those (not this process).

    Three signs because none is enough alone: agents and workers rewrite their title with
    setproctitle, which can overwrite what /proc/PID/environ shows; a forkserver child may
    hold no log file; and a process orphaned by the raylet's death has lost its parent.
    """
    tag = f"{OWNER_ENV}={owner}".encode()
    prefixes = tuple(d.rstrip("/") + "/" for d in session_dirs)
    parents = _parents()
    own = {pid for pid in parents if _has_env(pid, tag) or (prefixes and _holds_file_under(pid, prefixes))}
    added = True
    while added:
        grown = {pid for pid, parent in parents.items() if parent in own} - own
        own |= grown
        added = bool(grown)
    own.discard(os.getpid())
    own.discard(os.getppid())  # the watchdog's driver, when it is still there
    return own


def _signal_all(pids: set[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _wait_gone(owner: str, session_dirs: tuple[str, ...], seconds: float) -> set[int]:
    deadline = time.monotonic() + seconds
    while (left := session_pids(owner, session_dirs)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return False


def watch(owner: str, driver: int) -> None:
    """The watchdog's body: wait for the driver to be gone, then end that Ray's processes.

    The driver writes each session dir it starts, one a line. End-of-file comes when the
    driver died, however, but also while a driver that exits normally is still finalising
    (its pipe is closed before its Ray has shut down), so the driver's own PID is waited
    for too, and never signalled: it holds files in the session dir itself.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sessions = tuple(line.decode().strip() for line in sys.stdin.buffer if line.strip())
    while _running(driver):
        time.sleep(0.2)
    left = _wait_gone(owner, sessions, FATE_GRACE_S)
    if left:
        _signal_all(left, signal.SIGTERM)
        left = _wait_gone(owner, sessions, _TERM_GRACE_S)
    _signal_all(left, signal.SIGKILL)

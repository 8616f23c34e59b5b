"""Ray started by reidscale listens on loopback only, goes away with its owner, and stays quiet.

Real processes and real sockets: a driver that calls ``reidscale.ray_runtime.init_ray()``
(a job's private Ray, as ``make demo`` starts it), and heads started by
``clusters/local/start.sh``. The processes of a Ray are found here independently of the
library: psutil's process tree of what the test started, plus every process with a file
open in that Ray's session directory (each Ray process keeps its logs there).
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%")[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
        addr = addr.ipv4_mapped  # a dual-stack socket bound to ::ffff:127.0.0.1
    return addr.is_loopback


def session_processes(session_dir: str, roots: set[int] = frozenset()) -> set[int]:
    """``roots`` and their descendants, plus processes holding a file under ``session_dir``."""
    prefix = session_dir.rstrip("/") + "/"
    found = set()
    for proc in psutil.process_iter():
        try:
            if proc.pid in roots or any(f.path.startswith(prefix) for f in proc.open_files()):
                found.add(proc.pid)
                found |= {c.pid for c in proc.children(recursive=True)}
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def alive(pids: set[int]) -> set[int]:
    out = set()
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.add(pid)
        except psutil.NoSuchProcess:
            continue
    return out


def listeners(pids: set[int]) -> list[tuple[str, int, str]]:
    """(address, port, process) for every listening TCP socket of ``pids``."""
    out = []
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.pid in pids:
            try:
                cmd = psutil.Process(conn.pid).cmdline()
            except psutil.NoSuchProcess:
                continue
            # the program's own name first, then its arguments: a checkout's path length
            # (CI's is longer) must not push the name past a cut
            name = " ".join([Path(cmd[0]).name if cmd else "?", *cmd[1:]])[:160]
            out.append((conn.laddr.ip, conn.laddr.port, name))
    return sorted(out)


def wait_for(predicate, timeout: float, what: str, step: float = 0.5):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(step)


def short_tmp(prefix: str) -> Path:
    # Ray's unix socket paths must stay short, so not pytest's long tmp_path
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def clean_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "REIDSCALE_RAY"))}
    env["PATH"] = f"{BIN}:{env['PATH']}"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "platform"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(extra)
    return env


def test_loopback_check_refuses_wildcards_and_the_machines_address():
    assert all(is_loopback(ip) for ip in ("127.0.0.1", "127.0.1.1", "::1", "::ffff:127.0.0.1"))
    assert not any(is_loopback(ip) for ip in ("0.0.0.0", "::", "192.0.2.2", "::ffff:192.0.2.2", "fd00::2", "10.0.0.1"))


# --- a job's private Ray -------------------------------------------------------------------

DRIVER = """
import os, sys, time
import ray  # imported before init_ray on purpose, as a job that imports Ray Data first does
from reidscale.ray_runtime import init_ray
init_ray(num_cpus=1, temp_dir=sys.argv[1], job_name="probe-job")
jobs = ray._private.worker.global_worker.gcs_client.get_all_job_info()
print("JOB_NAMES", sorted(dict(j.config.metadata).get("job_name", "") for j in jobs.values()), flush=True)
@ray.remote
def where():
    return os.getpid()
ray.get(where.remote())
# stands in for an agent that ignores its raylet's death (and SIGTERM): only the watchdog ends it
import subprocess
subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"])
print("SESSION", ray._private.worker.global_worker.node.get_session_dir_path(), flush=True)
time.sleep(600)
"""


@pytest.mark.timeout(300)
def test_private_ray_listens_on_loopback_only_and_dies_with_its_sigkilled_driver():
    tmp = short_tmp("rs-lo-")
    script = tmp / "driver.py"
    script.write_text(DRIVER)
    driver = subprocess.Popen([sys.executable, str(script), str(tmp / "ray")], env=clean_env(), cwd=tmp,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    pids: set[int] = set()
    try:
        lines = []
        for line in driver.stdout:
            lines.append(line)
            if line.startswith("SESSION "):
                break
        assert lines and lines[-1].startswith("SESSION "), "".join(lines)[-3000:]
        session = lines[-1].split(None, 1)[1].strip()
        # the dashboard's Name column (metadata job_name) says what ran
        assert "JOB_NAMES ['probe-job']\n" in lines, "".join(lines)[-3000:]

        def agents_listening():
            socks = listeners(session_processes(session, {driver.pid}))
            names = " ".join(name for _, _, name in socks)
            return socks if "DashboardAgent" in names and "RuntimeEnvAgent" in names else None

        socks = wait_for(agents_listening, 90, "the dashboard and runtime-env agents to listen")
        pids = session_processes(session, {driver.pid})
        names = " ".join(name for _, _, name in socks)
        assert "gcs_server" in names and "raylet" in names, socks
        public = [s for s in socks if not is_loopback(s[0])]
        assert public == [], f"private Ray sockets not on loopback: {public}"

        os.kill(driver.pid, signal.SIGKILL)
        driver.wait(timeout=30)
        t0 = time.monotonic()
        # the agents used to outlive the driver by ~60 s holding their sockets
        wait_for(lambda: not alive(pids) and not listeners(session_processes(session)), 30,
                 f"the private Ray's processes to exit (left: {alive(pids)})")
        assert time.monotonic() - t0 < 30
    finally:
        if driver.poll() is None:
            driver.kill()
        for pid in alive(pids):  # only what this test's driver started
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(tmp, ignore_errors=True)


DASHBOARD_PROBE = """
import sys, psutil, ray
from reidscale.ray_runtime import init_ray
init_ray(num_cpus=1, temp_dir=sys.argv[1], job_name="dashboard-probe")
assert ray.get(ray.remote(lambda: 1).remote()) == 1
# without its dashboard a private Ray keeps dashboard.py (minimal: the job API) but none of the
# module processes (ray-dashboard-NodeHead-0, -StateHead-0, ...)
def command(p):
    try:
        return " ".join(p.cmdline())
    except psutil.Error:  # a short-lived child of Ray's that exited, or is a zombie, as we looked (seen in CI)
        return ""
heads = [p for p in psutil.Process().children(recursive=True) if command(p).startswith("ray-dashboard-")]
print("DASHBOARD_HEADS", len(heads), flush=True)
"""


@pytest.mark.timeout(180)
@pytest.mark.parametrize("setting,expect_heads", [("0", False), ("on", True)])
def test_the_private_rays_dashboard_follows_the_environment_setting(setting, expect_heads):
    tmp = short_tmp("rs-db-")
    try:
        script = tmp / "probe.py"
        script.write_text(DASHBOARD_PROBE)
        done = subprocess.run([sys.executable, str(script), str(tmp / "ray")], env=clean_env(REIDSCALE_RAY_DASHBOARD=setting),
                              cwd=tmp, capture_output=True, text=True, timeout=150)
        found = [line for line in done.stdout.splitlines() if line.startswith("DASHBOARD_HEADS ")]
        assert found, (done.stdout + done.stderr)[-3000:]
        assert (int(found[0].split()[1]) > 0) == expect_heads, found
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def test_the_dashboard_setting_comes_from_the_argument_else_the_environment(monkeypatch):
    from reidscale import ray_runtime

    monkeypatch.delenv(ray_runtime.DASHBOARD_ENV, raising=False)
    assert ray_runtime.private_dashboard() is None and ray_runtime.private_dashboard(False) is False
    monkeypatch.setenv(ray_runtime.DASHBOARD_ENV, "off")
    assert ray_runtime.private_dashboard() is False and ray_runtime.private_dashboard(True) is True
    monkeypatch.setenv(ray_runtime.DASHBOARD_ENV, "maybe")
    with pytest.raises(ValueError, match="REIDSCALE_RAY_DASHBOARD='maybe'"):
        ray_runtime.private_dashboard()


# --- heads started by clusters/local/start.sh ----------------------------------------------


def head_env(tmp: Path, base: int) -> dict:
    """Every port of a head moved by ``base``, so two heads (and other people's) can coexist."""
    return clean_env(
        RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(tmp / "auth_token"), RAY_NUM_CPUS="1",
        RAY_TEMP_DIR=str(tmp / "ray"), RAY_PORT=str(6300 + base), RAY_DASHBOARD_PORT=str(8300 + base),
        RAY_DASHBOARD_AGENT_PORT=str(52300 + base), RAY_CLIENT_PORT=str(23300 + base),
    )


def read_state(env: dict) -> dict:
    path = Path(env["RAY_TEMP_DIR"]) / f"reidscale-head-{env['RAY_PORT']}.state"
    return dict(line.split("=", 1) for line in path.read_text().splitlines())


def submit(env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [str(BIN / "ray"), "job", "submit", "--address", f"http://127.0.0.1:{env['RAY_DASHBOARD_PORT']}", "--",
         "python", "-c", "import os; print('JOB RAN', os.getpid())"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.timeout(600)
def test_two_start_sh_heads_listen_on_loopback_accept_jobs_and_stop_sh_stops_only_its_own():
    tmp = [short_tmp("rs-ha-"), short_tmp("rs-hb-")]
    envs = [head_env(tmp[0], 71), head_env(tmp[1], 72)]
    start = REPO / "clusters/local/start.sh"
    stop = REPO / "clusters/local/stop.sh"
    try:
        # both at once: start.sh returns only once its head ran a probe job
        procs = [subprocess.Popen(["bash", str(start)], env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True) for e in envs]
        outs = [p.communicate(timeout=300)[0] for p in procs]
        assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-2000:] for o in outs)
        states = [read_state(e) for e in envs]
        heads = [session_processes(s["session_dir"], {int(p) for p in s["pids"].split()}) for s in states]
        assert not heads[0] & heads[1]

        for env, pids in zip(envs, heads):
            socks = listeners(pids)
            ports = {port for _, port, _ in socks}
            for knob in ("RAY_PORT", "RAY_DASHBOARD_PORT", "RAY_DASHBOARD_AGENT_PORT", "RAY_CLIENT_PORT"):
                assert int(env[knob]) in ports, (knob, socks)
            public = [s for s in socks if not is_loopback(s[0])]
            assert public == [], f"start.sh head sockets not on loopback: {public}"

        # the second head's job API works although the first took its ports first
        jobs = [submit(e) for e in envs]
        for job in jobs:
            out = job.communicate(timeout=240)[0]
            assert job.returncode == 0 and "JOB RAN" in out, out[-3000:]

        stopped = subprocess.run(["bash", str(stop)], env=envs[0], capture_output=True, text=True, timeout=120)
        assert stopped.returncode == 0, stopped.stderr
        assert not alive(heads[0]), alive(heads[0])
        survivors = {psutil.Process(p).name() for p in alive(heads[1])}
        assert {"gcs_server", "raylet"} <= survivors, survivors  # the other head is untouched

        stopped = subprocess.run(["bash", str(stop)], env=envs[1], capture_output=True, text=True, timeout=120)
        assert stopped.returncode == 0, stopped.stderr
        assert not alive(session_processes(states[1]["session_dir"], heads[1]))
        again = subprocess.run(["bash", str(stop)], env=envs[1], capture_output=True, text=True, timeout=60)
        assert again.returncode != 0 and "no head recorded" in again.stderr
    finally:
        for env, t in zip(envs, tmp):
            subprocess.run(["bash", str(stop)], env=env, capture_output=True, timeout=120)
            shutil.rmtree(t, ignore_errors=True)


# --- Ray's chatter ---------------------------------------------------------------------------

CHATTY = """
import os, sys, tempfile
import ray
from reidscale.ray_runtime import init_ray, train_logging_config
init_ray(num_cpus=2, temp_dir=sys.argv[1], include_dashboard=False)
import ray.data
rows = ray.data.range(64, override_num_blocks=4).map_batches(lambda b: {"id": b["id"] * 2}).take_all()
print("DATA ROWS", len(rows), flush=True)
import ray.train
from ray.train import Checkpoint, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig
from reidscale.train.trainer import JobScopedTorchTrainer  # what training fits

def loop(config):
    for step in range(2):
        with tempfile.TemporaryDirectory() as d:
            open(os.path.join(d, "x"), "w").write(str(step))
            ray.train.report({"step": step}, checkpoint=Checkpoint.from_directory(d))

run = RunConfig(name="chatter", storage_path=sys.argv[2], logging_config=train_logging_config())
result = JobScopedTorchTrainer(loop, scaling_config=ScalingConfig(num_workers=1), torch_config=TorchConfig(backend="gloo"),
                               run_config=run).fit()
print("TRAIN STEP", result.metrics["step"], flush=True)
"""
RAY_CHATTER = ["Started a local Ray instance", "Starting execution of Dataset", "Reporting training result",
               "Checkpoint successfully created"]
# Ray Train's placement-group cleaner warns so whenever a State API poll times out (a loaded
# machine: 11-12 lines per run here); the trainer training fits runs without it. A private Ray
# runs no preemption watcher, whose start Ray's C++ logger reported at error level every run.
NEVER = ["PlacementGroupCleaner", "Failed to query Ray Train Controller actor state", "PreemptionWatcher"]


def run_chatty(verbose: bool) -> str:
    tmp = short_tmp("rs-q-")
    try:
        (tmp / "chatty.py").write_text(CHATTY)
        env = clean_env(**({"REIDSCALE_RAY_VERBOSE": "1"} if verbose else {}))
        proc = subprocess.run([sys.executable, "chatty.py", str(tmp / "ray"), str(tmp / "results")], env=env,
                              cwd=tmp, capture_output=True, text=True, timeout=400)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, out[-4000:]
        assert "DATA ROWS 64" in out and "TRAIN STEP 1" in out, out[-4000:]
        return out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.timeout(900)
def test_ray_chatter_is_held_at_warning_and_the_verbose_setting_brings_it_back():
    quiet, verbose = run_chatty(False), run_chatty(True)
    assert [line for line in RAY_CHATTER if line in quiet] == [], quiet[-4000:]
    assert [line for line in RAY_CHATTER if line not in verbose] == [], verbose[-4000:]
    assert "INFO" not in quiet, [line for line in quiet.splitlines() if "INFO" in line]
    assert [line for line in NEVER if line in quiet + verbose] == [], (quiet + verbose)[-4000:]


def test_verbosity_comes_from_the_argument_else_the_environment(monkeypatch):
    from reidscale import ray_runtime

    monkeypatch.delenv(ray_runtime.VERBOSE_ENV, raising=False)
    assert not ray_runtime.ray_verbose() and ray_runtime.ray_verbose(True)
    monkeypatch.setenv(ray_runtime.VERBOSE_ENV, "1")
    assert ray_runtime.ray_verbose() and not ray_runtime.ray_verbose(False)
    assert ray_runtime.quiet_env(True) == {} and ray_runtime.quiet_env(False)["RAY_DATA_LOG_LEVEL"] == "WARNING"


def test_a_verbose_process_is_not_held_quiet_by_what_a_quiet_parent_set(monkeypatch):
    # seen in CI: a test that ran init_ray in the pytest process left RAY_DATA_LOG_LEVEL=WARNING
    # in os.environ, and the verbose job it started afterwards inherited it
    from reidscale import ray_runtime

    for key in ("RAY_DATA_LOG_LEVEL", "RAY_DATA_DISABLE_PROGRESS_BARS", ray_runtime.QUIETED_ENV):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("RAY_DATA_DISABLE_PROGRESS_BARS", "0")  # the user's own: kept both ways
    ray_runtime.quiet_ray(False)
    assert os.environ["RAY_DATA_LOG_LEVEL"] == "WARNING" and os.environ["RAY_DATA_DISABLE_PROGRESS_BARS"] == "0"
    assert os.environ[ray_runtime.QUIETED_ENV] == "RAY_DATA_LOG_LEVEL"
    ray_runtime.quiet_ray(True)  # what a child started with REIDSCALE_RAY_VERBOSE=1 runs
    assert "RAY_DATA_LOG_LEVEL" not in os.environ and ray_runtime.QUIETED_ENV not in os.environ
    assert os.environ["RAY_DATA_DISABLE_PROGRESS_BARS"] == "0"


def test_loopback_addresses_are_recognised_for_joining():
    from reidscale.ray_runtime import is_loopback_address

    assert all(map(is_loopback_address, ["127.0.0.1:6379", "localhost:6379", "[::1]:6379", "http://127.0.0.1:8265"]))
    assert not any(map(is_loopback_address, ["192.0.2.2:6379", "head.example:6379", "ray://10.0.0.5:10001"]))


def test_use_gpu_setting_is_refused_unless_auto_true_or_false():
    from reidscale.ray_runtime import resolve_use_gpu

    assert resolve_use_gpu("true") is True and resolve_use_gpu("false") is False
    with pytest.raises(ValueError, match="use_gpu"):
        resolve_use_gpu("yes")


def test_quiet_runtime_env_leaves_what_a_submitted_job_sets(monkeypatch):
    from reidscale.ray_runtime import _runtime_env, quiet_env

    env = quiet_env(False)
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert _runtime_env(env) == {"env_vars": env, "worker_process_setup_hook": "reidscale.ray_runtime.quiet_worker"}
    assert _runtime_env({}) is None
    job = {"runtime_env": {"env_vars": {"RAY_DATA_LOG_LEVEL": "DEBUG"}, "worker_process_setup_hook": "x.y"}}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(job))
    assert _runtime_env(env) == {"env_vars": {"RAY_DATA_DISABLE_PROGRESS_BARS": "1"}}

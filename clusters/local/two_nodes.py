"""A real two-node Ray cluster on one machine, every socket on 127.0.0.1: for the multi-node tests
(tests/test_gallery_distributed.py) and benchmarks (bench/gallery_distributed.py).

A head (``ray start --head``) and a second node (``ray start --address=...``), each with its own
custom resource, token auth on, tagged the way ``clusters/local/start.sh`` tags its head so
``clusters/local/stop.sh --tag`` stops exactly what was started here (never ``ray stop``).

    with two_node_cluster(resources=({"gallery_node_a": 1}, {"gallery_node_b": 1})) as cluster:
        ...  # this process is connected (init_ray); cluster = {"tag", "tmp", "address", "nodes"}

Not product code: it changes two constants of Ray's CLI process to join on loopback (below).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).parent / "ray")

# `ray start --address=...` refuses to join when RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, the switch that
# keeps a node's IP (and so every socket) on 127.0.0.1 (reidscale/ray_runtime.py): without it Ray turns
# --node-ip-address=127.0.0.1 into the machine's address. So the second node runs Ray's own `ray start`
# with the switch on for the node's processes and two module constants of the CLI process changed: the
# refusal off, and a loopback address kept as given. tests/test_gallery_distributed.py checks where
# every listener of both nodes binds.
JOIN_ON_LOOPBACK = """
import sys
from ray._private import ray_constants, services
ray_constants.ENABLE_RAY_CLUSTER = True  # only the CLI's "multi-node not supported" check reads it here
services.resolve_ip_for_localhost = lambda host: host  # --node-ip-address=127.0.0.1 stays 127.0.0.1
from ray.scripts.scripts import main
sys.argv = ["ray", "start", *sys.argv[1:]]
main()
"""


def free_ports(count: int) -> list[int]:
    """Ports free on 127.0.0.1 now (other people's clusters may hold any fixed one)."""
    socks = [socket.socket() for _ in range(count)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def holding_files_under(directory: Path) -> set[int]:
    import psutil

    prefix = str(directory).rstrip("/") + "/"
    found = set()
    for proc in psutil.process_iter():
        try:
            if any(f.path.startswith(prefix) for f in proc.open_files()):
                found.add(proc.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def reload_ray_auth() -> None:
    """Make this process's Ray read RAY_AUTH_MODE / the token again. Ray's core caches both the first
    time any Ray starts in a process, so an earlier private Ray without a token would leave this
    driver unable to join the token-protected cluster. What Ray itself calls when it turns token auth
    on (ray/_private/authentication/authentication_token_setup.py)."""
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def _ray_start(args: list[str], env: dict) -> None:
    command = [RAY, "start"] if "--head" in args else [sys.executable, "-c", JOIN_ON_LOOPBACK]
    proc = subprocess.run([*command, *args], env=env, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"ray start {' '.join(args[:2])} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


@contextlib.contextmanager
def two_node_cluster(resources: tuple[dict, dict] = ({}, {}), num_cpus: int = 2,
                     object_store_bytes: int = 200_000_000, prefix: str = "rs-2n-") -> Iterator[dict]:
    """Start the two nodes, connect this process, yield {"tag", "tmp", "address", "nodes"}; stop both."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))  # Ray's socket paths must stay short
    tag = f"{prefix}{secrets.token_hex(6)}"
    token = tmp / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "REIDSCALE_RAY"))}
    env.update(PATH=f"{Path(sys.executable).parent}:{env['PATH']}", REIDSCALE_RAY_OWNER=tag,
               RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token),
               PYTHONPATH=os.pathsep.join([str(REPO / "platform"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    gcs, client, agent_a, agent_b = free_ports(4)
    address = f"127.0.0.1:{gcs}"
    common = ["--node-ip-address=127.0.0.1", f"--num-cpus={num_cpus}", f"--object-store-memory={object_store_bytes}",
              f"--temp-dir={tmp / 'ray'}", "--disable-usage-stats"]
    saved = {k: os.environ.get(k) for k in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")}
    try:
        _ray_start(["--head", f"--port={gcs}", "--include-dashboard=false", f"--ray-client-server-port={client}",
                    f"--dashboard-agent-listen-port={agent_a}", f"--resources={json.dumps(resources[0])}", *common], env)
        _ray_start([f"--address={address}", f"--dashboard-agent-listen-port={agent_b}",
                    f"--resources={json.dumps(resources[1])}", *common], env)
        os.environ.update(RAY_ADDRESS=address, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token))
        reload_ray_auth()
        import ray

        from reidscale.ray_runtime import init_ray

        init_ray()
        deadline = time.monotonic() + 60
        while len([n for n in ray.nodes() if n["Alive"]]) < 2 and time.monotonic() < deadline:
            time.sleep(0.5)
        nodes = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
        yield {"tag": tag, "tmp": tmp, "address": address, "nodes": nodes}
    finally:
        try:
            import ray

            ray.shutdown()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            reload_ray_auth()  # later Rays in this process see their own setting again
            # by tag only: stop.sh's session-dir sign would also match this process (the driver's
            # logs are there), so what is left holding files in the temp dir is ended here, by pid
            subprocess.run(["bash", str(REPO / "clusters/local/stop.sh"), "--tag", tag], capture_output=True,
                           timeout=120, env={**os.environ, "RAY_STOP_TIMEOUT": "5"})
            for pid in holding_files_under(tmp) - {os.getpid()}:
                os.kill(pid, signal.SIGKILL)
            shutil.rmtree(tmp, ignore_errors=True)

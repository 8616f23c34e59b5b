#!/usr/bin/env bash
# Start a single-machine Ray head for `ray job submit`: every socket on loopback, token auth on.
#
#   clusters/local/start.sh            # returns once the job API has accepted and run a probe job
#   export RAY_AUTH_MODE=token         # clients (ray job submit, ray status) need this too
#   ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/train_clipreid.py run_dir=$PWD/runs/demo
#   clusters/local/stop.sh             # stops this head only (same RAY_PORT / RAY_TEMP_DIR)
#
# Knobs (environment), for a second cluster on the same machine change every port:
#   RAY_PORT (6379)                    GCS port; also names this head's state file
#   RAY_DASHBOARD_PORT (8265)          dashboard + job API
#   RAY_DASHBOARD_AGENT_PORT (52365)   dashboard agent HTTP: job submissions go through it; two
#                                      heads on one port make the second fail with
#                                      "No available agent to submit job"
#   RAY_CLIENT_PORT (10001)            Ray Client server (ray://); Ray has no switch to turn it off
#   RAY_METRICS_EXPORT_PORT (random)   Prometheus exporter of the dashboard agent
#   RAY_NUM_CPUS (all cores), RAY_TEMP_DIR (/tmp/ray), RAY_AUTH_TOKEN_PATH (~/.ray/auth_token),
#   RAY_START_TIMEOUT (120 s to accept a job)
#
# Loopback: `ray start --node-ip-address=127.0.0.1` alone is not enough, Ray turns a loopback
# node IP back into the machine's address (services.resolve_ip_for_localhost) and binds GCS,
# raylet, agents and workers there. RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 is Ray's switch for a
# single-machine node IP (platform/reidscale/ray_runtime.py says more); with it every Ray
# process of this head listens on 127.0.0.1 (tests/test_loopback.py checks each socket).
#
# Stopping only this head: every process Ray starts inherits the environment of `ray start`,
# so REIDSCALE_RAY_OWNER=<tag> marks this head's processes (workers and job drivers included;
# stop.sh also finds them by the logs they keep open in the session dir, and by parentage);
# the tag, session dir and PIDs go to $RAY_TEMP_DIR/reidscale-head-$RAY_PORT.state for stop.sh.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
port="${RAY_PORT:-6379}"
dashboard_port="${RAY_DASHBOARD_PORT:-8265}"
agent_port="${RAY_DASHBOARD_AGENT_PORT:-52365}"
client_port="${RAY_CLIENT_PORT:-10001}"
temp_dir="${RAY_TEMP_DIR:-/tmp/ray}"
timeout="${RAY_START_TIMEOUT:-120}"
state="$temp_dir/reidscale-head-$port.state"

export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
if [ "$RAY_AUTH_MODE" = "token" ]; then
  if [ -n "${RAY_AUTH_TOKEN_PATH:-}" ] && [ ! -s "$RAY_AUTH_TOKEN_PATH" ]; then
    # `ray get-auth-token --generate` only writes ~/.ray/auth_token; honour a custom path too
    (umask 077; python -c "import secrets; print(secrets.token_hex(32), end='')" > "$RAY_AUTH_TOKEN_PATH")
  elif [ -z "${RAY_AUTH_TOKEN_PATH:-}" ] && [ -z "${RAY_AUTH_TOKEN:-}" ]; then
    ray get-auth-token --generate >/dev/null
  fi
fi

mkdir -p "$temp_dir"
if [ -s "$state" ]; then
  old_tag="$(sed -n 's/^tag=//p' "$state")"
  if [ -n "$old_tag" ] && [ -n "$(bash "$here/stop.sh" --list "$old_tag" "$(sed -n 's/^session_dir=//p' "$state")")" ]; then
    echo "start.sh: a head started by start.sh on port $port is still running ($state); stop it with clusters/local/stop.sh" >&2
    exit 1
  fi
fi
tag="head-$port-$(python -c "import secrets; print(secrets.token_hex(8))")"
export REIDSCALE_RAY_OWNER="$tag"

args=(--head --node-ip-address=127.0.0.1 --dashboard-host=127.0.0.1
      --port="$port" --dashboard-port="$dashboard_port" --dashboard-agent-listen-port="$agent_port"
      --ray-client-server-port="$client_port" --temp-dir="$temp_dir" --disable-usage-stats)
[ -n "${RAY_NUM_CPUS:-}" ] && args+=(--num-cpus="$RAY_NUM_CPUS")
[ -n "${RAY_METRICS_EXPORT_PORT:-}" ] && args+=(--metrics-export-port="$RAY_METRICS_EXPORT_PORT")

fail() {
  echo "start.sh: $1; stopping what it started (logs: $temp_dir/session_latest/logs)" >&2
  bash "$here/stop.sh" --tag "$tag" "${session_dir:-}" >/dev/null 2>&1 || true
  if [ -f "$state" ] && grep -qxF "tag=$tag" "$state"; then rm -f "$state"; fi
  exit 1
}
ray start "${args[@]}" "$@" || fail "ray start failed"
# from this head's raylet, not session_latest, which another head in the same temp dir may move
session_dir="$(for p in $(bash "$here/stop.sh" --list "$tag"); do
  cat "/proc/$p/cmdline" 2>/dev/null | tr '\0' '\n' | sed -n 's/^--session_dir=//p'; done | head -n1 || true)"
pids="$(bash "$here/stop.sh" --list "$tag" "$session_dir" | sort -n | tr '\n' ' ')"
{
  echo "tag=$tag"
  echo "session_dir=$session_dir"
  echo "dashboard=http://127.0.0.1:$dashboard_port"
  echo "pids=$pids"
} > "$state.tmp"
mv "$state.tmp" "$state"

# Ready means a job goes through: the dashboard answers, an agent takes the submission and
# the job's driver runs. Probing the job API over HTTP with the token (not `ray job submit`,
# which costs a Python start-up per try).
python - "http://127.0.0.1:$dashboard_port" "$timeout" <<'PY' || fail "the job API did not accept a job within ${timeout}s"
import json, os, pathlib, sys, time, urllib.error, urllib.request

url, timeout = sys.argv[1], float(sys.argv[2])
headers = {"Content-Type": "application/json"}
if os.environ.get("RAY_AUTH_MODE") == "token":
    token = os.environ.get("RAY_AUTH_TOKEN") or pathlib.Path(
        os.environ.get("RAY_AUTH_TOKEN_PATH") or pathlib.Path.home() / ".ray" / "auth_token").read_text().strip()
    headers["Authorization"] = f"Bearer {token}"


def call(method, path, body=None):
    req = urllib.request.Request(url + path, method=method, headers=headers,
                                 data=json.dumps(body).encode() if body is not None else None)
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read() or b"null")


deadline, job, last = time.monotonic() + timeout, None, "no answer"
while time.monotonic() < deadline:
    try:
        if job is None:
            job = call("POST", "/api/jobs/", {"entrypoint": "true"})["submission_id"]
        status = call("GET", f"/api/jobs/{job}")["status"]
        if status == "SUCCEEDED":
            sys.exit(0)
        if status in ("FAILED", "STOPPED"):
            last, job = f"probe job {status}", None
    except (OSError, urllib.error.URLError, KeyError, ValueError) as exc:
        last = str(exc)
    time.sleep(1)
print(f"start.sh: last answer: {last}", file=sys.stderr)
sys.exit(1)
PY

echo "Ray head up on 127.0.0.1 (tag $tag, state $state). Submit with:"
echo "  export RAY_AUTH_MODE=$RAY_AUTH_MODE${RAY_AUTH_TOKEN_PATH:+ RAY_AUTH_TOKEN_PATH=$RAY_AUTH_TOKEN_PATH}"
echo "  ray job submit --address http://127.0.0.1:$dashboard_port --working-dir . -- python jobs/train_clipreid.py run_dir=\$PWD/runs/demo"

#!/usr/bin/env bash
# Start a local Ray head for `ray job submit`, bound to loopback, with token authentication.
#
#   clusters/local/start.sh            # head on 127.0.0.1, dashboard/job API on :8265
#   export RAY_AUTH_MODE=token         # clients (ray job submit, ray status) need this too
#   ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/train_clipreid.py run_dir=$PWD/runs/demo
#   clusters/local/stop.sh
#
# Environment knobs: RAY_PORT (6379), RAY_DASHBOARD_PORT (8265), RAY_NUM_CPUS (all cores),
# RAY_TEMP_DIR (Ray's default /tmp/ray), RAY_AUTH_TOKEN_PATH (default ~/.ray/auth_token).
#
# Ray 2.5x+ refuses unauthenticated job submissions when the head runs with
# RAY_AUTH_MODE=token. The dashboard binds to 127.0.0.1 here; Ray's GCS still listens on
# every interface, which is why token authentication is on by default in this script.
set -euo pipefail
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
if [ "$RAY_AUTH_MODE" = "token" ]; then
  if [ -n "${RAY_AUTH_TOKEN_PATH:-}" ] && [ ! -s "$RAY_AUTH_TOKEN_PATH" ]; then
    # `ray get-auth-token --generate` only writes ~/.ray/auth_token; honour a custom path too
    (umask 077; python -c "import secrets; print(secrets.token_hex(32), end='')" > "$RAY_AUTH_TOKEN_PATH")
  else
    ray get-auth-token --generate >/dev/null
  fi
fi
args=(--head --node-ip-address=127.0.0.1 --dashboard-host=127.0.0.1
      --port="${RAY_PORT:-6379}" --dashboard-port="${RAY_DASHBOARD_PORT:-8265}"
      --disable-usage-stats)
[ -n "${RAY_NUM_CPUS:-}" ] && args+=(--num-cpus="$RAY_NUM_CPUS")
[ -n "${RAY_TEMP_DIR:-}" ] && args+=(--temp-dir="$RAY_TEMP_DIR")
ray start "${args[@]}" "$@"
echo "Ray head up. Submit with:"
echo "  export RAY_AUTH_MODE=$RAY_AUTH_MODE"
echo "  ray job submit --address http://127.0.0.1:${RAY_DASHBOARD_PORT:-8265} --working-dir . -- python jobs/train_clipreid.py run_dir=\$PWD/runs/demo"

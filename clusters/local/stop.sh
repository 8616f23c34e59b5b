#!/usr/bin/env bash
# Stop the Ray head that clusters/local/start.sh started, and nothing else.
#
#   clusters/local/stop.sh             # the head recorded for RAY_PORT (6379) under RAY_TEMP_DIR (/tmp/ray)
#   clusters/local/stop.sh --tag TAG [SESSION_DIR]   # the processes of the head tagged TAG
#   clusters/local/stop.sh --list TAG [SESSION_DIR]  # print their PIDs, stop nothing
#
# Not `ray stop`: it ends every Ray process of the user, other people's clusters, private
# Rays and jobs included. start.sh tags its head's processes through the environment they
# all inherit (and by the log files they hold open in its session dir, and their children);
# this sends SIGTERM to those, waits RAY_STOP_TIMEOUT (15 s), then SIGKILLs
# the rest. Exit status 1 if one is still there after that.
set -euo pipefail

tagged() {  # PIDs whose environment holds REIDSCALE_RAY_OWNER=$1 exactly
  local f pid
  for f in /proc/[0-9]*/environ; do
    pid="${f#/proc/}"; pid="${pid%/environ}"
    grep -qzxF "REIDSCALE_RAY_OWNER=$1" "$f" 2>/dev/null && echo "$pid"
  done
  return 0
}

owned() {  # $1 tag, $2 session dir (may be empty): this head's PIDs
  # Ray's agents and workers rewrite their title (setproctitle), which can overwrite what
  # /proc/PID/environ shows; every Ray process also keeps its log files open in the session
  # dir, and the children of either kind belong to the head too.
  local seeds
  seeds="$( { tagged "$1"; [ -z "${2:-}" ] || find /proc/[0-9]*/fd -lname "$2/*" -printf '%h\n' 2>/dev/null \
              | cut -d/ -f3 || true; } | sort -un | tr '\n' ' ')"
  [ -n "$seeds" ] || return 0
  ps -eo pid=,ppid= | awk -v seeds="$seeds" -v me="$$" '
    BEGIN { n = split(seeds, s, " "); for (i = 1; i <= n; i++) own[s[i]] = 1 }
    { parent[$1] = $2 }
    END { do { added = 0; for (p in parent) if (!(p in own) && (parent[p] in own)) { own[p] = 1; added = 1 } } while (added)
          for (p in own) if (p != me && (p in parent)) print p }'
}

stop_tag() {  # $1 tag, $2 session dir
  local tag="$1" dir="${2:-}" pids deadline
  pids="$(owned "$tag" "$dir")"
  [ -z "$pids" ] && return 0
  # shellcheck disable=SC2086
  kill -TERM $pids 2>/dev/null || true
  deadline=$(( $(date +%s) + ${RAY_STOP_TIMEOUT:-15} ))
  while [ -n "$(owned "$tag" "$dir")" ] && [ "$(date +%s)" -lt "$deadline" ]; do sleep 0.5; done
  pids="$(owned "$tag" "$dir")"
  if [ -n "$pids" ]; then
    # shellcheck disable=SC2086
    kill -KILL $pids 2>/dev/null || true
    sleep 1
  fi
  pids="$(owned "$tag" "$dir")"
  if [ -n "$pids" ]; then
    echo "stop.sh: still running after SIGKILL: $(echo $pids)" >&2
    return 1
  fi
}

case "${1:-}" in
  --list) owned "${2:?--list needs a tag}" "${3:-}"; exit 0 ;;
  --tag) stop_tag "${2:?--tag needs a tag}" "${3:-}"; exit ;;
  "") ;;
  *) echo "usage: stop.sh [--tag TAG | --list TAG]" >&2; exit 2 ;;
esac

port="${RAY_PORT:-6379}"
temp_dir="${RAY_TEMP_DIR:-/tmp/ray}"
state="$temp_dir/reidscale-head-$port.state"
if [ ! -s "$state" ]; then
  echo "stop.sh: no head recorded at $state (set RAY_PORT / RAY_TEMP_DIR as for start.sh); nothing stopped" >&2
  exit 1
fi
tag="$(sed -n 's/^tag=//p' "$state")"
session_dir="$(sed -n 's/^session_dir=//p' "$state")"
[ -n "$tag" ] || { echo "stop.sh: $state names no tag; nothing stopped" >&2; exit 1; }
stop_tag "$tag" "$session_dir"
# a later ray.init(address="auto") must not find this dead head as the "current" cluster
current="$temp_dir/ray_current_cluster"
if [ -f "$current" ] && [ "$(head -n1 "$current")" = "127.0.0.1:$port" ]; then
  rm -f "$current"
fi
rm -f "$state"
echo "stopped the Ray head on port $port (tag $tag)"

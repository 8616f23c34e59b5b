#!/usr/bin/env bash
# Stop the local Ray head started by clusters/local/start.sh (and any Ray processes of this user).
set -euo pipefail
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
ray stop --force

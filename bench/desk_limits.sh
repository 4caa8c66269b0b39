#!/usr/bin/env bash
# Desk's limits, measured (README "Desk's limits"): 3 replicas sharing one Redis, 60
# parallel clients, the crate's fake Desk capped at 10 calls at once with 200 ms answers;
# without the shaping and with it. Prints a Markdown table.
#
#   bash bench/desk_limits.sh
#
# Knobs (environment): DESK_LIMITS_SECS (10 per run), DESK_LIMITS_CLIENTS (60),
# DESK_LIMITS_REPLICAS (3). Installs redis-server with apt-get when missing (as root).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v redis-server >/dev/null 2>&1; then
    [[ $(id -u) == 0 ]] || { echo "redis-server is missing: apt-get install -y redis-server" >&2; exit 1; }
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
fi
cargo build --release --example desk_limits
exec "${CARGO_TARGET_DIR:-target}/release/examples/desk_limits"

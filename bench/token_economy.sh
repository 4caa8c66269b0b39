#!/usr/bin/env bash
# Token economy: Accounts calls per hour for 3 replicas with 5 s tokens, with and without
# the shared Redis store. Needs redis-server (installed here if absent).
# TOKEN_ECONOMY_SECS sets the measuring window per variant (default 30).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v redis-server >/dev/null; then
  apt-get update -qq && apt-get install -y -qq redis-server
fi
cargo test --release --features redis-tests --test redis token_economy -- --ignored --nocapture

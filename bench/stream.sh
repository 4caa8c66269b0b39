#!/usr/bin/env bash
# Streams 1 GiB down, 1 GiB up (chunked) and 256 MiB up (with Content-Length) through the
# release binary in front of the in-process fake Zoho (tests/memory.rs), then prints the
# throughput each way and the proxy's peak resident memory (VmHWM). Linux only.
#
# `cargo test --release` builds the release binary itself (with the dev-dependencies'
# features unified in), so a separate `cargo build --release` would only be rebuilt.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo test --release --test memory --no-run
cargo test --release --quiet --test memory -- --nocapture

#!/usr/bin/env bash
# Instructions per proxied request, counted by valgrind's callgrind: the product's own
# (user-space) work, free of the machine's noise, against another build in the same run.
#
#   BASELINE_BIN=/path/to/an/earlier/zoho-desk-proxy bash bench/instructions.sh
#
# Wall-clock figures on a shared 2-core VM move by up to 1.4× between rounds (README
# "Performance"); the instructions a request costs move by about 1 %. Each target runs
# under callgrind in turn (ROUNDS rounds, alternating), behind it the same static nginx
# upstream as bench/run.sh and the crate's fake Accounts. Instrumentation is off while it
# starts and warms up (WARM_SECS of load), on for LOAD_SECS of `wrk -t1 -cCONNS`, then the
# count is divided by the requests wrk saw answered, as are the calls into the allocator
# (heaptrack's figure, which it cannot see under mimalloc). Kernel time is not counted:
# this measures what the code does, not what the system calls cost.
#
# Knobs (environment): BASELINE_BIN (required: the build to compare with), PRODUCT_BIN
# (default: target/release/zoho-desk-proxy, built unless SKIP_BUILD=1), ROUNDS (3),
# CONNS (64), LOAD_SECS (8), WARM_SECS (3), TOP=N (print the N functions with the most
# instructions, inclusive, per request, of the product's last round), PRODUCT_ARGS /
# BASELINE_ARGS (extra `serve` arguments of each, split on spaces: e.g. the floors of
# examples/bare_proxy.rs, BASELINE_BIN=target/release/examples/bare_proxy
# BASELINE_ARGS=--raw).
#
# Needs Linux, valgrind, nginx and wrk (installed with apt-get when missing and running
# as root), curl, and cargo.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
ROOT=$PWD

ROUNDS=${ROUNDS:-3}
CONNS=${CONNS:-64}
LOAD_SECS=${LOAD_SECS:-8}
WARM_SECS=${WARM_SECS:-3}
TOP=${TOP:-0}
JSON='{"data":[{"id":"1892000000143237","ticketNumber":"101","subject":"x","status":"Open","statusType":"Open","channel":"Email","email":"c@example.com","createdTime":"2024-01-01T00:00:00.000Z","priority":"High"}]}'

die() {
    printf 'instructions: %s\n' "$*" >&2
    exit 1
}
[[ -n ${BASELINE_BIN:-} && -x ${BASELINE_BIN:-} ]] || die "BASELINE_BIN must name an executable build to compare with"

missing=()
command -v valgrind >/dev/null || missing+=(valgrind)
command -v wrk >/dev/null || missing+=(wrk)
PATH="$PATH:/usr/sbin:/sbin" command -v nginx >/dev/null || missing+=(nginx-light)
if ((${#missing[@]})); then
    ((EUID == 0)) || die "missing ${missing[*]} (install them, or run as root)"
    apt-get update >/dev/null 2>&1 || die "apt-get update failed"
    DEBIAN_FRONTEND=noninteractive apt-get install -y "${missing[@]}" >/dev/null ||
        die "apt-get install ${missing[*]} failed"
fi
export PATH="$PATH:/usr/sbin:/sbin"

TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
BIN=${PRODUCT_BIN:-$TARGET_DIR/release/zoho-desk-proxy}
ACCOUNTS=$TARGET_DIR/debug/examples/bench_accounts
if [[ ${SKIP_BUILD:-0} != 1 ]]; then
    cargo build --release || die "cargo build --release failed"
    cargo build --example bench_accounts || die "cargo build --example bench_accounts failed"
fi
[[ -x $BIN && -x $ACCOUNTS ]] || die "$BIN or $ACCOUNTS is missing (build, or unset SKIP_BUILD)"

WORK=$(mktemp -d)
PIDS=()
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null; done
    wait 2>/dev/null
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
wait_up() { # url
    local _
    for _ in $(seq 300); do
        curl -fsS -o /dev/null "$1" 2>/dev/null && return 0
        sleep 0.1
    done
    return 1
}

UP_PORT=$(free_port)
mkdir -p "$WORK/tmp"
cat >"$WORK/upstream.conf" <<EOF
worker_processes 1;
pid $WORK/upstream.pid;
error_log $WORK/upstream.err warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $WORK/tmp/body; proxy_temp_path $WORK/tmp/proxy;
  fastcgi_temp_path $WORK/tmp/fcgi; uwsgi_temp_path $WORK/tmp/uwsgi; scgi_temp_path $WORK/tmp/scgi;
  tcp_nodelay on;
  keepalive_requests 1000000;
  keepalive_timeout 120s;
  server {
    listen 127.0.0.1:$UP_PORT;
    location /api/ { default_type application/json; return 200 '$JSON'; }
  }
}
EOF
nginx -c "$WORK/upstream.conf" -e "$WORK/upstream.err" -g 'daemon off;' >"$WORK/upstream.out" 2>&1 &
PIDS+=($!)
wait_up "http://127.0.0.1:$UP_PORT/api/x" || die "the nginx upstream did not start: $(cat "$WORK/upstream.err")"

"$ACCOUNTS" 3600 >"$WORK/accounts.out" 2>"$WORK/accounts.err" &
PIDS+=($!)
for _ in $(seq 100); do
    (($(wc -l <"$WORK/accounts.out") >= 4)) && break
    sleep 0.1
done
{
    read -r ACC_URL
    read -r ACC_ID
    read -r ACC_SECRET
    read -r ACC_REFRESH
} <"$WORK/accounts.out" || die "the fake Accounts did not start: $(cat "$WORK/accounts.err")"

# config port [desk table]: the product's config (bench/run.sh's, Desk's own limit lifted).
write_config() {
    cat >"$WORK/proxy-$1.toml" <<EOF
listen = "127.0.0.1:$1"
upstream = "http://127.0.0.1:$UP_PORT"
accounts_url = "$ACC_URL"
token_file = ""

[oauth]
client_id = "$ACC_ID"
client_secret = "$ACC_SECRET"
refresh_token = "$ACC_REFRESH"
max_refreshes_per_10min = 100000
${2:-}
EOF
}

# measure name binary [args]: one round under callgrind; sets REQUESTS, TOTAL and LAST_FILE.
measure() {
    local port pid out
    port=$(free_port)
    write_config "$port" $'[desk]\nmax_concurrent = 100000'
    # A build that predates [desk] runs with its own limits, as it did then.
    "$2" check --config "$WORK/proxy-$port.toml" >/dev/null 2>&1 || write_config "$port"
    out=$WORK/callgrind-$1.out
    rm -f "$out"*
    RUST_LOG=warn valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$out" \
        "$2" serve --config "$WORK/proxy-$port.toml" ${3:-} >"$WORK/$1.stdout" 2>"$WORK/$1.stderr" &
    pid=$!
    wait_up "http://127.0.0.1:$port/_proxy/ready" || die "$1 did not start under valgrind: $(tail -5 "$WORK/$1.stderr")"
    local url="http://127.0.0.1:$port/api/v1/tickets"
    wrk -t1 -c"$CONNS" -d"${WARM_SECS}s" "$url" >/dev/null 2>&1
    callgrind_control -i on "$pid" >/dev/null 2>&1 || die "callgrind_control failed"
    REQUESTS=$(wrk -t1 -c"$CONNS" -d"${LOAD_SECS}s" "$url" 2>/dev/null | awk '/requests in/ {print $1}')
    callgrind_control -i off "$pid" >/dev/null 2>&1
    callgrind_control -d "$pid" >/dev/null 2>&1
    kill "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
    # The dump taken at the load's end is the largest of the files callgrind wrote.
    LAST_FILE=$(ls -S "$out"* | head -1)
    TOTAL=$(callgrind_annotate "$LAST_FILE" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}')
    ALLOCS=$(allocator_calls "$LAST_FILE")
    [[ -n $REQUESTS && $REQUESTS -gt 0 && -n $TOTAL ]] || die "$1: no count (requests '$REQUESTS', instructions '$TOTAL')"
}

# allocator_calls file: the calls into the allocator's entry points that the callgrind
# file records (glibc's malloc, calloc and realloc, or mimalloc's, which the binary uses),
# the count heaptrack would give. Names are written once, then referred to by number.
allocator_calls() {
    awk '
        /^c?fn=\(/ {
            rest = substr($0, index($0, "=") + 1)
            id = substr(rest, 2, index(rest, ")") - 2)
            name = substr(rest, index(rest, ")") + 2)
            if (name != "") names[id] = name
            if ($0 ~ /^cfn=/) callee = id
            next
        }
        /^calls=/ { split(substr($0, 7), c, " "); calls[callee] += c[1] }
        END {
            for (id in calls)
                if (names[id] ~ /^(malloc|calloc|realloc|mi_malloc_aligned|mi_zalloc_aligned|mi_realloc_aligned)$/)
                    total += calls[id]
            print total + 0
        }' "$1"
}

median() { sort -n | awk '{v[NR] = $1} END {if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2}'; }

echo "instructions per request (callgrind), wrk -t1 -c$CONNS for ${LOAD_SECS} s after ${WARM_SECS} s of warm-up, $ROUNDS rounds"
echo "product  $BIN ${PRODUCT_ARGS:-}"
echo "baseline $BASELINE_BIN ${BASELINE_ARGS:-}"
: >"$WORK/results"
for round in $(seq "$ROUNDS"); do
    for target in product baseline; do
        bin=$BIN args=${PRODUCT_ARGS:-}
        [[ $target == baseline ]] && bin=$BASELINE_BIN args=${BASELINE_ARGS:-}
        measure "$target" "$bin" "$args"
        per=$((TOTAL / REQUESTS))
        allocs=$(awk -v a="$ALLOCS" -v n="$REQUESTS" 'BEGIN {printf "%.1f", a / n}')
        printf '  round %d %-8s %9d requests  %6d instructions per request  %5s allocations per request\n' \
            "$round" "$target" "$REQUESTS" "$per" "$allocs"
        echo "$round $target $per $allocs" >>"$WORK/results"
        if [[ $target == product ]]; then
            cp "$LAST_FILE" "$WORK/product-last.callgrind"
            PRODUCT_REQUESTS=$REQUESTS
        fi
    done
done

product=$(awk '$2 == "product" {print $3}' "$WORK/results" | median)
baseline=$(awk '$2 == "baseline" {print $3}' "$WORK/results" | median)
ratio=$(awk '{v[$1, $2] = $3; r[$1] = 1} END {for (k in r) print v[k, "product"] / v[k, "baseline"]}' "$WORK/results" | median)
echo
echo "median: product $product, baseline $baseline instructions per request; product/baseline $(awk -v r="$ratio" 'BEGIN {printf "%.3f", r}')× (median of per-round ratios)"
echo "allocations per request (calls into the allocator, realloc included), medians: product $(awk '$2 == "product" {print $4}' "$WORK/results" | median), baseline $(awk '$2 == "baseline" {print $4}' "$WORK/results" | median)"

if ((TOP > 0)); then
    echo
    echo "The product's last round, inclusive instructions per request, top $TOP:"
    callgrind_annotate --inclusive=yes "$WORK/product-last.callgrind" 2>/dev/null |
        awk -v n="$PRODUCT_REQUESTS" -v top="$TOP" '/^ *[0-9,]+ \(/ && !/PROGRAM TOTALS/ {
            c = $1; gsub(",", "", c);
            sub(/^ *[0-9,]+ +\( *[0-9.]+%\) +/, ""); sub(/ \[.*$/, ""); sub(/^\?\?\?:/, "");
            printf "%8d  %s\n", c / n, substr($0, 1, 140); if (++k >= top) exit }'
fi

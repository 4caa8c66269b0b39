#!/usr/bin/env bash
# Side-by-side benchmark of zoho-desk-proxy against nginx and HAProxy, on loopback only.
#
#   bash bench/run.sh 2>&1 | tee /tmp/bench.txt
#
# Starts, on free loopback ports:
#   upstream  nginx: a ~200-byte static JSON answer (/api/...), a 1 GiB sparse file
#             (/files/big.bin, sendfile) and a WebDAV PUT sink on tmpfs (/sink/...) that
#             reads a whole upload before answering;
#   nginx     the anchor: nginx as a reverse proxy that adds a static Authorization header,
#             upstream keep-alive pool (keepalive 64), proxy_buffering and
#             proxy_request_buffering off (64 KiB buffers for the download), worker_processes
#             2, no access log;
#   haproxy   the second anchor: HAProxy adding the same header (http-request set-header),
#             http-reuse always, nbthread 2, no log;
#   product   the release binary, upstream = the nginx upstream, accounts_url = the crate's
#             fake Accounts (examples/bench_accounts.rs, tokens living 1 h), RUST_LOG=warn;
#   product-rot  a second product whose fake Accounts issues 4 s tokens (so it refreshes
#             every ~2 s), for the token rotation scenario.
# Then runs every scenario in alternation (direct, nginx, haproxy, product, …; ROUNDS
# rounds) so that machine drift cancels, and prints medians, ratios and the product's
# memory, ending with one Markdown table.
#
# Knobs (environment): ROUNDS (3), LOAD_SECS (10), LAT_SECS (5), WARM_SECS (2),
# STREAM_MIB (1024), ROTATE_SECS (4), SKIP_BUILD=1 (use the binaries already built),
# SCENARIOS ("c64 c1 c1000 download upload rotation client tunnel"; client = the upstream
# client alone, hyper-util's against reqwest and a lean-h1 experiment,
# examples/client_bench.rs; tunnel = transparent mode against reverse mode on one product
# with [intercept] on, keep-alive HTTP/1.1 over TLS, examples/tunnel_bench.rs), ANCHOR_EXTRA (nginx directives
# added to the anchor's locations), PRODUCT_ENV (extra environment of the product),
# PRODUCT_TOML (extra proxy.toml lines), PRODUCT_BIN (another build of the product, e.g.
# with other release profile settings; implies nothing about SKIP_BUILD), BASELINE_BIN
# (a second build run as the target "baseline" in the same alternating rounds of the
# load scenarios, with the same config, so that a change is measured against the build
# before it in one run: the summary adds its row and the product/baseline ratios),
# PRODUCT_ARGS / BASELINE_ARGS (extra `serve` arguments of each; "@WORK" is a scratch
# directory of the target's, emptied each time it starts: e.g. recording on against off,
# BASELINE_BIN=target/release/zoho-desk-proxy PRODUCT_ARGS='--record @WORK/bench.har'),
# QUIET_WAIT_SECS (120: how long to wait for other work on the machine to stop),
# PROFILE=1 (one more 64-connection run of each proxy under `perf record -e cpu-clock`,
# top symbols printed before the summary; PROFILE_DIR=dir keeps the perf data files).
#
# Needs Linux, nginx, HAProxy and wrk (installed with apt-get when missing and running as root),
# curl, and cargo. Exits non-zero only when the setup fails; failed requests are counted
# and reported, not fatal.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
ROOT=$PWD

ROUNDS=${ROUNDS:-3}
LOAD_SECS=${LOAD_SECS:-10}
LAT_SECS=${LAT_SECS:-5}
WARM_SECS=${WARM_SECS:-2}
STREAM_MIB=${STREAM_MIB:-1024}
ROTATE_SECS=${ROTATE_SECS:-4}
SCENARIOS=${SCENARIOS:-"c64 c1 c1000 download upload rotation client tunnel"}
# Extra directives for the anchor's location, e.g. ANCHOR_EXTRA='proxy_buffer_size 64k;'.
ANCHOR_EXTRA=${ANCHOR_EXTRA:-}
# Extra environment for the product, e.g. PRODUCT_ENV='TOKIO_WORKER_THREADS=1' or one of
# mimalloc's options (PRODUCT_ENV='MIMALLOC_ARENA_EAGER_COMMIT=0'; the binary's allocator).
PRODUCT_ENV=${PRODUCT_ENV:-}
# Extra proxy.toml lines for the product (after [oauth]; \n for new lines), e.g.
# PRODUCT_TOML='[limits]\nworkers = 1'.
PRODUCT_TOML=${PRODUCT_TOML:-}
PRODUCT_ARGS=${PRODUCT_ARGS:-}
BASELINE_ARGS=${BASELINE_ARGS:-}
STATIC_TOKEN="Zoho-oauthtoken 1000.0123456789abcdef0123456789abcdef.fedcba9876543210fedcba9876543210"

say() { printf '%s\n' "$*"; }
die() {
    printf 'bench: setup failed: %s\n' "$*" >&2
    exit 1
}
has_scenario() { [[ " $SCENARIOS " == *" $1 "* ]]; }

# ---------------------------------------------------------------- processes and cleanup
PIDS=()
WORK=""
SHM=""
cleanup() {
    local pid i
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
        pid=${PIDS[i]}
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        for _ in $(seq 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    [[ -n $WORK && -d $WORK ]] && rm -rf "$WORK"
    [[ -n $SHM && -d $SHM ]] && rm -rf "$SHM"
}
trap cleanup EXIT
stop_pid() { # pid: TERM, then KILL after 5 s; forgets it
    local pid=$1 i
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 50); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    for i in "${!PIDS[@]}"; do [[ ${PIDS[i]} == "$pid" ]] && unset 'PIDS[i]'; done
    PIDS=("${PIDS[@]}")
}
trap 'exit 130' INT TERM

# ---------------------------------------------------------------- tools
[[ $(uname -s) == Linux ]] || die "Linux only (/proc is read for memory and CPU)"
missing=()
command -v nginx >/dev/null 2>&1 || [[ -x /usr/sbin/nginx ]] || missing+=(nginx-light)
command -v haproxy >/dev/null 2>&1 || [[ -x /usr/sbin/haproxy ]] || missing+=(haproxy)
command -v wrk >/dev/null 2>&1 || missing+=(wrk)
command -v curl >/dev/null 2>&1 || missing+=(curl)
command -v ss >/dev/null 2>&1 || missing+=(iproute2)
if ((${#missing[@]})); then
    [[ $(id -u) == 0 ]] || die "missing ${missing[*]}: install them (apt-get install -y ${missing[*]})"
    command -v apt-get >/dev/null 2>&1 || die "missing ${missing[*]} and no apt-get"
    say "installing ${missing[*]} from Debian's packages"
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y "${missing[@]}" >/dev/null 2>&1; then
        apt-get update >/dev/null 2>&1 || die "apt-get update failed"
        DEBIAN_FRONTEND=noninteractive apt-get install -y "${missing[@]}" >/dev/null ||
            die "apt-get install ${missing[*]} failed"
    fi
fi
export PATH="$PATH:/usr/sbin:/sbin"
NGINX=$(command -v nginx) || die "nginx not found after install"
HAPROXY=$(command -v haproxy) || die "haproxy not found after install"

TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
BIN=${PRODUCT_BIN:-$TARGET_DIR/release/zoho-desk-proxy}
ACCOUNTS=$TARGET_DIR/debug/examples/bench_accounts
if [[ ${SKIP_BUILD:-0} != 1 ]]; then
    say "building the release binary (cargo build --release; fat LTO takes minutes)"
    cargo build --release || die "cargo build --release failed"
    # The fake Accounts only answers a few token calls: the dev profile is enough, and a
    # separate invocation keeps the dev-dependencies' features out of the release binary.
    cargo build --example bench_accounts || die "cargo build --example bench_accounts failed"
    if has_scenario client; then
        cargo build --release --example client_bench || die "cargo build --release --example client_bench failed"
    fi
    if has_scenario tunnel; then
        cargo build --release --example tunnel_bench || die "cargo build --release --example tunnel_bench failed"
    fi
fi
CLIENT_BENCH=$TARGET_DIR/release/examples/client_bench
TUNNEL_BENCH=$TARGET_DIR/release/examples/tunnel_bench
[[ -x $BIN ]] || die "$BIN is missing (run without SKIP_BUILD=1)"
[[ -x $ACCOUNTS ]] || die "$ACCOUNTS is missing (run without SKIP_BUILD=1)"

ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
if (($(ulimit -n) < 4096)); then
    say "warning: ulimit -n is $(ulimit -n): the 1000-connection scenario will see errors"
fi

# ---------------------------------------------------------------- files and ports
WORK=$(mktemp -d /tmp/zdp-bench.XXXXXX) || die "mktemp failed"
if [[ -d /dev/shm && -w /dev/shm ]]; then
    SHM=$(mktemp -d /dev/shm/zdp-bench.XXXXXX) || die "mktemp on /dev/shm failed"
else
    SHM=$(mktemp -d /tmp/zdp-bench-sink.XXXXXX) || die "mktemp failed"
fi
# nginx workers run as an unprivileged user: let them read the files and write the sink.
chmod 755 "$WORK"
chmod 1777 "$SHM"
mkdir -p "$WORK/files" "$WORK/tmp" "$SHM/sink" "$SHM/body"
chmod 1777 "$WORK/tmp" "$SHM/sink" "$SHM/body"
truncate -s "$((STREAM_MIB * 1024 * 1024))" "$WORK/files/big.bin" ||
    die "cannot create the ${STREAM_MIB} MiB file"
chmod 644 "$WORK/files/big.bin"
STREAM_BYTES=$((STREAM_MIB * 1024 * 1024))

# Listening ports below the ephemeral range, so that no outgoing connection takes one
# while a proxy restarts.
read -r EPHEMERAL_LOW _ </proc/sys/net/ipv4/ip_local_port_range
PORT_LOW=10000
PORT_SPAN=$((EPHEMERAL_LOW - PORT_LOW))
((PORT_SPAN < 1000)) && PORT_LOW=1025 PORT_SPAN=$((EPHEMERAL_LOW - 1025))
((PORT_SPAN < 100)) && die "no room below the ephemeral port range ($EPHEMERAL_LOW)"
USED_PORTS=" "
free_port() {
    local port
    while :; do
        port=$((PORT_LOW + (RANDOM * 32768 + RANDOM) % PORT_SPAN))
        [[ $USED_PORTS == *" $port "* ]] && continue
        if [[ -z $(ss -Htan "( sport = :$port )" 2>/dev/null) ]]; then
            USED_PORTS+="$port "
            echo "$port"
            return
        fi
    done
}
UP_PORT=$(free_port)
NG_PORT=$(free_port)
HA_PORT=$(free_port)
PR_PORT=$(free_port)
ROT_PORT=$(free_port)
BASE_PORT=$(free_port)
BASELINE_BIN=${BASELINE_BIN:-}
[[ -z $BASELINE_BIN || -x $BASELINE_BIN ]] || die "BASELINE_BIN $BASELINE_BIN is not an executable"

# A Desk-like list answer of ~200 bytes.
JSON='{"data":[{"id":"1892000000143237","ticketNumber":"101","subject":"x","status":"Open","statusType":"Open","channel":"Email","email":"c@example.com","createdTime":"2024-01-01T00:00:00.000Z","priority":"High"}]}'
TEMP_PATHS="client_body_temp_path $SHM/body; proxy_temp_path $WORK/tmp/proxy;
  fastcgi_temp_path $WORK/tmp/fcgi; uwsgi_temp_path $WORK/tmp/uwsgi; scgi_temp_path $WORK/tmp/scgi;"

# The start shared by both nginx configs, up to the inside of `http {`.
nginx_head() { # name
    cat <<EOF
worker_processes 2;
worker_rlimit_nofile 65536;
pid $WORK/$1.pid;
error_log $WORK/$1.err warn;
events { worker_connections 16384; }
http {
  access_log off;
  $TEMP_PATHS
EOF
}

{
    nginx_head upstream
    cat <<EOF
  sendfile on;
  tcp_nopush on;
  tcp_nodelay on;
  keepalive_requests 1000000;
  keepalive_timeout 120s;
  server {
    listen 127.0.0.1:$UP_PORT backlog=1024;
    client_max_body_size 0;
    location /api/ { default_type application/json; return 200 '$JSON'; }
    location = /echo-auth { default_type text/plain; return 200 "\$http_authorization"; }
    location /files/ { alias $WORK/files/; }
    # WebDAV PUT reads the whole body (to tmpfs) before it answers, unlike "return 200",
    # which answers at once and discards the rest: a proxy could then stop forwarding.
    location /sink/ { alias $SHM/sink/; dav_methods PUT; create_full_put_path on; }
  }
}
EOF
} >"$WORK/upstream.conf"

{
    nginx_head anchor
    cat <<EOF
  tcp_nodelay on;
  keepalive_requests 1000000;
  keepalive_timeout 120s;
  upstream desk {
    server 127.0.0.1:$UP_PORT;
    keepalive 64;
    keepalive_requests 1000000;
    keepalive_timeout 120s;
  }
  server {
    listen 127.0.0.1:$NG_PORT backlog=1024;
    client_max_body_size 0;
    proxy_http_version 1.1;
    proxy_set_header Host \$proxy_host;
    proxy_set_header Connection "";
    proxy_set_header Authorization "$STATIC_TOKEN";
    # Stream both ways, as the product does.
    proxy_buffering off;
    proxy_request_buffering off;
    location / {
      proxy_pass http://desk;
      $ANCHOR_EXTRA
    }
    # Unbuffered, nginx reads the upstream through one proxy_buffer_size buffer (4 KiB by
    # default): 64 KiB doubles its download speed. Only here, so that small answers keep
    # nginx's defaults (and its memory at 1000 connections).
    location /files/ {
      proxy_pass http://desk;
      proxy_buffer_size 64k;
      proxy_buffers 8 64k;
      proxy_busy_buffers_size 128k;
      $ANCHOR_EXTRA
    }
  }
}
EOF
} >"$WORK/anchor.conf"

# HAProxy as the second anchor: the same job (add the header, reuse upstream connections),
# 2 threads as nginx has 2 workers, no logs.
cat >"$WORK/haproxy.cfg" <<EOF
global
  nbthread 2
  maxconn 8000
defaults
  mode http
  option http-keep-alive
  http-reuse always
  timeout connect 10s
  timeout client 120s
  timeout server 120s
  timeout http-keep-alive 120s
frontend anchor
  bind 127.0.0.1:$HA_PORT
  http-request set-header Authorization "$STATIC_TOKEN"
  default_backend desk
backend desk
  server up 127.0.0.1:$UP_PORT
EOF
start_haproxy() { # sets HA_PID
    "$HAPROXY" -c -q -f "$WORK/haproxy.cfg" >"$WORK/haproxy.test" 2>&1 ||
        die "haproxy config: $(cat "$WORK/haproxy.test")"
    "$HAPROXY" -db -f "$WORK/haproxy.cfg" >>"$WORK/haproxy.out" 2>&1 &
    HA_PID=$!
    PIDS+=("$HA_PID")
    wait_port "$HA_PORT" || die "haproxy did not listen on $HA_PORT: $(tail -5 "$WORK/haproxy.out")"
}

start_nginx() { # name conf port
    "$NGINX" -t -q -c "$2" -e "$WORK/$1.err" >"$WORK/$1.test" 2>&1 ||
        die "nginx $1 config: $(cat "$WORK/$1.test")"
    "$NGINX" -c "$2" -e "$WORK/$1.err" -g 'daemon off;' >>"$WORK/$1.out" 2>&1 &
    PIDS+=($!)
    wait_port "$3" || die "nginx $1 did not listen on $3: $(cat "$WORK/$1.err")"
}
wait_port() {
    local _
    for _ in $(seq 100); do
        [[ -n $(ss -Htln "( sport = :$1 )" 2>/dev/null) ]] && return 0
        sleep 0.1
    done
    return 1
}
start_accounts() { # name lifetime_secs; sets ACC_URL ACC_ID ACC_SECRET ACC_REFRESH
    "$ACCOUNTS" "$2" >"$WORK/$1.out" 2>"$WORK/$1.err" &
    PIDS+=($!)
    local _
    for _ in $(seq 100); do
        (($(wc -l <"$WORK/$1.out") >= 4)) && break
        sleep 0.1
    done
    (($(wc -l <"$WORK/$1.out") >= 4)) || die "fake accounts $1 did not start: $(cat "$WORK/$1.err")"
    {
        read -r ACC_URL
        read -r ACC_ID
        read -r ACC_SECRET
        read -r ACC_REFRESH
    } <"$WORK/$1.out"
}
# The product's own limit on calls at Desk (desk.max_concurrent, 10 by default) would be
# the bottleneck here, not the proxy: set far above the load. BASELINE_BIN gets the same
# when its `check` accepts it (a build that predates the key runs without it, as it did
# then), so that both builds are measured alike. DESK_TOML= (empty) leaves it out, for a
# PRODUCT_BIN that predates the key.
DESK_TOML=${DESK_TOML-'[desk]\n# bench/run.sh measures the proxy, not Desk'"'"'s limits (bench/desk_limits.sh does).\nmax_concurrent = 100000'}
product_toml() { # name port desk_toml: writes the config of a product
    cat >"$WORK/$1.toml" <<EOF
listen = "127.0.0.1:$2"
upstream = "http://127.0.0.1:$UP_PORT"
accounts_url = "$ACC_URL"
token_file = ""

[oauth]
client_id = "$ACC_ID"
client_secret = "$ACC_SECRET"
refresh_token = "$ACC_REFRESH"
max_refreshes_per_10min = 100000
$(printf '%b' "$3")
$(printf '%b' "$PRODUCT_TOML")
EOF
}
start_product() { # name port [binary [args]]; uses ACC_* the first time; sets LAST_PID
    # @WORK: a scratch directory of this target's, emptied at each start.
    local args=${4-$PRODUCT_ARGS}
    rm -rf "$WORK/files-$1" && mkdir -p "$WORK/files-$1"
    args=${args//@WORK/$WORK/files-$1}
    local unset_zoho=() var
    for var in $(compgen -e | grep '^ZOHO_'); do unset_zoho+=(-u "$var"); done
    if [[ ! -f $WORK/$1.toml ]]; then
        product_toml "$1" "$2" "$DESK_TOML"
        if [[ -n $DESK_TOML && -n ${3:-} && $3 != "$BIN" ]] &&
            ! env "${unset_zoho[@]}" "$3" check --config "$WORK/$1.toml" >/dev/null 2>&1; then
            say "$1: $3 does not take [desk] max_concurrent; it runs with its own limits"
            product_toml "$1" "$2" ""
        fi
    fi
    # shellcheck disable=SC2086 # PRODUCT_ENV and args are lists of words
    env "${unset_zoho[@]}" RUST_LOG=warn $PRODUCT_ENV \
        "${3:-$BIN}" serve --config "$WORK/$1.toml" $args >>"$WORK/$1.out" 2>>"$WORK/$1.log" &
    LAST_PID=$!
    PIDS+=("$LAST_PID")
    local _
    for _ in $(seq 100); do
        curl -fsS -o /dev/null "http://127.0.0.1:$2/_proxy/ready" 2>/dev/null && return 0
        kill -0 "$LAST_PID" 2>/dev/null || break
        sleep 0.1
    done
    die "product $1 not ready on $2: $(tail -5 "$WORK/$1.log")"
}

say "starting upstream nginx :$UP_PORT, anchor nginx :$NG_PORT, product :$PR_PORT, product-rot :$ROT_PORT"
start_nginx upstream "$WORK/upstream.conf" "$UP_PORT"
start_nginx anchor "$WORK/anchor.conf" "$NG_PORT"
NG_MASTER=${PIDS[-1]}
start_haproxy
start_accounts accounts 3600
start_product product "$PR_PORT"
PR_PID=$LAST_PID
if [[ -n $BASELINE_BIN ]]; then
    start_product baseline "$BASE_PORT" "$BASELINE_BIN" "$BASELINE_ARGS"
    BASE_PID=$LAST_PID
fi
rss_kb() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }
hwm_kb() { awk '/^VmHWM:/ {print $2}' "/proc/$1/status"; }
IDLE_START_KB=$(rss_kb "$PR_PID")
curl -fsS -o /dev/null "http://127.0.0.1:$PR_PORT/api/v1/tickets" || die "the product cannot forward a request"
sleep 0.2
IDLE_ONE_KB=$(rss_kb "$PR_PID")
if has_scenario rotation; then
    start_accounts accounts-rot "$ROTATE_SECS"
    start_product product-rot "$ROT_PORT"
    ROT_PID=$LAST_PID
fi
# Each scenario starts with fresh proxies, so that its peak memory is its own.
restart_proxies() {
    stop_pid "$PR_PID"
    stop_pid "$NG_MASTER"
    start_nginx anchor "$WORK/anchor.conf" "$NG_PORT"
    NG_MASTER=${PIDS[-1]}
    stop_pid "$HA_PID"
    start_haproxy
    start_product product "$PR_PORT"
    PR_PID=$LAST_PID
    if [[ -n $BASELINE_BIN ]]; then
        stop_pid "$BASE_PID"
        start_product baseline "$BASE_PORT" "$BASELINE_BIN" "$BASELINE_ARGS"
        BASE_PID=$LAST_PID
    fi
}

# Every target answers, and each proxy injects its header.
[[ $(curl -fsS "http://127.0.0.1:$UP_PORT/api/v1/tickets") == "$JSON" ]] || die "upstream does not answer the JSON"
auth_nginx=$(curl -fsS "http://127.0.0.1:$NG_PORT/echo-auth") || die "anchor nginx does not answer"
[[ $auth_nginx == "$STATIC_TOKEN" ]] || die "anchor nginx sent Authorization '$auth_nginx'"
auth_haproxy=$(curl -fsS "http://127.0.0.1:$HA_PORT/echo-auth") || die "anchor haproxy does not answer"
[[ $auth_haproxy == "$STATIC_TOKEN" ]] || die "anchor haproxy sent Authorization '$auth_haproxy'"
auth_product=$(curl -fsS "http://127.0.0.1:$PR_PORT/echo-auth") || die "product does not answer"
[[ $auth_product == "Zoho-oauthtoken 1000."* ]] || die "product sent Authorization '${auth_product:0:20}…'"

nginx_pids() { # master pid: master and workers
    echo "$1"
    ps -o pid= --ppid "$1" 2>/dev/null | tr -d " "
}
# cpu_ticks pids…: "user system" CPU ticks, summed, from one read of each /proc/<pid>/stat
# (system time is the kernel's part: the system calls, and the loopback TCP work they do).
cpu_ticks() {
    local user=0 sys=0 pid u s
    for pid in "$@"; do
        read -r u s < <(awk '{print $14, $15}' "/proc/$pid/stat" 2>/dev/null)
        user=$((user + ${u:-0})) sys=$((sys + ${s:-0}))
    done
    echo "$user $sys"
}
TICKS=$(getconf CLK_TCK)
per_request() { # ticks requests: µs of CPU per request
    awk -v t="$1" -v hz="$TICKS" -v n="$2" 'BEGIN {printf "%.1f", (n > 0 ? t / hz * 1e6 / n : 0)}'
}
clear_hwm() { # pids…
    local pid
    for pid in "$@"; do echo 5 >"/proc/$pid/clear_refs" 2>/dev/null || true; done
}
sum_hwm() { # pids…: KiB
    local total=0 pid h
    for pid in "$@"; do
        h=$(hwm_kb "$pid" 2>/dev/null) || h=0
        total=$((total + ${h:-0}))
    done
    echo "$total"
}
# The processes whose CPU and memory count for a target (direct: none).
target_pids() {
    case $1 in
    direct) ;;
    nginx) nginx_pids "$NG_MASTER" ;;
    haproxy) echo "$HA_PID" ;;
    product) echo "$PR_PID" ;;
    product-rot) echo "$ROT_PID" ;;
    baseline) echo "$BASE_PID" ;;
    esac
}
target_url() {
    case $1 in
    direct) echo "http://127.0.0.1:$UP_PORT" ;;
    nginx) echo "http://127.0.0.1:$NG_PORT" ;;
    haproxy) echo "http://127.0.0.1:$HA_PORT" ;;
    product) echo "http://127.0.0.1:$PR_PORT" ;;
    product-rot) echo "http://127.0.0.1:$ROT_PORT" ;;
    baseline) echo "http://127.0.0.1:$BASE_PORT" ;;
    esac
}
refreshes_ok() { # port: successful token refreshes so far
    curl -fsS "http://127.0.0.1:$1/_proxy/metrics" 2>/dev/null |
        awk '/^zoho_proxy_token_refreshes_total\{result="ok"\}/ {print $2; f=1} END {if (!f) print 0}'
}

# CPU used by other work on the machine during a run: user + system time of all CPUs
# (/proc/stat) less that of our processes and of the load generator, in % of the
# machine. Loopback softirq time is left out on both sides.
our_ticks() {
    local pid all=()
    for pid in "${PIDS[@]}"; do
        all+=("$pid")
        mapfile -t -O "${#all[@]}" all < <(ps -o pid= --ppid "$pid" 2>/dev/null | tr -d " ")
    done
    local user sys
    read -r user sys < <(cpu_ticks "${all[@]}")
    echo $((user + sys))
}
machine_ticks() { # user+nice+system, and the total
    local c
    read -ra c </proc/stat
    echo "$((c[1] + c[2] + c[3])) $((c[1] + c[2] + c[3] + c[4] + c[5] + c[6] + c[7] + c[8]))"
}
other_start() {
    read -r OTHER_M0 OTHER_T0 <<<"$(machine_ticks)"
    OTHER_O0=$(our_ticks)
}
other_stop() { # load generator ticks; sets OTHER_PCT
    local m1 t1 o1
    read -r m1 t1 <<<"$(machine_ticks)"
    o1=$(our_ticks)
    OTHER_PCT=$(awk -v m=$((m1 - OTHER_M0)) -v t=$((t1 - OTHER_T0)) -v o=$((o1 - OTHER_O0)) -v g="${1:-0}" \
        'BEGIN {x = t > 0 ? 100 * (m - o - g) / t : 0; printf "%.0f", (x < 0 ? 0 : x)}')
}

RESULTS=$WORK/results.txt
: >"$RESULTS"

# ---------------------------------------------------------------- one measurement
# wrk_run scenario target round conns secs: appends one result line (round 0 = warm-up,
# not recorded).
wrk_run() {
    local scen=$1 target=$2 round=$3 conns=$4 secs=$5 threads=2 pids u0 u1 s0 s1 out line
    ((conns < 2)) && threads=1
    mapfile -t pids < <(target_pids "$target")
    clear_hwm "${pids[@]}"
    read -r u0 s0 < <(cpu_ticks "${pids[@]}")
    other_start
    out=$(
        TIMEFORMAT='WRKCPU %U %S'
        { time wrk -t"$threads" -c"$conns" -d"${secs}s" --timeout 5s -s "$ROOT/bench/report.lua" \
            "$(target_url "$target")/api/v1/tickets" 2>&1; } 2>&1
    )
    read -r u1 s1 < <(cpu_ticks "${pids[@]}")
    other_stop "$(awk '/^WRKCPU/ {printf "%.0f", ($2 + $3) * '"$TICKS"'}' <<<"$out")"
    line=$(grep '^BENCH ' <<<"$out")
    if [[ -z $line ]]; then
        say "  $scen $target round $round: wrk failed: $(tail -3 <<<"$out" | tr '\n' ' ')"
        return
    fi
    ((round == 0)) && return
    local requests hwm
    requests=$(sed 's/.* requests=\([0-9]*\).*/\1/' <<<"$line")
    hwm=$(sum_hwm "${pids[@]}")
    line="${line#BENCH } scen=$scen target=$target round=$round cpu_us=$(per_request $((u1 - u0 + s1 - s0)) "$requests") sys_us=$(per_request $((s1 - s0)) "$requests") user_us=$(per_request $((u1 - u0)) "$requests") hwm_kb=$hwm other_pct=$OTHER_PCT"
    echo "$line" >>"$RESULTS"
    say "  $scen round $round $(printf '%-11s' "$target") $(fmt_line "$line")"
}
fmt_line() {
    awk '{
        for (i = 1; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
        printf "%9.0f req/s  p50 %7.3f ms  p99 %7.3f ms  errors %d  cpu %6.1f us/req (kernel %5.1f)  peak %6.1f MiB  other work %s %%\n",
            v["rps"], v["p50_us"] / 1000, v["p99_us"] / 1000,
            v["non2xx"] + v["connect"] + v["read"] + v["write"] + v["timeout"],
            v["cpu_us"], v["sys_us"], v["hwm_kb"] / 1024, v["other_pct"]
    }' <<<"$1"
}

# stream_run download|upload target round
stream_run() {
    local scen=$1 target=$2 round=$3 pids out code bytes secs mbps hwm
    mapfile -t pids < <(target_pids "$target")
    clear_hwm "${pids[@]}"
    if [[ $scen == download ]]; then
        out=$(curl -sS --max-time 300 -o /dev/null -w '%{http_code} %{size_download} %{time_total}' \
            "$(target_url "$target")/files/big.bin" 2>&1)
    else
        out=$(curl -sS --max-time 300 -o /dev/null -H 'Expect:' -T "$WORK/files/big.bin" \
            -w '%{http_code} %{size_upload} %{time_total}' \
            "$(target_url "$target")/sink/up.bin" 2>&1)
    fi
    read -r code bytes secs <<<"$out"
    hwm=$(sum_hwm "${pids[@]}")
    if [[ ! $code =~ ^2 || $bytes != "$STREAM_BYTES" ]]; then
        say "  $scen round $round $target: FAILED ($out)"
        echo "scen=$scen target=$target round=$round failed=1 hwm_kb=$hwm" >>"$RESULTS"
        return
    fi
    mbps=$(awk -v b="$bytes" -v s="$secs" 'BEGIN {printf "%.1f", b / s / 1e6}')
    echo "scen=$scen target=$target round=$round mbps=$mbps hwm_kb=$hwm failed=0" >>"$RESULTS"
    say "  $scen round $round $(printf '%-11s' "$target") $(printf '%8.1f MB/s  peak %6.1f MiB' "$mbps" "$(awk -v k="$hwm" 'BEGIN {print k / 1024}')")"
    rm -f "$SHM/sink/up.bin"
}

# ---------------------------------------------------------------- the scenarios
TARGETS=(direct nginx haproxy product)
[[ -n $BASELINE_BIN ]] && TARGETS+=(baseline)
wrk_scenario() { # scen conns secs
    say "scenario $1: wrk, $2 connection(s), ${3} s per run, $ROUNDS rounds"
    restart_proxies
    local t r
    for t in "${TARGETS[@]}"; do wrk_run "$1" "$t" 0 "$2" "$WARM_SECS"; done
    for r in $(seq "$ROUNDS"); do
        for t in $(rotated "$r" "${TARGETS[@]}"); do
            wrk_run "$1" "$t" "$r" "$2" "$3"
            sleep 1
        done
    done
}
# rotated round items…: the items, starting one further each round, and backwards every
# other round (A B C, C B A, C A B, B A C, …), so that no target always runs right after
# the same one. Rotation alone kept the order (B always after A), and the target that
# always ran second of a pair measured better: the same build as "product" and as
# "baseline" measured 0.96× the throughput and 1.28× the p99 of itself at 64 connections.
rotated() {
    local r=$1
    shift
    local n=$# i
    local items=("$@")
    if ((r % 2)); then
        for ((i = 0; i < n; i++)); do echo "${items[(i + r - 1) % n]}"; done
    else
        for ((i = n - 1; i >= 0; i--)); do echo "${items[(i + r - 1) % n]}"; done
    fi
}
# Other work on the machine (a build, a test suite) skews every figure: wait up to
# QUIET_WAIT_SECS (120) for the CPUs to be idle while our processes idle.
cpu_busy_pct() { # over 2 s, all CPUs
    local a b
    read -ra a </proc/stat
    sleep 2
    read -ra b </proc/stat
    awk -v u=$((b[1] + b[2] + b[3] + b[6] + b[7] + b[8] - a[1] - a[2] - a[3] - a[6] - a[7] - a[8])) \
        -v i=$((b[4] + b[5] - a[4] - a[5])) 'BEGIN {printf "%.0f", (u + i > 0 ? 100 * u / (u + i) : 0)}'
}
QUIET_WAIT_SECS=${QUIET_WAIT_SECS:-120}
waited=0
BUSY=$(cpu_busy_pct)
while ((BUSY > 15 && waited < QUIET_WAIT_SECS)); do
    ((waited == 0)) && say "the machine is busy (${BUSY} % CPU used by other work): waiting up to ${QUIET_WAIT_SECS} s"
    sleep 8
    waited=$((waited + 10))
    BUSY=$(cpu_busy_pct)
done
((BUSY > 15)) && say "warning: ${BUSY} % CPU used by other work: the figures will be skewed"
START=$(date +%s)
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
has_scenario c64 && wrk_scenario c64 64 "$LOAD_SECS"
has_scenario c1 && wrk_scenario c1 1 "$LAT_SECS"
has_scenario c1000 && wrk_scenario c1000 1000 "$LOAD_SECS"
for scen in download upload; do
    has_scenario $scen || continue
    say "scenario $scen: $STREAM_MIB MiB with curl, $ROUNDS rounds"
    restart_proxies
    for r in $(seq "$ROUNDS"); do
        for t in $(rotated "$r" "${TARGETS[@]}"); do stream_run "$scen" "$t" "$r"; done
    done
done
if has_scenario rotation; then
    say "scenario rotation: wrk, 64 connections, ${LOAD_SECS} s per run; product-rot's tokens live ${ROTATE_SECS} s"
    restart_proxies
    stop_pid "$ROT_PID"
    start_product product-rot "$ROT_PORT"
    ROT_PID=$LAST_PID
    ROT_REFRESH_0=$(refreshes_ok "$ROT_PORT")
    ROT_TIME_0=$(date +%s)
    for t in product product-rot; do wrk_run rotation "$t" 0 64 "$WARM_SECS"; done
    for r in $(seq "$ROUNDS"); do
        for t in $(rotated "$r" product product-rot); do
            wrk_run rotation "$t" "$r" 64 "$LOAD_SECS"
            sleep 1
        done
    done
    ROT_REFRESHES=$(($(refreshes_ok "$ROT_PORT") - ROT_REFRESH_0))
    ROT_ELAPSED=$(($(date +%s) - ROT_TIME_0))
fi
if has_scenario client; then
    if [[ -x $CLIENT_BENCH ]]; then
        say "scenario client: the upstream client alone, 64 concurrent GETs to the upstream from one thread, $ROUNDS rounds"
        CLIENT_BENCH_ROUNDS=$ROUNDS "$CLIENT_BENCH" "http://127.0.0.1:$UP_PORT/api/v1/tickets" >"$WORK/client.txt" 2>&1 ||
            say "client_bench failed: $(tail -3 "$WORK/client.txt")"
        sed 's/^/  /' "$WORK/client.txt"
    else
        say "scenario client: $CLIENT_BENCH is missing (run without SKIP_BUILD=1)"
    fi
fi
if has_scenario tunnel; then
    if [[ -x $TUNNEL_BENCH ]]; then
        say "scenario tunnel: one product with [intercept] on; 64 keep-alive HTTP/1.1 connections, plain (reverse mode) against CONNECT + TLS (transparent mode), $ROUNDS alternating rounds of ${LOAD_SECS} s"
        # From $WORK: not the repository's proxy.toml.
        (cd "$WORK" && "$BIN" ca init --dir "$WORK/ca") >"$WORK/ca-init.out" 2>&1 ||
            die "ca init failed: $(cat "$WORK/ca-init.out")"
        TUN_PORT=$(free_port)
        saved_toml=$PRODUCT_TOML
        PRODUCT_TOML="$PRODUCT_TOML\n[intercept]\nenabled = true\nca_dir = \"$WORK/ca\""
        start_product product-tun "$TUN_PORT"
        PRODUCT_TOML=$saved_toml
        TUN_PID=$LAST_PID
        TUNNEL_BENCH_SECS=$LOAD_SECS TUNNEL_BENCH_ROUNDS=$ROUNDS \
            "$TUNNEL_BENCH" "127.0.0.1:$TUN_PORT" "$WORK/ca/ca.pem" "$TUN_PID" >"$WORK/tunnel.txt" 2>&1 ||
            say "tunnel_bench failed: $(tail -3 "$WORK/tunnel.txt")"
        sed 's/^/  /' "$WORK/tunnel.txt"
        stop_pid "$TUN_PID"
    else
        say "scenario tunnel: $TUNNEL_BENCH is missing (run without SKIP_BUILD=1)"
    fi
fi
ELAPSED=$(($(date +%s) - START))

# ---------------------------------------------------------------- optional profile
# PROFILE=1: one more 64-connection run per proxy (not counted above) under
# `perf record -e cpu-clock` (software clock: VMs often lack hardware counters).
profile_target() { # target
    local pids
    mapfile -t pids < <(target_pids "$1")
    perf record -e cpu-clock -F 1999 -g -p "$(
        IFS=,
        echo "${pids[*]}"
    )" -o "$WORK/perf-$1.data" -- sleep "$LOAD_SECS" >/dev/null 2>&1 &
    local perf_pid=$!
    sleep 0.3
    wrk -t2 -c64 -d"$((LOAD_SECS - 1))s" --timeout 5s -s "$ROOT/bench/report.lua" \
        "$(target_url "$1")/api/v1/tickets" 2>&1 | grep '^BENCH' | sed "s/^BENCH/  $1 under perf:/"
    wait "$perf_pid"
    echo
    echo "Profile of $1 (64 connections, cpu-clock samples, self time, ≥ 0.8 %):"
    perf report -i "$WORK/perf-$1.data" --stdio --no-children -g none --sort dso,symbol \
        --percent-limit 0.8 2>/dev/null | grep -v '^#' | grep -v '^$' | sed 's/[ -]*$//' | cut -c1-150 | head -40
    echo
    echo "By kind ($1):"
    perf report -i "$WORK/perf-$1.data" --stdio --no-children -g none --sort dso \
        --percent-limit 0.5 2>/dev/null | grep -v '^#' | grep -v '^$' | sed 's/[ -]*$//' | head -10
    if [[ -n ${PROFILE_DIR:-} ]]; then
        mkdir -p "$PROFILE_DIR" && cp "$WORK/perf-$1.data" "$PROFILE_DIR/" &&
            echo "(kept as $PROFILE_DIR/perf-$1.data)"
    fi
}
if [[ ${PROFILE:-0} == 1 ]]; then
    if command -v perf >/dev/null 2>&1; then
        restart_proxies
        say "profile: perf record during one more 64-connection run per proxy"
        for t in nginx product; do profile_target "$t"; done
    else
        say "PROFILE=1: perf is missing (apt-get install linux-perf); no profile"
    fi
fi

# ---------------------------------------------------------------- summary
# get scen target round key: one value
get() {
    awk -v s="$1" -v t="$2" -v r="$3" -v k="$4" '{
        delete v
        for (i = 1; i <= NF; i++) { n = index($i, "="); v[substr($i, 1, n - 1)] = substr($i, n + 1) }
        if (v["scen"] == s && v["target"] == t && v["round"] == r && (k in v)) print v[k]
    }' "$RESULTS"
}
median() { # numbers on stdin
    sort -g | awk '{a[NR] = $1} END {
        if (NR == 0) print "nan"; else if (NR % 2) print a[(NR + 1) / 2]; else print (a[NR / 2] + a[NR / 2 + 1]) / 2 }'
}
med() { # scen target key: median over rounds
    local r
    for r in $(seq "$ROUNDS"); do get "$1" "$2" "$r" "$3"; done | median
}
maxv() { # scen target key: max over rounds
    local r
    for r in $(seq "$ROUNDS"); do get "$1" "$2" "$r" "$3"; done | sort -g | tail -1
}
errors_sum() { # scen target: failed requests over all rounds
    local r k
    for r in $(seq "$ROUNDS"); do
        for k in non2xx connect read write timeout; do get "$1" "$2" "$r" "$k"; done
    done | awk '{s += $1} END {print s + 0}'
}
# ratio_med scen a b key: median over rounds of a/b
ratio_med() {
    local r x y
    for r in $(seq "$ROUNDS"); do
        x=$(get "$1" "$2" "$r" "$4")
        y=$(get "$1" "$3" "$r" "$4")
        [[ -n $x && -n $y ]] && awk -v x="$x" -v y="$y" 'BEGIN {if (y > 0) print x / y}'
    done | median
}
# added_med scen target: median over rounds of p50(target) - p50(direct), in µs
added_med() {
    local r x y
    for r in $(seq "$ROUNDS"); do
        x=$(get "$1" "$2" "$r" p50_us)
        y=$(get "$1" direct "$r" p50_us)
        [[ -n $x && -n $y ]] && echo $((x - y))
    done | median
}
f() { awk -v x="$1" -v fmt="$2" 'BEGIN {if (x == "nan" || x == "") print "—"; else printf fmt, x}'; }
mib() { awk -v k="$1" 'BEGIN {if (k == "" || k == "nan" || k == 0) print "—"; else printf "%.1f MiB", k / 1024}'; }
ge() { awk -v x="$1" -v y="$2" 'BEGIN {exit !(x != "nan" && y != "nan" && x + 0 >= y + 0)}'; }
verdict() { if ge "$@"; then echo met; else echo MISSED; fi; }

MACHINE="$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo), $(nproc) cores, $(awk '/^MemTotal/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo), Linux $(uname -r)"
NGINX_V=$("$NGINX" -v 2>&1 | sed 's/.*nginx\///')
HAPROXY_V=$("$HAPROXY" -v 2>&1 | head -1 | awk '{print $3}')
WRK_V=$(wrk -v 2>&1 | head -1 | awk '{print $2}')
COMMIT=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
DIRTY=$([[ -n $(git -C "$ROOT" status --porcelain -- src Cargo.toml Cargo.lock 2>/dev/null) ]] && echo ", src modified" || true)

echo
echo "## Benchmark: zoho-desk-proxy vs nginx and HAProxy"
echo
echo "Machine: $MACHINE. nginx $NGINX_V (worker_processes 2, upstream keepalive 64, unbuffered both ways, 64 KiB buffers for the download, no access log), HAProxy $HAPROXY_V (nbthread 2, http-reuse always, set-header Authorization, no log), wrk $WRK_V, product at $COMMIT$DIRTY (release, ${PRODUCT_BIN:+$PRODUCT_BIN, }one worker thread per core, desk.max_concurrent = 100000 so that the proxy is measured and not Desk's limits, RUST_LOG=warn: no per-request log lines${PRODUCT_ENV:+, $PRODUCT_ENV}${PRODUCT_TOML:+, $PRODUCT_TOML})."
echo "Medians of $ROUNDS alternating rounds (direct, nginx, haproxy, product; then nginx, haproxy, product, direct; …); ratios are medians of per-round ratios. Load runs: ${LOAD_SECS} s (1 connection: ${LAT_SECS} s); wrk, the upstream and the proxy share the same $(nproc) cores. CPU = proxy process time per request (nginx: master + workers; HAProxy: its process), of it the kernel's (system time: the system calls and the loopback TCP work they do). Peak = VmHWM during the run (reset before each run; nginx: sum of its processes)."
echo
echo "| scenario | target | throughput | p50 | p99 | ×nginx | ×haproxy | ×direct | p99 ×nginx | p99 ×haproxy | errors | CPU/req | peak RSS |"
echo "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
for scen in c64 c1 c1000; do
    has_scenario $scen || continue
    case $scen in
    c64) label="keep-alive, 64 conns" ;;
    c1) label="1 connection" ;;
    c1000) label="1000 conns" ;;
    esac
    for t in "${TARGETS[@]}"; do
        rps=$(med $scen $t rps)
        p50=$(med $scen $t p50_us)
        p99=$(med $scen $t p99_us)
        if [[ $t == direct ]]; then
            xn="" xh="" xd="1×" pn="" ph=""
        else
            xn=$(f "$(ratio_med $scen $t nginx rps)" '%.2f×')
            xh=$(f "$(ratio_med $scen $t haproxy rps)" '%.2f×')
            xd=$(f "$(ratio_med $scen $t direct rps)" '%.2f×')
            pn=$(f "$(ratio_med $scen $t nginx p99_us)" '%.2f×')
            ph=$(f "$(ratio_med $scen $t haproxy p99_us)" '%.2f×')
        fi
        if [[ $t == direct ]]; then cpu="" peak=""; else
            cpu="$(f "$(med $scen $t cpu_us)" '%.1f µs') ($(f "$(med $scen $t sys_us)" '%.1f') kernel)"
            peak=$(mib "$(maxv $scen $t hwm_kb)")
        fi
        echo "| $label | $t | $(f "$rps" '%.0f req/s') | $(f "$p50" "%.0f µs") | $(f "$p99" '%.0f µs') | $xn | $xh | $xd | $pn | $ph | $(errors_sum $scen $t) | $cpu | $peak |"
    done
done
for scen in download upload; do
    has_scenario $scen || continue
    for t in direct nginx product; do
        mbps=$(med $scen $t mbps)
        fails=$(for r in $(seq "$ROUNDS"); do get $scen $t "$r" failed; done | awk '{s += $1} END {print s + 0}')
        case $t in
        product) xn=$(f "$(ratio_med $scen product nginx mbps)" '%.2f×') xd=$(f "$(ratio_med $scen product direct mbps)" '%.2f×') ;;
        nginx) xn="1×" xd=$(f "$(ratio_med $scen nginx direct mbps)" '%.2f×') ;;
        *) xn="" xd="1×" ;;
        esac
        peak=""
        [[ $t != direct ]] && peak=$(mib "$(maxv $scen $t hwm_kb)")
        echo "| 1 GiB $scen | $t | $(f "$mbps" '%.0f MB/s') | | | $xn | | $xd | | | $fails | | $peak |"
    done
done
if has_scenario rotation; then
    for t in product product-rot; do
        rps=$(med rotation $t rps)
        p50=$(med rotation $t p50_us)
        p99=$(med rotation $t p99_us)
        if [[ $t == product-rot ]]; then
            label="token rotating every ~$((ROTATE_SECS / 2)) s"
            ratio=$(f "$(ratio_med rotation product-rot product p99_us)" '%.2f× steady')
        else
            label="rotation: steady token"
            ratio=""
        fi
        echo "| $label | $t | $(f "$rps" '%.0f req/s') | $(f "$p50" '%.0f µs') | $(f "$p99" '%.0f µs') | | | | $ratio | | $(errors_sum rotation $t) | $(f "$(med rotation $t cpu_us)" '%.1f µs') | $(mib "$(maxv rotation $t hwm_kb)") |"
    done
fi
echo "| idle | product | | | | | | | | | | | $(mib "$IDLE_START_KB") at start, $(mib "$IDLE_ONE_KB") after 1 request |"
if [[ -n $BASELINE_BIN ]]; then
    echo
    echo "Against the baseline ($BASELINE_BIN), same rounds (medians of per-round ratios):"
    for scen in c64 c1 c1000; do
        has_scenario $scen || continue
        echo "- $scen: throughput $(f "$(ratio_med $scen product baseline rps)" '%.2f×'), p99 $(f "$(ratio_med $scen product baseline p99_us)" '%.2f×'), CPU per request $(f "$(ratio_med $scen product baseline cpu_us)" '%.2f×') (user $(f "$(ratio_med $scen product baseline user_us)" '%.2f×'), kernel $(f "$(ratio_med $scen product baseline sys_us)" '%.2f×')), peak RSS $(mib "$(maxv $scen product hwm_kb)") against $(mib "$(maxv $scen baseline hwm_kb)")"
    done
fi
echo
echo "Goals against the better anchor (medians of per-round ratios):"
if has_scenario c64; then
    xn=$(ratio_med c64 product nginx rps)
    xh=$(ratio_med c64 product haproxy rps)
    x=$(awk -v a="$xn" -v b="$xh" 'BEGIN {print (a < b ? a : b)}')
    echo "- 64 conns throughput ≥ 1.1× the better of nginx and HAProxy: $(f "$xn" '%.2f×') nginx's, $(f "$xh" '%.2f×') HAProxy's — $(verdict "$x" 1.1)"
    pn=$(ratio_med c64 product nginx p99_us)
    ph=$(ratio_med c64 product haproxy p99_us)
    x=$(awk -v a="$pn" -v b="$ph" 'BEGIN {print (a > b ? a : b)}')
    echo "- 64 conns p99 ≤ the better of them: $(f "$pn" '%.2f×') nginx's, $(f "$ph" '%.2f×') HAProxy's — $(verdict 1.0 "$x")"
fi
if has_scenario c1; then
    added_p=$(added_med c1 product)
    added_n=$(added_med c1 nginx)
    added_h=$(added_med c1 haproxy)
    echo "- 1 conn latency added over direct below both: product +$(f "$added_p" '%.0f') µs, nginx +$(f "$added_n" '%.0f') µs, HAProxy +$(f "$added_h" '%.0f') µs — $(awk -v p="$added_p" -v n="$added_n" -v h="$added_h" 'BEGIN {print (p < n && p < h ? "met" : "MISSED")}')"
fi
echo
echo "Goals of issue 5 (medians):"
if has_scenario c64; then
    x=$(ratio_med c64 product nginx rps)
    echo "- 64 conns throughput ≥ 1.0× nginx: $(f "$x" '%.2f×') — $(verdict "$x" 1.0)"
    x=$(ratio_med c64 product nginx p99_us)
    echo "- 64 conns p99 ≤ nginx: $(f "$x" '%.2f×') nginx's — $(verdict 1.0 "$x")"
fi
if has_scenario c1; then
    added_p=$(added_med c1 product)
    added_n=$(added_med c1 nginx)
    x=$(awk -v a="$added_p" -v b="$added_n" 'BEGIN {if (b > 0) print a / b; else print "nan"}')
    echo "- 1 conn latency added over direct ≤ 1.2× nginx's: product +$(f "$added_p" '%.0f') µs, nginx +$(f "$added_n" '%.0f') µs, $(f "$x" '%.2f×') — $(verdict 1.2 "$x")"
fi
echo "- idle RSS ≤ 10 MiB: $(mib "$IDLE_ONE_KB") after one request — $(verdict 10240 "$IDLE_ONE_KB")"
if has_scenario c1000; then
    x=$(maxv c1000 product hwm_kb)
    echo "- peak RSS at 1000 conns ≤ 40 MiB: $(mib "$x") — $(verdict 40960 "$x")"
fi
for scen in download upload; do
    has_scenario $scen || continue
    x=$(ratio_med $scen product nginx mbps)
    echo "- $scen ≥ 0.9× nginx: $(f "$x" '%.2f×'), product peak $(mib "$(maxv $scen product hwm_kb)") (idle $(mib "$IDLE_ONE_KB")) — $(verdict "$x" 0.9)"
done
if has_scenario rotation; then
    e=$(errors_sum rotation product-rot)
    x=$(ratio_med rotation product-rot product p99_us)
    echo "- rotation: $ROT_REFRESHES token refreshes in ${ROT_ELAPSED} s, $e failed requests — $( ((e == 0)) && echo met || echo MISSED); p99 $(f "$x" '%.2f×') steady (≤ 1.5×) — $(verdict 1.5 "$x")"
fi
if has_scenario client && [[ -s $WORK/client.txt ]]; then
    echo "- upstream client (point 4): $(grep '^reqwest /' "$WORK/client.txt" || echo 'no result'); the product uses hyper-util's"
    echo "- upstream client, what replacing hyper-util's pool could save: $(grep '^lean-h1 /' "$WORK/client.txt" || echo 'no result')"
fi
if has_scenario tunnel && [[ -s $WORK/tunnel.txt ]]; then
    echo "- transparent mode against reverse mode (same product, 64 keep-alive connections; the client does TLS on the same cores): $(grep '^tunnel/reverse' "$WORK/tunnel.txt" || echo 'no result')"
fi
other_all=$(awk '{for (i = 1; i <= NF; i++) if ($i ~ /^other_pct=/) print substr($i, 11)}' "$RESULTS")
if [[ -n $other_all ]]; then
    echo
    echo "CPU used by other work on the machine during the load runs: median $(median <<<"$other_all") %, max $(sort -g <<<"$other_all" | tail -1) % (0 is a quiet machine; above ~5 % the figures are skewed)."
fi
warnings=$(cat "$WORK"/product*.log 2>/dev/null | grep -c . || true)
echo
echo "Product log lines at RUST_LOG=warn: $warnings. Measured in ${ELAPSED} s; CPU used by other work just before: ${BUSY} %; load average before: $LOAD_BEFORE, after: $(cut -d' ' -f1-3 /proc/loadavg)."
if ((warnings > 0)); then
    echo "Last product log lines:"
    tail -n 5 "$WORK"/product*.log | sed 's/^/    /'
fi
exit 0

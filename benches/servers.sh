#!/usr/bin/env bash
# Real servers under load, native and under `hotstandby record`, in
# interleaved rounds (native, recorded, native, recorded, ...); prints the
# median of each and the ratio as a markdown table for docs/benchmarks.md.
# Every server listens on 127.0.0.1 only; every load is bounded in time.
#   benches/servers.sh [ROUNDS] [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-3}
SECS=${2:-5}
cargo build --release -q -p hotstandby
H=$PWD/target/release/hotstandby
W=$(mktemp -d /tmp/hotstandby-bench-servers.XXXXXX)
chmod 755 "$W"
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    rm -rf "$W"
}
trap cleanup EXIT

wait_tcp() { # port
    for _ in $(seq 1 600); do
        (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0
        sleep 0.05
    done
    echo "nothing listens on $1 after 30 s (supervisor's messages: $W/last.err)" >&2
    cat "$W/last.err" >&2 || true
    return 1
}
# start MODE LOG CMD...: MODE native or record; sets SPID
start() {
    local mode=$1 log=$2
    shift 2
    if [ "$mode" = record ]; then
        rm -rf "$log"
        "$H" record --log "$log" -- "$@" >/dev/null 2>"$W/last.err" &
    else
        "$@" >/dev/null 2>"$W/last.err" &
    fi
    SPID=$!
    PIDS+=("$SPID")
}
stop() { # signal: to the supervisor (forwarded) or the native server
    kill -"$1" "$SPID" 2>/dev/null || true
    for _ in $(seq 1 200); do kill -0 "$SPID" 2>/dev/null || break; sleep 0.05; done
    kill -9 "$SPID" 2>/dev/null || true
    wait "$SPID" 2>/dev/null || true
}
median() { sort -g | awk '{a[NR]=$1} END {if (NR==0) print 0; else if (NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2}'; }
wrk_rps() { wrk -t2 -c"$2" -d"${SECS}s" "$1" 2>/dev/null | awk '/Requests\/sec/ {print $2}'; }

declare -A R
add() { R[$1]="${R[$1]:-} $2"; }

# Server ports are drawn below the ephemeral range (32768-60999 by default),
# where a client socket of an earlier round may still hold the number.

# --- redis-server, redis-benchmark -c 50 SET/GET ---------------------------
bench_redis() { # mode
    local port=$((21000 + RANDOM % 2000))
    start "$1" "$W/redis-log" redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no --dir "$W"
    wait_tcp "$port"
    local out
    out=$(timeout 120 redis-benchmark -p "$port" -c 50 -n 20000 -t set,get -q 2>/dev/null | tr '\r' '\n')
    add "redis-set-$1" "$(echo "$out" | awk '/^SET: [0-9.]+ requests/ {print $2}')"
    add "redis-get-$1" "$(echo "$out" | awk '/^GET: [0-9.]+ requests/ {print $2}')"
    redis-cli -p "$port" shutdown nosave >/dev/null 2>&1 || true
    stop TERM
}

# --- nginx, a master and 2 workers, wrk -c 8 -------------------------------
mkdir -p "$W/ngx/html"
echo "hello" > "$W/ngx/html/index.html"
bench_nginx() {
    local port=$((23000 + RANDOM % 2000))
    cat > "$W/ngx/nginx.conf" <<EOF
worker_processes 2; master_process on; daemon off; error_log stderr crit; pid $W/ngx/nginx.pid;
events { worker_connections 256; }
http { access_log off; client_body_temp_path $W/ngx/b; proxy_temp_path $W/ngx/p; fastcgi_temp_path $W/ngx/f;
  uwsgi_temp_path $W/ngx/u; scgi_temp_path $W/ngx/s; server { listen 127.0.0.1:$port; root $W/ngx/html; } }
EOF
    start "$1" "$W/nginx-log" nginx -c "$W/ngx/nginx.conf" -p "$W/ngx"
    wait_tcp "$port"
    add "nginx-$1" "$(wrk_rps "http://127.0.0.1:$port/" 8)"
    stop QUIT
}

# --- node.js HTTP server, wrk -c 8 -----------------------------------------
bench_node() {
    local port=$((25000 + RANDOM % 2000))
    echo "require('http').createServer((q, s) => s.end('hello\n')).listen($port, '127.0.0.1');" > "$W/srv.js"
    start "$1" "$W/node-log" node "$W/srv.js"
    wait_tcp "$port"
    add "node-$1" "$(wrk_rps "http://127.0.0.1:$port/" 8)"
    stop TERM
}

# --- memcached -t 4, memcslap ---------------------------------------------
bench_memcached() {
    local port=$((27000 + RANDOM % 2000))
    start "$1" "$W/mc-log" memcached -u root -t 4 -U 0 -l 127.0.0.1 -p "$port"
    wait_tcp "$port"
    local t0 t1
    t0=$(date +%s%N)
    timeout 300 memcslap --servers=127.0.0.1:"$port" --concurrency=4 --execute-number=500 >/dev/null 2>&1 || true
    t1=$(date +%s%N)
    add "memcached-$1" "$(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.0f", 2000 / ((b - a) / 1e9)}')"
    stop TERM
}

# --- the syscall loop: 3 syscalls per iteration ------------------------------
gcc -O2 -o "$W/loop" benches/syscall_loop.c
bench_loop() {
    local n=20000 t0 t1
    t0=$(date +%s%N)
    if [ "$1" = record ]; then rm -rf "$W/loop-log"; "$H" record --log "$W/loop-log" -- "$W/loop" $n >/dev/null
    else "$W/loop" $n >/dev/null; fi
    t1=$(date +%s%N)
    add "loop-$1" "$(awk -v a="$t0" -v b="$t1" -v n=$n 'BEGIN {printf "%.0f", 3 * n / ((b - a) / 1e9)}')"
}

for r in $(seq 1 "$ROUNDS"); do
    echo "round $r of $ROUNDS" >&2
    for b in redis nginx node memcached loop; do
        for mode in native record; do "bench_$b" "$mode"; done
    done
done

# Log bytes per redis request, from the last recorded round (2 × 20000 requests).
rbytes=$("$H" log stats "$W/redis-log" | awk '/^log bytes:/ {print $3}')

row() { # name key unit
    local n r
    n=$(echo ${R[$2-native]} | tr ' ' '\n' | median)
    r=$(echo ${R[$2-record]} | tr ' ' '\n' | median)
    awk -v name="$1" -v n="$n" -v r="$r" -v u="$3" 'BEGIN { printf "| %s | %.0f %s | %.0f %s | %.3f× |\n", name, n, u, r, u, (n > 0 ? r / n : 0) }'
}
echo "### Real servers, native vs recorded ($ROUNDS interleaved rounds, medians)"
echo
echo "| load | native | recorded | ratio |"
echo "|---|---|---|---|"
row "redis-benchmark -c 50 SET" redis-set "req/s"
row "redis-benchmark -c 50 GET" redis-get "req/s"
row "wrk -c 8 on nginx (master + 2 workers)" nginx "req/s"
row "wrk -c 8 on node.js" node "req/s"
row "memcslap -c 4 on memcached -t 4 (2000 sets)" memcached "sets/s"
row "syscall loop (clock_gettime, read, write)" loop "syscalls/s"
echo
awk -v b="$rbytes" 'BEGIN { printf "- log: %.0f bytes per redis request (last recorded round, 40000 requests)\n", b / 40000 }'

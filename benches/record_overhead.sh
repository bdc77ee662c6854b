#!/usr/bin/env bash
# Recording overhead, measured as ratios against native runs in the same
# script run. Prints a markdown table for docs/benchmarks.md.
#   benches/record_overhead.sh [ITERATIONS] [REDIS_REQUESTS]
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-100000}
REQ=${2:-50000}
cargo build --release -q -p hotstandby
H=$PWD/target/release/hotstandby
W=$(mktemp -d /tmp/hotstandby-bench.XXXXXX)
cleanup() { [ -n "${RPID:-}" ] && kill "$RPID" 2>/dev/null; rm -rf "$W"; }
trap cleanup EXIT
gcc -O2 -o "$W/loop" benches/syscall_loop.c

now() { date +%s%N; }
best_of() { # best of 3 wall times in ns for a command
    local best=0
    for _ in 1 2 3; do
        rm -rf "$W/log"
        local t0; t0=$(now); "$@" >/dev/null; local t1; t1=$(now)
        local d=$((t1 - t0)); if [ "$best" = 0 ] || [ "$d" -lt "$best" ]; then best=$d; fi
    done
    echo "$best"
}
nat=$(best_of "$W/loop" "$N")
rec=$(best_of "$H" record --log "$W/log" -- "$W/loop" "$N")
st=0
if command -v strace >/dev/null; then st=$(best_of strace -f -o /dev/null "$W/loop" "$N"); fi
rm -rf "$W/log"; "$H" record --log "$W/log" -- "$W/loop" "$N" >/dev/null
events=$("$H" log stats "$W/log" | awk '/^events:/ {print $2}')
bytes=$("$H" log stats "$W/log" | awk '/^log bytes:/ {print $3}')
t0=$(now); "$H" replay --log "$W/log" 2>/dev/null; t1=$(now); rep=$((t1 - t0))
calls=$((3 * N))
echo "### syscall loop ($calls syscalls: clock_gettime + read /dev/zero + write /dev/null)"
echo
echo "| run | wall time | ratio to native |"
echo "|---|---|---|"
echo "| native | $((nat / 1000000)) ms | 1.00 |"
awk -v n="$nat" -v r="$rec" 'BEGIN { printf "| recorded | %d ms | %.1f× |\n", r/1e6, r/n }'
awk -v n="$nat" -v r="$rep" 'BEGIN { printf "| replayed | %d ms | %.1f× |\n", r/1e6, r/n }'
[ "$st" != 0 ] && awk -v n="$nat" -v r="$st" 'BEGIN { printf "| strace -f (reference: a plain ptrace tracer stopping at entry and exit) | %d ms | %.1f× |\n", r/1e6, r/n }'
echo
awk -v n="$nat" -v r="$rec" -v c="$calls" -v e="$events" -v b="$bytes" 'BEGIN {
  printf "- recording cost per syscall: %.1f µs (recorded − native, divided by %d syscalls)\n", (r-n)/c/1000, c;
  printf "- log: %d events, %d bytes, %.1f bytes per event\n", e, b, b/e }'
echo

# redis-benchmark against redis-server, native and under `hotstandby record`.
redis_rps() { # port -> "set get"
    redis-benchmark -p "$1" -c 10 -n "$REQ" -t set,get -q 2>/dev/null | tr '\r' '\n' |
        awk '/^SET:/ {s=$2} /^GET:/ {g=$2} END {print s, g}'
}
wait_port() { for _ in $(seq 1 200); do redis-cli -p "$1" ping >/dev/null 2>&1 && return 0; sleep 0.05; done; return 1; }
P1=$(( (RANDOM % 2000) + 41000 ))
redis-server --port "$P1" --bind 127.0.0.1 --save "" --appendonly no --dir "$W" >/dev/null & RPID=$!
wait_port "$P1"
read -r nset nget < <(redis_rps "$P1")
redis-cli -p "$P1" shutdown nosave >/dev/null 2>&1 || true; wait "$RPID" 2>/dev/null || true; RPID=
P2=$((P1 + 1))
rm -rf "$W/rlog"
"$H" record --log "$W/rlog" -- redis-server --port "$P2" --bind 127.0.0.1 --save "" --appendonly no --dir "$W" >/dev/null & RPID=$!
wait_port "$P2"
read -r rset rget < <(redis_rps "$P2")
redis-cli -p "$P2" shutdown nosave >/dev/null 2>&1 || true; wait "$RPID" 2>/dev/null || true; RPID=
revents=$("$H" log stats "$W/rlog" | awk '/^events:/ {print $2}')
rbytes=$("$H" log stats "$W/rlog" | awk '/^log bytes:/ {print $3}')
echo "### redis-benchmark -c 10 -n $REQ -t set,get"
echo
echo "| run | SET req/s | GET req/s | ratio to native |"
echo "|---|---|---|---|"
echo "| native | $nset | $nget | 1.00 |"
awk -v a="$nset" -v b="$nget" -v c="$rset" -v d="$rget" 'BEGIN { printf "| recorded | %s | %s | SET %.2f, GET %.2f |\n", c, d, c/a, d/b }'
echo
awk -v e="$revents" -v b="$rbytes" -v r="$REQ" 'BEGIN { printf "- log: %d events, %d bytes (%.1f bytes per event, %.0f bytes per request)\n", e, b, b/e, b/(2*r) }'

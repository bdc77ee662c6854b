#!/usr/bin/env bash
# redis-server under `hotstandby run` with a standby on a second
# network-namespace host: redis-benchmark throughput against native redis in
# the same namespace, and the standby's lag (unacknowledged log bytes, from
# the primary's status, sampled every 10 ms) while the benchmark runs.
#   benches/standby_lag.sh [REQUESTS]     (root)
set -euo pipefail
cd "$(dirname "$0")/.."
REQ=${1:-50000}
. benches/twohosts.sh
mkdir -p "$W/A" "$W/B"
bench() { ip netns exec "$NP" redis-benchmark -h 198.51.100.1 -p 6390 -c 10 -n "$REQ" -t set,get -q 2>/dev/null | tr '\r' '\n' | awk '/^SET:/ {s=$2} /^GET:/ {g=$2} END {print s, g}'; }
up() { for _ in $(seq 1 400); do ip netns exec "$NP" redis-cli -h 198.51.100.1 -p 6390 ping >/dev/null 2>&1 && return 0; sleep 0.025; done; return 1; }
RARGS="--port 6390 --bind 198.51.100.1 --protected-mode no --save '' --appendonly no --dir $W/A"
ip netns exec "$NP" sh -c "exec redis-server $RARGS" >/dev/null 2>&1 & PIDS=$!
up; read -r nset nget < <(bench)
ip netns exec "$NP" redis-cli -h 198.51.100.1 -p 6390 shutdown nosave >/dev/null 2>&1 || true; wait "$PIDS" 2>/dev/null || true
ip netns exec "$NP" "$H" run --listen 198.51.100.1:7600 --log "$W/lp" --cert "$W/kp/node.crt" --key "$W/kp/node.key" \
    --peer-cert "$W/ks/node.crt" -- sh -c "exec redis-server $RARGS" >/dev/null 2>&1 & PP=$!
ip netns exec "$NS" "$H" standby --primary 198.51.100.1:7600 --listen 198.51.100.2:7600 --log "$W/ls" \
    --cert "$W/ks/node.crt" --key "$W/ks/node.key" --peer-cert "$W/kp/node.crt" --data-dir "$W/B" >/dev/null 2>&1 & SP=$!
PIDS="$PP $SP"
up
for _ in $(seq 1 400); do grep -q Following "$W/ls/status" 2>/dev/null && break; sleep 0.025; done
( while :; do awk '/^lag:/ {print $2}' "$W/lp/status" 2>/dev/null; sleep 0.01; done ) > "$W/lag.txt" & SAMPLER=$!
PIDS="$PP $SP $SAMPLER"
read -r rset rget < <(bench)
kill "$SAMPLER" 2>/dev/null || true
sorted=$(grep -E '^[0-9]+$' "$W/lag.txt" | sort -n)
q() { echo "$sorted" | awk -v q="$1" '{a[NR]=$1} END {i=int((NR-1)*q+0.5)+1; print a[i]}'; }
echo "### redis-benchmark -c 10 -n $REQ -t set,get, primary and standby on two namespace hosts"
echo
echo "| run | SET req/s | GET req/s | ratio to native |"
echo "|---|---|---|---|"
echo "| native redis-server | $nset | $nget | 1.00 |"
awk -v a="$nset" -v b="$nget" -v c="$rset" -v d="$rget" 'BEGIN { printf "| under run, standby following | %s | %s | SET %.2f, GET %.2f |\n", c, d, c/a, d/b }'
echo
echo "Standby lag while the benchmark ran (unacknowledged log bytes, $(echo "$sorted" | wc -l) samples every 10 ms): p50 $(q 0.5), p99 $(q 0.99), max $(echo "$sorted" | tail -1) bytes."

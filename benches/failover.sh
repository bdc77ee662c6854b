#!/usr/bin/env bash
# Time from the primary's death (kill -9 of its supervisor; its program dies
# with it) to the program writing its first new result live on the standby,
# over ROUNDS injected failures, on two network-namespace hosts. Also the
# catch-up throughput of a standby joining late (log bytes per second).
#   benches/failover.sh [ROUNDS]        (root; uses 198.51.100.0/24 inside its own namespaces)
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-20}
. benches/twohosts.sh
gcc -O2 -o "$W/counter" tests/programs/counter.c
maxnum() { tail -n 1 "$1" 2>/dev/null || echo 0; }
times=()
for r in $(seq 1 "$ROUNDS"); do
    rm -rf "$W/A" "$W/B" "$W/lp" "$W/ls"; mkdir -p "$W/A" "$W/B"
    (cd "$W/A" && exec ip netns exec "$NP" "$H" run --listen 198.51.100.1:7600 --log "$W/lp" \
        --cert "$W/kp/node.crt" --key "$W/kp/node.key" --peer-cert "$W/ks/node.crt" --data-dir "$W/A" \
        -- "$W/counter" 1000000 1000 >/dev/null 2>&1) & PP=$!
    ip netns exec "$NS" "$H" standby --primary 198.51.100.1:7600 --listen 198.51.100.2:7600 --log "$W/ls" \
        --cert "$W/ks/node.crt" --key "$W/ks/node.key" --peer-cert "$W/kp/node.crt" --data-dir "$W/B" >/dev/null 2>"$W/standby.err" & SP=$!
    PIDS="$PP $SP"
    for _ in $(seq 1 2000); do
        [ "$(maxnum "$W/B/counter.txt")" -gt 300 ] && grep -q Following "$W/ls/status" 2>/dev/null && break; sleep 0.005
    done
    kill -9 "$PP"; t0=$(now)
    wait "$PP" 2>/dev/null || true
    sleep 0.02
    K=$(maxnum "$W/A/counter.txt")
    t1=0
    for _ in $(seq 1 20000); do
        if [ "$(maxnum "$W/B/counter.txt")" -gt "$K" ]; then t1=$(now); break; fi
        sleep 0.0005
    done
    kill -9 "$SP" 2>/dev/null || true; wait "$SP" 2>/dev/null || true
    if [ "$t1" = 0 ]; then echo "round $r: no takeover within 10 s; standby said:" >&2; tail -5 "$W/standby.err" >&2; exit 1; fi
    times+=($(( (t1 - t0) / 1000000 )))
done
sorted=$(printf '%s\n' "${times[@]}" | sort -n)
p() { echo "$sorted" | awk -v q="$1" '{a[NR]=$1} END {i=int((NR-1)*q+0.5)+1; print a[i]}'; }
echo "### Failover: primary killed → program running live on the standby ($ROUNDS rounds, --heartbeat-ms 50 --timeout-ms 300)"
echo
echo "| p50 | p99 | min | max |"
echo "|---|---|---|---|"
echo "| $(p 0.5) ms | $(p 0.99) ms | $(echo "$sorted" | head -1) ms | $(echo "$sorted" | tail -1) ms |"
echo
echo "all (ms): $(echo $sorted)"

# Catch-up: a standby joins a primary whose log already holds a syscall-heavy
# run; time until the primary holds acknowledgements for the whole log
# (stream throughput) and until the standby has replayed every event.
gcc -O2 -o "$W/loop" benches/syscall_loop.c
rm -rf "$W/A" "$W/B" "$W/lp" "$W/ls"; mkdir -p "$W/A" "$W/B"
(cd "$W/A" && exec ip netns exec "$NP" "$H" run --listen 198.51.100.1:7600 --log "$W/lp" \
    --cert "$W/kp/node.crt" --key "$W/kp/node.key" --peer-cert "$W/ks/node.crt" \
    -- /bin/sh -c "$W/loop 150000 >/dev/null; sleep 120" >/dev/null 2>&1) & PP=$!
PIDS="$PP"
prev=-1
for _ in $(seq 1 600); do
    sleep 0.5
    cur=$(stat -c %s "$W/lp/events.hsl" 2>/dev/null || echo 0)
    [ "$cur" = "$prev" ] && [ "$cur" -gt 1000000 ] && break
    prev=$cur
done
LOGB=$(stat -c %s "$W/lp/events.hsl")
EV=$("$H" log stats "$W/lp" | awk '/^events:/ {print $2}')
t0=$(now)
ip netns exec "$NS" "$H" standby --primary 198.51.100.1:7600 --listen 198.51.100.2:7600 --log "$W/ls" \
    --cert "$W/ks/node.crt" --key "$W/ks/node.key" --peer-cert "$W/kp/node.crt" --data-dir "$W/B" >/dev/null 2>&1 & SP=$!
PIDS="$PP $SP"
t1=0; t2=0
for _ in $(seq 1 12000); do
    if [ "$t1" = 0 ] && grep -q "Protected (connected)" "$W/lp/status" 2>/dev/null && grep -q "lag:         0 bytes" "$W/lp/status"; then t1=$(now); fi
    r=$(awk '/^replayed:/ {print $2}' "$W/ls/status" 2>/dev/null || echo 0)
    if [ "${r:-0}" -ge $((EV - 2)) ]; then t2=$(now); break; fi
    sleep 0.01
done
[ "$t1" = 0 ] && t1=$t2
echo
echo "### Catch-up of a standby joining late ($LOGB log bytes, $EV events)"
echo
awk -v b="$LOGB" -v e="$EV" -v a="$((t1 - t0))" -v c="$((t2 - t0))" 'BEGIN {
  printf "| stream (log received and acknowledged) | %.0f ms | %.1f MB/s | %.0f events/s |\n", a/1e6, b/1e6/(a/1e9), e/(a/1e9);
  printf "| replay caught up | %.0f ms | %.1f MB/s | %.0f events/s |\n", c/1e6, b/1e6/(c/1e9), e/(c/1e9) }'

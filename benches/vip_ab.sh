#!/usr/bin/env bash
# A/B of `run --vip` builds (root): benches/vip_ab.sh ROUNDS REQUESTS BIN...
# Each round runs native redis-server, then each hotstandby binary as
# primary and standby with the virtual IP and the output rule, in the lab of
# benches/lan.sh, under redis-benchmark -c 50 SET/GET; prints req/s and the
# output rule's hold p50/p99 per run. For comparing a change against the
# build before it: interleaved rounds, same machine, same hour.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:?rounds}; REQ=${2:?requests}; shift 2
[ $# -ge 1 ] || { echo "usage: $0 ROUNDS REQUESTS BIN..." >&2; exit 2; }
. benches/lan.sh
REDIS=(redis-server --port 6390 --protected-mode no --save "" --appendonly no --dir)
reset() {
    for p in ${PIDS:-}; do kill -9 "$p" 2>/dev/null || true; done
    for p in ${PIDS:-}; do wait "$p" 2>/dev/null || true; done
    PIDS=""
    rm -rf "$W/lp" "$W/ls" "$W/A" "$W/B"; mkdir -p "$W/A" "$W/B"
    lan_up
}
wait_for() { local t=$(( $(date +%s) + $1 )); shift
    until "$@" >/dev/null 2>&1; do [ "$(date +%s)" -lt "$t" ] || return 1; sleep 0.05; done; }
protected() { "$H" status --log "$W/lp" | grep -q "protection:  PROTECTED"; }
bench() { ip netns exec "$NC" redis-benchmark -h "$1" -p 6390 -c 50 -n "$REQ" -t set,get --csv 2>/dev/null |
    tr -d '"' | awk -F, '$1 == "SET" {s=$2} $1 == "GET" {g=$2} END {print "SET", s, "GET", g}'; }
for r in $(seq "$ROUNDS"); do
    reset
    ip netns exec "$NP" "${REDIS[@]}" "$W/A" >/dev/null 2>&1 & PIDS="$PIDS $!"
    wait_for 10 ip netns exec "$NC" redis-cli -h 198.51.100.1 -p 6390 ping
    echo "round $r native $(bench 198.51.100.1)"
    for b in "$@"; do
        H=$b
        reset
        (exec ip netns exec "$NP" "$H" run --listen 198.51.100.1:7600 --log "$W/lp" --cert "$W/kp/node.crt" \
            --key "$W/kp/node.key" --peer-cert "$W/ks/node.crt" --vip $VIP/24 --dev eth0 --data-dir "$W/A" \
            -- "${REDIS[@]}" "$W/A") >/dev/null 2>"$W/p.err" & PIDS="$PIDS $!"
        (exec ip netns exec "$NS" "$H" standby --primary 198.51.100.1:7600 --listen 198.51.100.2:7600 \
            --log "$W/ls" --cert "$W/ks/node.crt" --key "$W/ks/node.key" --peer-cert "$W/kp/node.crt" \
            --vip $VIP/24 --dev eth0 --data-dir "$W/B") >/dev/null 2>"$W/s.err" & PIDS="$PIDS $!"
        wait_for 20 ip netns exec "$NC" redis-cli -h $VIP -p 6390 ping
        wait_for 20 protected
        out=$(bench $VIP)
        echo "round $r $b $out $("$H" status --log "$W/lp" | sed -n 's/.*recent hold/hold/p')"
    done
done
reset

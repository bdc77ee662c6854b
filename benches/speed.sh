#!/usr/bin/env bash
# The speed targets of the syscall buffer, in one run (root): redis-server
# on the primary host of the three-namespace lab (benches/lan.sh), driven by
# redis-benchmark -c 50 SET/GET from the client host, in interleaved rounds
# of
#   native     redis-server alone
#   pinned     redis-server alone under taskset -c 1 (a reference: the
#              recorder pins the program to the CPU of its supervisor)
#   record     under `hotstandby record` (and then `hotstandby replay` of
#              that log: replay rate = load time / replay time)
#   run        under `hotstandby run`, a standby following on the second
#              host (no virtual IP: no output rule); the standby's lag is
#              the primary's "acked after" (flush to acknowledgement)
#   run --vip  the same with the virtual IP and the output rule
#   queue      the output queue alone (an accept-all consumer, hidden
#              command `hotstandby queue-accept-all`), behind native redis
#              and behind `run`: what the queue costs apart from waiting
#              for the standby
# Prints medians and ratios to native as markdown for docs/benchmarks.md.
#   benches/speed.sh [ROUNDS=3] [REQUESTS=100000]
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-3}
REQ=${2:-100000}
. benches/lan.sh
REDIS=(redis-server --port 6390 --protected-mode no --save "" --appendonly no --dir)

reset() {
    for p in ${PIDS:-}; do kill -9 "$p" 2>/dev/null || true; done
    for p in ${PIDS:-}; do wait "$p" 2>/dev/null || true; done
    PIDS=""
    rm -rf "$W/lp" "$W/ls" "$W/lr" "$W/A" "$W/B"; mkdir -p "$W/A" "$W/B"
    lan_up
}
wait_for() { # secs cmd...
    local t=$(( $(date +%s) + $1 )); shift
    until "$@" >/dev/null 2>&1; do [ "$(date +%s)" -lt "$t" ] || { echo "timed out: $*" >&2; return 1; }; sleep 0.05; done
}
protected() { "$H" status --log "$W/lp" | grep -q "protection:  PROTECTED"; }
node() { # role ns extra...
    local role=$1 ns=$2; shift 2
    if [ "$role" = run ]; then
        exec ip netns exec "$ns" "$H" run --listen 198.51.100.1:7600 --log "$W/lp" --cert "$W/kp/node.crt" \
            --key "$W/kp/node.key" --peer-cert "$W/ks/node.crt" "$@"
    else
        exec ip netns exec "$ns" "$H" standby --primary 198.51.100.1:7600 --listen 198.51.100.2:7600 \
            --log "$W/ls" --cert "$W/ks/node.crt" --key "$W/ks/node.key" --peer-cert "$W/kp/node.crt" "$@"
    fi
}
# bench HOST: prints "SET rps GET rps" and the load's wall time in ns
bench() {
    local t0 t1 out
    t0=$(now)
    out=$(ip netns exec "$NC" redis-benchmark -h "$1" -p 6390 -c 50 -n "$REQ" -t set,get --csv 2>/dev/null |
        tr -d '"' | awk -F, '$1 == "SET" {s=$2} $1 == "GET" {g=$2} END {print s, g}')
    t1=$(now)
    echo "$out $((t1 - t0))"
}
shut() { ip netns exec "$NC" redis-cli -h "$1" -p 6390 shutdown nosave >/dev/null 2>&1 || true; }
declare -A R
add() { R[$1]="${R[$1]:-} $2"; }
median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {if (NR==0) print 0; else if (NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2}'; }

for r in $(seq "$ROUNDS"); do
    echo "round $r/$ROUNDS" >&2
    # native
    reset
    ip netns exec "$NP" "${REDIS[@]}" "$W/A" >/dev/null 2>&1 & PIDS="$PIDS $!"
    wait_for 10 ip netns exec "$NC" redis-cli -h 198.51.100.1 -p 6390 ping
    read -r s g _ < <(bench 198.51.100.1); add native.set "$s"; add native.get "$g"
    shut 198.51.100.1
    # native, pinned to one CPU: the recorder pins the program (and its
    # supervisor) to one CPU, which by itself changes redis' speed here
    reset
    ip netns exec "$NP" taskset -c 1 "${REDIS[@]}" "$W/A" >/dev/null 2>&1 & PIDS="$PIDS $!"
    wait_for 10 ip netns exec "$NC" redis-cli -h 198.51.100.1 -p 6390 ping
    read -r s g _ < <(bench 198.51.100.1); add pinned.set "$s"; add pinned.get "$g"
    shut 198.51.100.1
    # record, then replay of that log
    reset
    ip netns exec "$NP" "$H" record --log "$W/lr" -- "${REDIS[@]}" "$W/A" >/dev/null 2>"$W/r.err" & RP=$!; PIDS="$PIDS $RP"
    wait_for 20 ip netns exec "$NC" redis-cli -h 198.51.100.1 -p 6390 ping
    b0=$(stat -c %s "$W/lr/events.hsl")
    read -r s g ns < <(bench 198.51.100.1); add record.set "$s"; add record.get "$g"
    b1=$(stat -c %s "$W/lr/events.hsl")
    add logbytes "$(( (b1 - b0) / (2 * REQ) ))"
    shut 198.51.100.1; wait "$RP" 2>/dev/null || true
    t0=$(now)
    ip netns exec "$NP" "$H" replay --log "$W/lr" >/dev/null 2>"$W/rp.err" || { echo "replay failed:" >&2; cat "$W/rp.err" >&2; exit 1; }
    t1=$(now)
    add replay "$(awk -v a="$ns" -v b="$((t1 - t0))" 'BEGIN {printf "%.2f", a/b}')"
    # run + standby, no output rule
    reset
    node run "$NP" --data-dir "$W/A" -- "${REDIS[@]}" "$W/A" >/dev/null 2>"$W/p.err" & PIDS="$PIDS $!"
    node standby "$NS" --data-dir "$W/B" >/dev/null 2>"$W/s.err" & PIDS="$PIDS $!"
    wait_for 20 ip netns exec "$NC" redis-cli -h 198.51.100.1 -p 6390 ping; wait_for 20 protected
    read -r s g _ < <(bench 198.51.100.1); add run.set "$s"; add run.get "$g"
    sleep 0.3
    read -r a50 a99 < <(sed -n 's/^acked after: recent p50 \([0-9]*\) us, p99 \([0-9]*\) us/\1 \2/p' "$W/lp/status")
    add ack50 "$a50"; add ack99 "$a99"
    # run --vip + standby --vip: the output rule
    reset
    node run "$NP" --vip $VIP/24 --dev eth0 --data-dir "$W/A" -- "${REDIS[@]}" "$W/A" >/dev/null 2>"$W/p.err" & PIDS="$PIDS $!"
    node standby "$NS" --vip $VIP/24 --dev eth0 --data-dir "$W/B" >/dev/null 2>"$W/s.err" & PIDS="$PIDS $!"
    wait_for 20 ip netns exec "$NC" redis-cli -h $VIP -p 6390 ping; wait_for 20 protected
    read -r s g _ < <(bench $VIP); add vip.set "$s"; add vip.get "$g"
    "$H" status --log "$W/lp" | grep "output rule" >&2
    # the queue alone, behind native redis and behind run
    reset
    ip -n "$NP" addr add $VIP/24 dev eth0
    ip netns exec "$NP" "$H" queue-accept-all --vip $VIP >/dev/null 2>&1 & PIDS="$PIDS $!"
    ip netns exec "$NP" "${REDIS[@]}" "$W/A" >/dev/null 2>&1 & PIDS="$PIDS $!"
    wait_for 10 ip netns exec "$NC" redis-cli -h $VIP -p 6390 ping
    read -r s g _ < <(bench $VIP); add qnative.set "$s"; add qnative.get "$g"
    shut $VIP
    reset
    ip -n "$NP" addr add $VIP/24 dev eth0
    ip netns exec "$NP" "$H" queue-accept-all --vip $VIP >/dev/null 2>&1 & PIDS="$PIDS $!"
    node run "$NP" --data-dir "$W/A" -- "${REDIS[@]}" "$W/A" >/dev/null 2>"$W/p.err" & PIDS="$PIDS $!"
    node standby "$NS" --data-dir "$W/B" >/dev/null 2>"$W/s.err" & PIDS="$PIDS $!"
    wait_for 20 ip netns exec "$NC" redis-cli -h $VIP -p 6390 ping; wait_for 20 protected
    read -r s g _ < <(bench $VIP); add qrun.set "$s"; add qrun.get "$g"
done
reset

row() { # label key
    local n s
    for op in set get; do
        n=$(echo "${R[native.$op]}" | median); s=$(echo "${R[$2.$op]}" | median)
        awk -v l="$1" -v op="${op^^}" -v n="$n" -v s="$s" 'BEGIN {printf "| %s, %s | %.0f req/s | %.0f req/s | %.3f× |\n", l, op, n, s, s/n}'
    done
}
echo "### redis-benchmark -c 50 -n $REQ SET/GET from the client host ($ROUNDS interleaved rounds, medians)"
echo
echo "| configuration | native | protected | ratio |"
echo "|---|---|---|---|"
row "native, pinned to one CPU (reference)" pinned
row "record" record
row "run, standby following" run
row "run --vip (output rule)" vip
row "native + accept-all queue" qnative
row "run + accept-all queue" qrun
echo
echo "- replay of the recorded log: $(echo "${R[replay]}" | median)× the recorded rate (load time / replay time; rounds:${R[replay]})"
echo "- log: $(echo "${R[logbytes]}" | median) bytes per request (rounds:${R[logbytes]})"
echo "- standby lag under load (from a log flush to the standby's acknowledgement of it, the primary's last 10,000 flushes of the run round): p50 $(echo "${R[ack50]}" | median) us, p99 $(echo "${R[ack99]}" | median) us (rounds p99:${R[ack99]})"

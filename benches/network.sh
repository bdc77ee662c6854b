#!/usr/bin/env bash
# Network takeover benchmarks on a three-host lab (benches/lan.sh), release
# build. Usage: benches/network.sh [ROUNDS=20] [REQUESTS=50000]
#  1. client pause at failover: redis-server under `run --vip` with a
#     standby, 4 persistent INCR clients (tests/programs/incr_clients.py);
#     the primary host dies (supervisor kill -9, link down) ROUNDS times.
#     Pause = the longest a client waited for one reply; every round also
#     checks no client error and each key == INCRs acknowledged.
#  2. throughput through the virtual IP: redis-benchmark (-c 10) and wrk
#     (nginx, -c 8, 5 s): native program vs protected (run + standby +
#     output rule), same lab, same run.
#  3. latency added by the output rule: redis-benchmark -c 1 (one request
#     at a time) under `run` without --vip (no rule, clients use the
#     primary's address) vs with it; plus the rule's own hold times.
set -euo pipefail
cd "$(dirname "$0")/.."
exec 3>&1
ROUNDS=${1:-20}
REQ=${2:-50000}
. benches/lan.sh
PY=tests/programs/incr_clients.py
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
reset() {
    for p in ${PIDS:-}; do kill -9 "$p" 2>/dev/null || true; done
    PIDS=""; sleep 0.2
    rm -rf "$W/lp" "$W/ls" "$W/A" "$W/B"; mkdir -p "$W/A" "$W/B"
    lan_up
}
wait_for() { # secs cmd...
    local t=$(( $(date +%s) + $1 )); shift
    until "$@" >/dev/null 2>&1; do [ "$(date +%s)" -lt "$t" ] || { echo "timed out: $*" >&2; return 1; }; sleep 0.05; done
}
protected() { "$H" status --log "$W/lp" | grep -q "protection:  PROTECTED"; }
REDIS=(redis-server --port 6390 --protected-mode no --save "" --appendonly no --dir)
start_protected() { # program...
    node run "$NP" --vip $VIP/24 --dev eth0 --data-dir "$W/A" -- "$@" >/dev/null 2>"$W/p.err" & PP=$!; PIDS="$PIDS $PP"
    node standby "$NS" --vip $VIP/24 --dev eth0 --data-dir "$W/B" >/dev/null 2>"$W/s.err" & PIDS="$PIDS $!"
}
pct() { sort -n | awk -v p="$1" '{a[NR]=$1} END {i=int((NR-1)*p+0.5)+1; print a[i]}'; }

echo "== 1. client pause at failover ($ROUNDS rounds)"
: > "$W/pauses"
for r in $(seq "$ROUNDS"); do
    reset
    start_protected "${REDIS[@]}" "$W/A"
    wait_for 20 ip netns exec "$NC" redis-cli -h $VIP -p 6390 ping
    wait_for 20 protected
    rm -f "$W/stop" "$W/prog"
    ip netns exec "$NC" python3 "$PY" $VIP 6390 4 3 1000000 "$W/prog" "$W/stop" > "$W/c.out" &
    CP=$!; PIDS="$PIDS $CP"
    wait_for 20 test -s "$W/prog"; sleep 1
    kill -9 "$PP"; ip -n "$NP" link set eth0 down
    t0=$(now); before=$(cat "$W/prog")
    wait_for 30 sh -c "[ \$(cat $W/prog) -gt $((before + 200)) ]"
    touch "$W/stop"; wait "$CP"
    pause=$(python3 -c "import json,sys; d=json.load(open('$W/c.out')); assert not d['errors'], d['errors']; print(d['max_wait_ms'])")
    for k in key0 key1 key2; do
        want=$(python3 -c "import json; print(json.load(open('$W/c.out'))['acked']['$k'])")
        got=$(ip netns exec "$NC" redis-cli -h $VIP -p 6390 get $k)
        [ "$want" = "$got" ] || { echo "round $r: $k = $got, clients were told $want" >&2; exit 1; }
    done
    echo "$pause" >> "$W/pauses"
    echo "round $r: pause $pause ms, keys intact, no client error"
    ip netns exec "$NC" redis-cli -h $VIP -p 6390 shutdown nosave >/dev/null 2>&1 || true
done
echo "client pause over $ROUNDS failovers: p50 $(pct 0.5 < "$W/pauses") ms, p99 $(pct 0.99 < "$W/pauses") ms, max $(sort -n "$W/pauses" | tail -1) ms"

echo "== 2. throughput through the virtual IP"
bench_redis() { ip netns exec "$NC" redis-benchmark -h "$1" -p 6390 -c 10 -n "$REQ" -t set,get,incr --csv 2>/dev/null | tr -d '"' | awk -F, '$1 ~ /^(SET|GET|INCR)$/ {print $1, $2}'; }
reset
ip -n "$NP" addr add $VIP/24 dev eth0
ip netns exec "$NP" "${REDIS[@]}" "$W/A" >/dev/null 2>&1 & PIDS="$PIDS $!"
wait_for 10 ip netns exec "$NC" redis-cli -h $VIP -p 6390 ping
bench_redis $VIP > "$W/native"
ip netns exec "$NC" redis-cli -h $VIP -p 6390 shutdown nosave >/dev/null 2>&1 || true
reset
start_protected "${REDIS[@]}" "$W/A"
wait_for 20 ip netns exec "$NC" redis-cli -h $VIP -p 6390 ping; wait_for 20 protected
bench_redis $VIP > "$W/prot"
"$H" status --log "$W/lp" | grep "output rule"
paste "$W/native" "$W/prot" | awk '{printf "redis-benchmark -c 10 %-4s native %9.0f req/s, protected %8.0f req/s: %.3fx\n", $1, $2, $4, $4/$2}'
mkdir -p "$W/www"; echo hello > "$W/www/index.html"
ngx_conf() { cat <<EOC
worker_processes 1; master_process off; daemon off; error_log stderr warn; pid $1/nginx.pid;
events { worker_connections 512; }
http { access_log off; sendfile off; keepalive_requests 1000000; keepalive_timeout 300s;
  client_body_temp_path $1/b; proxy_temp_path $1/p; fastcgi_temp_path $1/f; uwsgi_temp_path $1/u; scgi_temp_path $1/s;
  server { listen 8080; root $W/www; } }
EOC
}
bench_wrk() { ip netns exec "$NC" wrk -c 8 -t 2 -d 5s "http://$VIP:8080/index.html" | awk '/Requests\/sec/ {print $2} /Socket errors/ {print "ERR " $0 > "/dev/stderr"}'; }
reset
ngx_conf "$W/A" > "$W/ngx.conf"; ip -n "$NP" addr add $VIP/24 dev eth0
ip netns exec "$NP" nginx -e stderr -c "$W/ngx.conf" 2>/dev/null & PIDS="$PIDS $!"
wait_for 10 ip netns exec "$NC" curl -sf "http://$VIP:8080/"
wn=$(bench_wrk)
reset
ngx_conf "$W/A" > "$W/ngx.conf"
start_protected nginx -e stderr -c "$W/ngx.conf"
wait_for 20 ip netns exec "$NC" curl -sf "http://$VIP:8080/"; wait_for 20 protected
wp=$(bench_wrk)
echo "wrk -c 8 nginx: native $wn req/s, protected $wp req/s: $(awk -v a="$wn" -v b="$wp" 'BEGIN {printf "%.3f", b/a}')x"

echo "== 3. latency added by the output rule (redis-benchmark -c 1, $((REQ / 5)) requests)"
lat() { ip netns exec "$NC" redis-benchmark -h "$1" -p 6390 -c 1 -n $((REQ / 5)) -t incr 2>/dev/null | tr '\r' '\n' | awk '/latency summary/ {getline; getline; print "avg " $1 " ms, p50 " $3 " ms, p99 " $5 " ms"}'; }
reset
node run "$NP" --data-dir "$W/A" -- "${REDIS[@]}" "$W/A" >/dev/null 2>"$W/p.err" & PIDS="$PIDS $!"
node standby "$NS" --data-dir "$W/B" >/dev/null 2>"$W/s.err" & PIDS="$PIDS $!"
wait_for 20 ip netns exec "$NC" redis-cli -h 198.51.100.1 -p 6390 ping; wait_for 20 protected
echo "without the output rule (no --vip): $(lat 198.51.100.1)"
reset
start_protected "${REDIS[@]}" "$W/A"
wait_for 20 ip netns exec "$NC" redis-cli -h $VIP -p 6390 ping; wait_for 20 protected
echo "with the output rule:               $(lat $VIP)"
"$H" status --log "$W/lp" | grep "output rule"

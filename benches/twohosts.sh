# Sourced by the benchmark scripts: builds the release binary, makes a
# scratch directory $W and two network-namespace hosts $NP (198.51.100.1)
# and $NS (198.51.100.2) on a veth pair, writes node keys to $W/kp and
# $W/ks, and removes everything (and the PIDs listed in $PIDS) on exit.
cargo build --release -q -p hotstandby
H=$PWD/target/release/hotstandby
W=$(mktemp -d /tmp/hotstandby-bench.XXXXXX)
NP=hsb-bp$$; NS=hsb-bs$$
cleanup() {
    for p in ${PIDS:-}; do kill -9 "$p" 2>/dev/null || true; done
    ip netns del "$NP" 2>/dev/null || true; ip netns del "$NS" 2>/dev/null || true
    rm -rf "$W"
}
trap cleanup EXIT
ip netns add "$NP"; ip netns add "$NS"
ip link add vbp$$ netns "$NP" type veth peer name vbs$$ netns "$NS"
ip -n "$NP" addr add 198.51.100.1/24 dev vbp$$; ip -n "$NS" addr add 198.51.100.2/24 dev vbs$$
for n in "$NP" "$NS"; do ip -n "$n" link set lo up; done
ip -n "$NP" link set vbp$$ up; ip -n "$NS" link set vbs$$ up
"$H" keygen --out "$W/kp" >/dev/null; "$H" keygen --out "$W/ks" >/dev/null
now() { date +%s%N; }

# Sourced by the benchmark scripts: builds the release binary, makes a
# scratch directory $W and three network-namespace hosts on one bridge:
# $NP primary (198.51.100.1), $NS standby (.2), $NC client (.3), each
# interface named eth0; the virtual IP is $VIP (198.51.100.10/24). Writes
# node keys to $W/kp and $W/ks and removes everything (and the PIDs listed
# in $PIDS) on exit.
cargo build --release -q -p hotstandby
H=$PWD/target/release/hotstandby
W=$(mktemp -d /tmp/hotstandby-bench.XXXXXX)
SW=hsb-w$$; NP=hsb-p$$; NS=hsb-s$$; NC=hsb-c$$
VIP=198.51.100.10
cleanup() {
    for p in ${PIDS:-}; do kill -9 "$p" 2>/dev/null || true; done
    for n in "$NP" "$NS" "$NC" "$SW"; do ip netns del "$n" 2>/dev/null || true; done
    rm -rf "$W"
}
trap cleanup EXIT
lan_up() {
    local k n a
    for n in "$NP" "$NS" "$NC" "$SW"; do ip netns del "$n" 2>/dev/null || true; ip netns add "$n"; done
    ip -n "$SW" link add br0 type bridge; ip -n "$SW" link set br0 up
    for k in p s c; do
        case $k in p) n=$NP a=1;; s) n=$NS a=2;; c) n=$NC a=3;; esac
        ip link add eth0 netns "$n" type veth peer name b$k$$ netns "$SW"
        ip -n "$SW" link set b$k$$ master br0; ip -n "$SW" link set b$k$$ up
        ip -n "$n" addr add 198.51.100.$a/24 dev eth0
        ip -n "$n" link set eth0 up; ip -n "$n" link set lo up
    done
}
lan_up
"$H" keygen --out "$W/kp" >/dev/null; "$H" keygen --out "$W/ks" >/dev/null
now() { date +%s%N; }

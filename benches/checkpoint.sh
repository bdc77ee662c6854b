#!/usr/bin/env bash
# Checkpoints, measured on loopback (root): redis-server recorded while
# redis-benchmark writes KEYS keys of SIZE bytes (pipelined), then
#   full     hotstandby replay of the whole log (what a standby joining
#            late replays without checkpoints)
#   ckpt     the same replay taking checkpoints every third of the log:
#            each checkpoint's pause (the program stopped), its file size
#            and the memory it saved
#   resume   hotstandby replay --from-checkpoint of the newest checkpoint:
#            the restore, then the tail of the log (what a standby joining
#            from a checkpoint replays)
# Prints markdown for docs/benchmarks.md.
#   benches/checkpoint.sh [KEYS=150000] [SIZE=1024]
set -euo pipefail
cd "$(dirname "$0")/.."
KEYS=${1:-150000}
SIZE=${2:-1024}
H=$PWD/target/release/hotstandby
[ -x "$H" ] || cargo build --release -p hotstandby >/dev/null
W=$(mktemp -d /tmp/hotstandby-bench-ck.XXXXXX)
PORT=6397
REC=""
cleanup() { [ -n "$REC" ] && kill -9 "$REC" 2>/dev/null; rm -rf "$W"; }
trap cleanup EXIT
mkdir -p "$W/data"
"$H" record --log "$W/log" --data-dir "$W/data" -- redis-server --port $PORT --bind 127.0.0.1 \
    --save "" --appendonly no --dir "$W/data" >/dev/null 2>"$W/rec.err" &
REC=$!
for _ in $(seq 200); do redis-cli -p $PORT ping >/dev/null 2>&1 && break; sleep 0.05; done
redis-benchmark -p $PORT -t set -n "$KEYS" -r "$KEYS" -d "$SIZE" -P 32 -q >/dev/null
MEM=$(redis-cli -p $PORT info memory | sed -n 's/^used_memory:\([0-9]*\).*/\1/p' | tr -d '\r')
redis-cli -p $PORT shutdown nosave >/dev/null 2>&1 || true
wait "$REC" || true
REC=""
LOG=$(stat -c %s "$W/log/events.hsl")
t0=$(date +%s.%N)
"$H" replay --log "$W/log" >/dev/null 2>"$W/full.err"
t1=$(date +%s.%N)
EVERY=$(( LOG / 3 ))
"$H" replay --log "$W/log" --checkpoint-every "$EVERY" >/dev/null 2>"$W/ck.err"
t2=$(date +%s.%N)
NEWEST="$W/log/checkpoints/$(ls "$W/log/checkpoints" | grep "^ckpt-.*\.hsck$" | sort -t- -k2 -n | tail -1)"
POS=$(basename "$NEWEST" .hsck | cut -d- -f2)
"$H" replay --log "$W/log" --from-checkpoint "$NEWEST" >/dev/null 2>"$W/resume.err"
t3=$(date +%s.%N)
echo "### redis, $KEYS keys of $SIZE bytes (used_memory $((MEM >> 20)) MiB), log $((LOG >> 20)) MiB"
echo
echo "| checkpoint at log byte | memory saved | file | pause | pause per GiB saved |"
echo "|---|---|---|---|---|"
grep 'checkpoint taken' "$W/ck.err" | while read -r line; do
    pos=$(sed -n 's/.*position=\([0-9]*\).*/\1/p' <<<"$line")
    bytes=$(sed -n 's/.* bytes=\([0-9]*\).*/\1/p' <<<"$line")
    mem=$(sed -n 's/.*memory=\([0-9]*\).*/\1/p' <<<"$line")
    ms=$(sed -n 's/.*pause_ms=\([0-9.]*\).*/\1/p' <<<"$line")
    printf '| %d | %.1f MiB | %.1f MiB | %.0f ms | %.2f s |\n' "$pos" \
        "$(bc -l <<<"$mem/1048576")" "$(bc -l <<<"$bytes/1048576")" "$ms" \
        "$(bc -l <<<"$ms/1000/($mem/1073741824)")"
done
RESTORE=$(sed -n 's/.*restore_ms=\([0-9.]*\).*/\1/p' "$W/resume.err")
echo
printf '| replay | time |\n|---|---|\n'
printf '| whole log (%d MiB), no checkpoints | %.2f s |\n' $((LOG >> 20)) "$(bc -l <<<"$t1-$t0")"
printf '| whole log, taking the checkpoints above | %.2f s |\n' "$(bc -l <<<"$t2-$t1")"
printf '| from the newest checkpoint (byte %d: %d MiB of log left), restore %.0f ms included | %.2f s |\n' \
    "$POS" $(( (LOG - POS) >> 20 )) "$RESTORE" "$(bc -l <<<"$t3-$t2")"

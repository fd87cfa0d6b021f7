#!/usr/bin/env bash
# What the shared history and HISTORY_STANDBY cost: the same load (500 sessions, 2,000
# viewers, 1,000 msg/s) on one serving instance, with the history off
# (HISTORY_MESSAGES=0), on (the default), and on with a second instance running as a
# history standby (no viewers). Prints the serving instance's CPU per delivered
# message, and per published message Redis's output bytes and the standby's CPU; at
# the end the standby's RSS and Redis's memory.
#   bench/standby.sh          (RUNS=3 DURATION=10 to change)
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-3}
DURATION=${DURATION:-10}
cargo build --release -q -p chat-sync -p loadgen
export MAX_STREAMS_PER_CLIENT=10000000 NEW_SESSIONS_PER_CLIENT=1000000 RUST_LOG=error

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 200); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done; return 1; }
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
rss_kib() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }
redis_stat() { redis-cli -p "$redis_port" info "$1" | tr -d '\r' | awk -F: -v k="$2" '$1 == k {print $2}'; }

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
hz=$(getconf CLK_TCK)

echo "| run | history | serving CPU µs/delivery | Redis out B/msg | standby CPU µs/msg | standby RSS MiB | Redis used MiB |"
echo "|---|---|---|---|---|---|---|"
for run in $(seq "$RUNS"); do
  for mode in off on standby; do
    standby=false; [ "$mode" = standby ] && standby=true
    history=1024; [ "$mode" = off ] && history=0
    redis_port=$(free_port)
    redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no --loglevel warning >/dev/null &
    redis_pid=$!; pids+=($redis_pid); wait_port "$redis_port"
    port=$(free_port)
    REDIS_URL="redis://127.0.0.1:$redis_port" PORT=$port BIND_ADDR=127.0.0.1 WORKER_THREADS=1 \
      HISTORY_MESSAGES=$history target/release/chat-sync & serving=$!; pids+=($serving); wait_port "$port"
    spare=""
    if [ "$standby" = true ]; then
      sport=$(free_port)
      REDIS_URL="redis://127.0.0.1:$redis_port" PORT=$sport BIND_ADDR=127.0.0.1 WORKER_THREADS=1 \
        HISTORY_STANDBY=true target/release/chat-sync & spare=$!; pids+=($spare); wait_port "$sport"
    fi
    out0=$(redis_stat stats total_net_output_bytes)
    cpu0=0; [ -n "$spare" ] && cpu0=$(cpu_ticks "$spare")
    result=$(target/release/loadgen --target chat-sync --server "127.0.0.1:$port" \
      --redis "redis://127.0.0.1:$redis_port" --connections 2000 --sessions 500 --rate 1000 \
      --connect-rate 4000 --duration "$DURATION" --server-pid "$serving" --label standby)
    read -r published serving_cpu < <(python3 -c 'import json,sys; r = json.loads(sys.stdin.read().strip().splitlines()[-1]); print(r["published"], round(r["server_cpu_us_per_delivery"], 2))' <<<"$result")
    out1=$(redis_stat stats total_net_output_bytes)
    used=$(redis_stat memory used_memory)
    cpu_us="–"; rss="–"
    if [ -n "$spare" ]; then
      cpu1=$(cpu_ticks "$spare")
      cpu_us=$(python3 -c "print(f'{($cpu1 - $cpu0) / $hz * 1e6 / $published:.2f}')")
      rss=$(python3 -c "print(f'{$(rss_kib "$spare") / 1024:.1f}')")
    fi
    python3 -c "print(f'| $run | $mode | $serving_cpu | {($out1 - $out0) / $published:.0f} | $cpu_us | $rss | {$used / 1048576:.1f} |')"
    for p in $spare $serving $redis_pid; do kill "$p"; while kill -0 "$p" 2>/dev/null; do sleep 0.05; done; done
    pids=()
  done
done

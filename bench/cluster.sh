#!/usr/bin/env bash
# Plain against sharded pub/sub on the same Redis Cluster (3 masters, 3 replicas, on
# loopback): one chat-sync instance, 300 sessions with one viewer each, spread over
# the three masters, and a publisher offering RATE messages/s for DURATION seconds,
# with PUBLISH (REDIS_SHARDED_PUBSUB=false) or SPUBLISH (true). Prints, per run and
# mode: messages/s that reached chat-sync's viewers, and each Redis node's CPU per
# published message (µs). Plain pub/sub sends every message to every node over the
# cluster bus; sharded pub/sub keeps it within its shard.
#   bench/cluster.sh          (RUNS=3 DURATION=10 RATE=20000 to change)
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-3}
DURATION=${DURATION:-10}
RATE=${RATE:-20000}
command -v redis-cli >/dev/null || {
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends redis-server redis-tools >/dev/null
}
cargo build --release -q -p chat-sync -p loadgen
export MAX_STREAMS_PER_CLIENT=10000000 NEW_SESSIONS_PER_CLIENT=1000000 RUST_LOG=error

wait_port() { for _ in $(seq 200); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done; return 1; }
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
# A free port whose cluster bus port (+10000) is free too.
free_pair() {
  python3 -c '
import socket
while True:
    a = socket.socket(); a.bind(("127.0.0.1", 0)); p = a.getsockname()[1]
    if p > 55000: continue
    try:
        b = socket.socket(); b.bind(("127.0.0.1", p + 10000)); b.close()
    except OSError:
        continue
    print(p); break'
}

pids=()
work=$(mktemp -d)
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
hz=$(getconf CLK_TCK)

echo "| run | pub/sub | published | delivered msg/s | lost | master CPU µs/msg (each) | replica CPU µs/msg (each) |"
echo "|---|---|---|---|---|---|---|"
for run in $(seq "$RUNS"); do
  for mode in plain sharded; do
    ports=(); node_pids=()
    dir=$(mktemp -d -p "$work")
    for _ in 1 2 3 4 5 6; do
      p=$(free_pair)
      redis-server --port "$p" --bind 127.0.0.1 --cluster-enabled yes --cluster-config-file "nodes-$p.conf" \
        --cluster-node-timeout 2000 --save "" --appendonly no --loglevel warning --dir "$dir" >/dev/null &
      node_pids+=($!); pids+=($!); ports+=("$p")
      wait_port "$p"
    done
    addrs=$(printf '127.0.0.1:%s ' "${ports[@]}")
    # shellcheck disable=SC2086
    redis-cli --cluster create $addrs --cluster-replicas 1 --cluster-yes >"$work/create.log" 2>&1 \
      || { cat "$work/create.log" >&2; exit 1; }
    for p in "${ports[@]}"; do
      until redis-cli -p "$p" cluster info | grep -q cluster_state:ok; do sleep 0.1; done
    done
    nodes=$(printf '127.0.0.1:%s,' "${ports[@]}"); nodes=${nodes%,}
    sharded=false; [ "$mode" = sharded ] && sharded=true
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    # The shared history off: its writes (one script per session per tick) would weigh
    # on the masters more than pub/sub itself does.
    HISTORY_MESSAGES=0 REDIS_CLUSTER_NODES=$nodes REDIS_SHARDED_PUBSUB=$sharded PORT=$port BIND_ADDR=127.0.0.1 \
      WORKER_THREADS=1 target/release/chat-sync 2>>"$work/chat-sync.log" & server=$!; pids+=($server); wait_port "$port"
    until curl -fs "http://127.0.0.1:$port/readyz" >/dev/null; do sleep 0.1; done
    declare -A before=()
    for i in "${!node_pids[@]}"; do before[$i]=$(cpu_ticks "${node_pids[$i]}"); done
    flags=(); [ "$sharded" = true ] && flags=(--sharded)
    result=$(target/release/loadgen --target chat-sync --server "127.0.0.1:$port" \
      --redis-cluster "$nodes" "${flags[@]}" --connections 300 --sessions 300 --rate "$RATE" \
      --connect-rate 2000 --duration "$DURATION" --server-pid "$server" --label "cluster-$mode")
    echo "$result" >>"${RESULTS:-/dev/null}"
    read -r published rate lost < <(python3 -c '
import json, sys
r = json.loads(sys.stdin.read().strip().splitlines()[-1])
print(r["published"], round(r["delivered_per_sec"]), r["lost"])' <<<"$result")
    masters=(); replicas=()
    for i in "${!node_pids[@]}"; do
      us=$(python3 -c "print(f'{($(cpu_ticks "${node_pids[$i]}") - ${before[$i]}) / $hz * 1e6 / $published:.2f}')")
      if redis-cli -p "${ports[$i]}" role | head -1 | grep -q master; then masters+=("$us"); else replicas+=("$us"); fi
    done
    echo "| $run | $mode | $published | $rate | $lost | ${masters[*]} | ${replicas[*]} |"
    for p in $server "${node_pids[@]}"; do kill "$p"; while kill -0 "$p" 2>/dev/null; do sleep 0.05; done; done
  done
done

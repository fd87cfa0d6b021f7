#!/usr/bin/env bash
# Benchmarks chat-sync and nginx + Nchan side by side, in the same run, on loopback:
#   bench/run.sh                 # all scenarios, 3 runs each (RUNS, DURATION, SCENARIOS to change)
#   SCENARIOS=nginx-rooms bench/run.sh   # latency through deploy/nginx.conf, 3 instances
#   SCENARIOS="nginx-big-room hot-room" bench/run.sh   # one big room on one instance, or spread
#   BASELINE=HEAD~1 bench/run.sh # also runs chat-sync built from that commit, in the same run
#   SCENARIOS="gzip-big-room gzip-one-per-batch gzip-idle" bench/run.sh  # gzip vs plain viewers
# Prints one table (medians, and chat-sync/Nchan ratios) and keeps the raw JSON lines
# in bench/results/. Each run starts a fresh server; the load generator is one
# single-threaded process, so it uses one core and leaves the other to the server.
set -euo pipefail
cd "$(dirname "$0")/.."

RUNS=${RUNS:-3}
DURATION=${DURATION:-10}
SCENARIOS=${SCENARIOS:-"big-room chat-storm many-rooms idle idle-sessions nginx-rooms nginx-big-room hot-room"}
BASELINE=${BASELINE:-}
# Scenarios Nchan runs in (its big room takes minutes: it falls far behind).
NCHAN_SCENARIOS=${NCHAN_SCENARIOS-"big-room chat-storm many-rooms idle idle-sessions"}
TICK_MS=${TICK_MS:-24}
# Viewers of the latency probe that runs beside busy gzip rooms.
PROBES=${PROBES:-20}

missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
[ -x /usr/sbin/nginx ] || missing+=(nginx)
[ -f /usr/lib/nginx/modules/ngx_nchan_module.so ] || missing+=(libnginx-mod-nchan)
if ((${#missing[@]})); then
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
cargo build --release -q -p chat-sync -p loadgen
chat_sync_bin=target/release/chat-sync

# The load generator opens thousands of streams and sessions from a few loopback
# addresses: the per-client limits, meant for the public side, are lifted.
export MAX_STREAMS_PER_CLIENT=10000000 NEW_SESSIONS_PER_CLIENT=1000000

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 200); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done; return 1; }

work=$(mktemp -d)
mkdir -p bench/results "$work/logs"
out="bench/results/$(date -u +%Y%m%dT%H%M%SZ).jsonl"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  [ -z "$BASELINE" ] || git worktree remove --force "$work/baseline" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

# The baseline: the same server built from another commit, measured in the same run.
if [ -n "$BASELINE" ]; then
  git worktree add -q --detach "$work/baseline" "$BASELINE"
  (cd "$work/baseline" && cargo build --release -q -p chat-sync --target-dir "$OLDPWD/target/baseline")
  base_bin="$PWD/target/baseline/release/chat-sync"
fi

redis_port=$(free_port)
redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no --loglevel warning >/dev/null &
pids+=($!)
wait_port "$redis_port"

scenario_args() {
  case "$1" in
    big-room)   echo "--connections 5000 --sessions 1 --rate 200 --connect-rate 5000" ;;
    chat-storm) echo "--connections 1000 --sessions 1 --rate 2000" ;;
    many-rooms) echo "--connections 5000 --sessions 1000 --rate 1000 --connect-rate 5000" ;;
    idle)       echo "--connections 19000 --sessions 1000 --rate 0 --connect-rate 4000 --source 127.0.0.1,127.0.0.2,127.0.0.3,127.0.0.4" ;;
    # Many quiet sessions: what the server spends when nothing is said (heartbeats only).
    idle-sessions) echo "--connections 10000 --sessions 10000 --rate 0 --connect-rate 4000 --source 127.0.0.1,127.0.0.2" ;;
    # What the scale-out test used to time: 200 sessions x 3 viewers through nginx.
    nginx-rooms) echo "--connections 600 --sessions 200 --rate 200 --connect-rate 2000" ;;
    # The big room through deploy/nginx.conf in its hot-session mode (every session
    # spread): its viewers over three instances, each subscribed to the session.
    hot-room)   echo "--connections 5000 --sessions 1 --rate 200 --connect-rate 5000" ;;
    # Its baseline: the same room through the same nginx, all on one instance.
    nginx-big-room) echo "--connections 5000 --sessions 1 --rate 200 --connect-rate 5000" ;;
    # Compression (`chat-sync-gzip`: the same server, its viewers asking for gzip), with
    # chat messages as real ones are: a busy room (~5 messages per batch), a room
    # quiet enough for one message per batch, and idle memory. 2,000 viewers, not the
    # big room's 5,000: the load generator decodes every stream on its one core, and
    # at 5,000 gzip streams it was the bottleneck (its own backlog showed as latency).
    gzip-big-room) echo "--connections ${GZIP_VIEWERS:-2000} --sessions 1 --rate 200 --connect-rate 5000 --realistic" ;;
    gzip-one-per-batch) echo "--connections 2000 --sessions 1 --rate 20 --connect-rate 5000 --realistic" ;;
    # Delivery classes (`chat-sync-paced`: the same server, its viewers asking for
    # `interval_ms=250`): the big room, every viewer paced, against every tick.
    paced-big-room) echo "--connections ${PACED_VIEWERS:-5000} --sessions 1 --rate 200 --connect-rate 5000 ${PACED_GZIP:+--gzip --realistic}" ;;
    gzip-idle)  echo "--connections 19000 --sessions 1000 --rate 0 --connect-rate 4000 --source 127.0.0.1,127.0.0.2,127.0.0.3,127.0.0.4" ;;
    *) echo "unknown scenario $1" >&2; exit 2 ;;
  esac
}

start_chat_sync_base() { start_chat_sync "$base_bin"; }
start_chat_sync_gzip() { start_chat_sync; target_args="$target_args --gzip"; }
start_chat_sync_paced() { start_chat_sync; target_args="$target_args --query interval_ms=${INTERVAL_MS:-250}"; }

start_chat_sync() {
  local bin=${1:-$chat_sync_bin}
  port=$(free_port)
  # One worker thread, as Nchan gets one worker process: the load generator needs
  # the other core of a two-core machine.
  REDIS_URL="redis://127.0.0.1:$redis_port" PORT=$port BIND_ADDR=127.0.0.1 TICK_MS=$TICK_MS \
    WORKER_THREADS=${WORKER_THREADS:-1} RUST_LOG=warn "$bin" 2>>"$work/logs/chat-sync.log" &
  server_pids=$!
  pids+=($!)
  wait_port "$port"
  target_args="--target chat-sync --server 127.0.0.1:$port --redis redis://127.0.0.1:$redis_port"
}

# Three instances behind the real nginx running deploy/nginx.conf (upstream names and
# listen port substituted), as the README deploys them. Server CPU and RSS are summed
# over the three instances and nginx.
start_chat_sync_nginx() {
  local ports=() all=() spread=""
  # The documented hot-session mode with every session listed: the map's default.
  [ "${HOT:-0}" = 1 ] && spread="s|default  chat_sync_streams;|default  chat_sync_spread;|"
  for i in 1 2 3; do
    local p; p=$(free_port); ports+=("$p")
    REDIS_URL="redis://127.0.0.1:$redis_port" PORT=$p BIND_ADDR=127.0.0.1 TICK_MS=$TICK_MS \
      INSTANCE_ID="bench-$i" WORKER_THREADS=${WORKER_THREADS:-1} RUST_LOG=warn \
      target/release/chat-sync 2>>"$work/logs/chat-sync-$i.log" &
    pids+=($!); all+=($!)
    wait_port "$p"
  done
  port=$(free_port)
  sed -e "s|listen 8080;|listen 127.0.0.1:$port;|" -e "s|chat-sync-1:8080|127.0.0.1:${ports[0]}|" \
    -e "s|chat-sync-2:8080|127.0.0.1:${ports[1]}|" -e "s|chat-sync-3:8080|127.0.0.1:${ports[2]}|" \
    -e "s|worker_processes auto;|worker_processes 1;|" -e "${spread:-s|^||}" \
    deploy/nginx.conf >"$work/deploy-nginx.conf"
  /usr/sbin/nginx -p "$work" -c "$work/deploy-nginx.conf" \
    -g "daemon off; pid $work/deploy-nginx.pid; error_log $work/logs/deploy-nginx.log warn;" &
  pids+=($!)
  wait_port "$port"
  local master; master=$(cat "$work/deploy-nginx.pid")
  server_pids=$(echo "${all[@]}" "$master" $(pgrep -P "$master") | tr ' ' ',')
  target_args="--target chat-sync --server 127.0.0.1:$port --redis redis://127.0.0.1:$redis_port"
}

start_nchan() {
  port=$(free_port)
  sed -e "s|__PORT__|$port|" -e "s|__MODULES__|/usr/lib/nginx/modules|" bench/nchan.conf >"$work/nginx.conf"
  /usr/sbin/nginx -p "$work" -c "$work/nginx.conf" \
    -g "daemon off; pid $work/nginx.pid; error_log $work/logs/nginx.log warn;" &
  pids+=($!)
  wait_port "$port"
  local master; master=$(cat "$work/nginx.pid")
  server_pids=$(echo "$master" $(pgrep -P "$master") | tr ' ' ',')
  target_args="--target nchan --server 127.0.0.1:$port --nchan-pub 127.0.0.1:$port"
}

# A run through nginx leaves tens of thousands of loopback sockets in TIME_WAIT for a
# minute; the next scenario's connects would then fail for want of ports (seen as
# "connected" below the target). Wait for them to clear (at most 70 s).
settle_ports() {
  for _ in $(seq 70); do
    [ "$(ss -tan state time-wait 2>/dev/null | wc -l)" -lt 2000 ] && return 0
    sleep 1
  done
}

stop_server() {
  for p in ${server_pids//,/ }; do kill "$p" 2>/dev/null || true; done
  for p in ${server_pids//,/ }; do while kill -0 "$p" 2>/dev/null; do sleep 0.05; done; done
}

for run in $(seq "$RUNS"); do
  for scenario in $SCENARIOS; do
    targets="chat-sync nchan"; HOT=0
    [ -n "$BASELINE" ] && targets="chat-sync chat-sync-base nchan"
    [[ " $NCHAN_SCENARIOS " == *" $scenario "* ]] || targets=${targets% nchan}
    case "$scenario" in nginx-rooms | nginx-big-room) targets="chat-sync-nginx" ;; esac
    [ "$scenario" = hot-room ] && targets="chat-sync-nginx" && HOT=1
    case "$scenario" in gzip-*) targets="chat-sync chat-sync-gzip" ;; esac
    [ "$scenario" = paced-big-room ] && targets="chat-sync chat-sync-paced"
    for target in $targets; do
      settle_ports
      "start_${target//-/_}"
      duration=$DURATION; [[ "$scenario" = idle || "$scenario" = gzip-idle ]] && duration=3
      # Long enough for a round of heartbeats (every 15 s by default).
      [ "$scenario" = idle-sessions ] && duration=16
      echo "run $run/$RUNS: $scenario on $target" >&2
      # Busy gzip rooms keep the load generator's core busy decoding, and its own
      # backlog shows as latency; a second process with a few viewers of the same
      # session (the scheduler runs it promptly: it is mostly asleep) measures what
      # the server adds.
      probe=
      if [[ "$scenario" = gzip-big-room || "$scenario" = gzip-one-per-batch ]]; then
        # shellcheck disable=SC2046
        target/release/loadgen $target_args $(scenario_args "$scenario") --connections "$PROBES" \
          --rate 0 --duration "$((duration + 2))" --drain 1 --run "$run" --label "$scenario-probe" \
          | sed "s/^{/{\"server\":\"$target\",/" >>"$out" &
        probe=$!
      fi
      # shellcheck disable=SC2046
      target/release/loadgen $target_args $(scenario_args "$scenario") --duration "$duration" \
        --run "$run" --server-pid "$server_pids" --label "$scenario" \
        | sed "s/^{/{\"server\":\"$target\",/" >>"$out" \
        || echo "  (loadgen failed: see above)" >&2
      [ -z "$probe" ] || wait "$probe"
      stop_server
    done
  done
done

python3 bench/summary.py "$out"
echo "raw results: $out" >&2

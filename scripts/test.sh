#!/usr/bin/env bash
# The test command: installs what the tests need when it is missing (redis-server and
# nginx, which the tests start themselves on free loopback ports), then runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
[ -x /usr/sbin/nginx ] || command -v nginx >/dev/null || missing+=(nginx)
compose=(docker compose)
if ! docker compose version >/dev/null 2>&1; then
  compose=(docker-compose)
  command -v docker-compose >/dev/null || missing+=(docker-compose)
fi
sudo=""
[ "$(id -u)" = 0 ] || sudo="sudo"
if ((${#missing[@]})); then
  echo "installing: ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The compose file is checked statically: not every machine runs a Docker engine.
"${compose[@]}" config -q
echo "docker-compose.yml: valid (${compose[*]} config)"

cargo test --all-targets "$@"

#!/usr/bin/env bash
# The test command: installs what the tests need when it is missing (redis-server, whose
# binary is also the sentinel (`redis-server --sentinel`), redis-cli for making a cluster, and
# nginx, which the tests start themselves on free loopback ports; Chromium and
# playwright-core for the browser tests), then runs every test: cargo's, then the
# end-to-end tests in headless Chromium against the binary cargo just built.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
command -v redis-cli >/dev/null || missing+=(redis-tools)
[ -x /usr/sbin/nginx ] || command -v nginx >/dev/null || missing+=(nginx)
[ -x /usr/bin/chromium ] || missing+=(chromium)
command -v node >/dev/null || missing+=(nodejs npm)
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

cargo test --workspace --all-targets "$@"

[ -d e2e/node_modules/playwright-core ] || npm ci --prefix e2e --no-audit --no-fund
(cd e2e && node --test --test-concurrency=1 --test-reporter=spec)

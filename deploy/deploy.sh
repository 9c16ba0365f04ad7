#!/usr/bin/env bash
# Deploy the checked-out codex-gateway with docker compose: pull, build, migrate, start the new
# version, wait for /readyz, and go back to the previous image if it never becomes ready.
# Safe to run again: a version that is already running and ready is left alone.
# A rollback to a version from before sealing (schema revision 0010) sends every upstream API
# key stored sealed empty: such accounts get 401 and leave rotation as needs_relogin.
#
# Settings (environment):
#   DEPLOY_DIR            the checkout with docker-compose.yml and .env (default: this repo)
#   DEPLOY_READY_URL      readiness URL (default http://127.0.0.1:GATEWAY_PORT/readyz, the
#                         port from .env, else 8787)
#   DEPLOY_READY_TIMEOUT  seconds to wait for readiness (default 120)
#   DEPLOY_POLL_SECONDS   seconds between readiness probes (default 2)
#   DEPLOY_PULL           0 skips `git pull` (default 1)
#   DOCKER                the docker client (default docker)
set -euo pipefail

DEPLOY_DIR=${DEPLOY_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
DEPLOY_READY_TIMEOUT=${DEPLOY_READY_TIMEOUT:-120}
DEPLOY_POLL_SECONDS=${DEPLOY_POLL_SECONDS:-2}
DEPLOY_PULL=${DEPLOY_PULL:-1}
DOCKER=${DOCKER:-docker}
STATE_DIR=$DEPLOY_DIR/.deploy

say() { echo "deploy: $*"; }
fail() { echo "deploy: error: $*" >&2; exit 1; }
compose() { say "docker compose $*"; "$DOCKER" compose "$@"; }

is_ready() { curl -fsS --max-time 5 -o /dev/null "$DEPLOY_READY_URL" 2>/dev/null; }

wait_ready() {
  local deadline=$((SECONDS + DEPLOY_READY_TIMEOUT))
  while ((SECONDS < deadline)); do
    if is_ready; then return 0; fi
    sleep "$DEPLOY_POLL_SECONDS"
  done
  return 1
}

# Start the gateway from image tag $1 (postgres and redis are already up and healthy).
start_gateway() {
  CODEX_GATEWAY_IMAGE_TAG=$1 compose up -d --no-deps --force-recreate gateway
}

report() {
  say "running: $(curl -fsS --max-time 5 "$DEPLOY_HEALTH_URL" 2>/dev/null || echo 'no answer')"
  say "checkout: $(git log --oneline -1)"
  "$DOCKER" compose ps
}

cd "$DEPLOY_DIR"
[ -f docker-compose.yml ] || fail "no docker-compose.yml in $DEPLOY_DIR"
[ -f .env ] || fail "no .env in $DEPLOY_DIR: copy .env.example to .env and fill it in"
port=$(sed -n 's/^GATEWAY_PORT=//p' .env | tail -n 1)
DEPLOY_READY_URL=${DEPLOY_READY_URL:-http://127.0.0.1:${port:-8787}/readyz}
DEPLOY_HEALTH_URL=${DEPLOY_HEALTH_URL:-${DEPLOY_READY_URL%/readyz}/healthz}
mkdir -p "$STATE_DIR"
previous=$(cat "$STATE_DIR/current" 2>/dev/null || true)

if [ "$DEPLOY_PULL" != 0 ]; then
  say "git pull --ff-only"
  git pull --ff-only
fi
commit=$(git rev-parse --short=12 HEAD)
export GIT_COMMIT=$commit CODEX_GATEWAY_IMAGE_TAG=$commit
say "deploying commit $commit (running now: ${previous:-nothing})"

if [ "$previous" = "$commit" ] && is_ready; then
  say "commit $commit is already running and ready; nothing to do"
  report
  exit 0
fi

compose build gateway
compose up -d --wait postgres redis
compose run --rm migrate
start_gateway "$commit"

if wait_ready; then
  echo "$commit" > "$STATE_DIR/current"
  if [ -n "$previous" ] && [ "$previous" != "$commit" ]; then
    echo "$previous" > "$STATE_DIR/previous"
  fi
  say "commit $commit is ready"
  report
  exit 0
fi

say "commit $commit did not become ready within ${DEPLOY_READY_TIMEOUT}s; its last log lines:"
"$DOCKER" compose logs --tail 50 gateway || true
if [ -z "$previous" ] || [ "$previous" = "$commit" ]; then
  fail "no previous version to roll back to; the gateway is not serving"
fi
say "rolling back to $previous"
start_gateway "$previous"
export CODEX_GATEWAY_IMAGE_TAG=$previous
if wait_ready; then
  say "rolled back: $previous is ready again"
  report
  fail "deploy of $commit failed; $previous is serving"
fi
fail "deploy of $commit failed and $previous is not ready either"

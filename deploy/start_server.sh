#!/usr/bin/env bash
# Start a Prefect server (API + UI) in the foreground and point this machine's Prefect profile
# at it. Stop it with Ctrl-C. Settings (environment):
#   PREFECT_HOST  address to listen on (default 127.0.0.1; 0.0.0.0 for workers on other machines)
#   PREFECT_PORT  port (default 4200)
#   PREFECT_HOME  where the server keeps prefect.db (default ~/.prefect)
#   PREFECT_SERVER_DATABASE_CONNECTION_URL  postgresql+asyncpg://... for a PostgreSQL backend
# The server must run with its services (no --no-services): the scheduler turns the cron
# schedule into runs, and the triggers service runs automations (zombie detection).
set -euo pipefail
HOST="${PREFECT_HOST:-127.0.0.1}"
PORT="${PREFECT_PORT:-4200}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PREFECT="${PREFECT_BIN:-$HERE/.venv/bin/prefect}"
[ -x "$PREFECT" ] || PREFECT=prefect
export PREFECT_SERVER_ANALYTICS_ENABLED="${PREFECT_SERVER_ANALYTICS_ENABLED:-false}"
# The address clients (CLI, workers, flow runs) use; with 0.0.0.0 use this machine's name.
API_HOST="$HOST"
[ "$HOST" = "0.0.0.0" ] && API_HOST="$(hostname -f 2>/dev/null || hostname)"
"$PREFECT" config set PREFECT_API_URL="http://$API_HOST:$PORT/api" >/dev/null
echo "PREFECT_API_URL=http://$API_HOST:$PORT/api (saved in the current Prefect profile)"
echo "UI: http://$API_HOST:$PORT"
exec "$PREFECT" server start --host "$HOST" --port "$PORT"

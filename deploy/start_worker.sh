#!/usr/bin/env bash
# Start a process worker on the longwriter pool in the foreground (Ctrl-C stops it; runs it
# started are left to finish or to the zombie automation). Run one per machine, or several.
# Settings (environment):
#   LONGWRITER_POOL      work pool (default longwriter)
#   LONGWRITER_WORKER_LIMIT  flow runs this worker runs at once (default 4)
#   PREFECT_API_URL      the server (set by deploy/start_server.sh on the server's machine;
#                        on other machines: export PREFECT_API_URL=http://SERVER:4200/api)
#   LONGWRITER_API_KEY   the endpoints' API key, if they need one: flow runs inherit this
#                        worker's environment and the key is never stored in Prefect
#   PREFECT_WORKER_QUERY_SECONDS  how often the worker polls for runs (default 10)
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PREFECT="${PREFECT_BIN:-$HERE/.venv/bin/prefect}"
[ -x "$PREFECT" ] || PREFECT=prefect
POOL="${LONGWRITER_POOL:-longwriter}"
exec "$PREFECT" worker start --pool "$POOL" --type process \
  --limit "${LONGWRITER_WORKER_LIMIT:-4}" "$@"

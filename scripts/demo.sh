#!/usr/bin/env bash
# Set up, serve the default pair (fetched and converted on first use), answer one real request
# from the client, then shut the server down gracefully.
set -euo pipefail
cd "$(dirname "$0")/.."
TANDEM_EXTRAS=bench bash scripts/setup.sh
. .venv/bin/activate
PORT="${TANDEM_PORT:-50051}"
tandem models fetch
log="$(mktemp)"
tandem serve --port "$PORT" --metrics-port 0 --tracing none --log-level WARNING >"$log" 2>&1 &
server=$!
trap 'kill -TERM $server 2>/dev/null || true; wait $server 2>/dev/null || true' EXIT
for _ in $(seq 600); do
  grep -q "tandem: serving" "$log" && break
  kill -0 $server 2>/dev/null || { cat "$log"; exit 1; }
  sleep 1
done
grep -q "tandem: serving" "$log" || { cat "$log"; exit 1; }
tandem generate "Write a Python function that reverses a string." --chat --stream \
  --max-new-tokens 64 --address "127.0.0.1:$PORT"

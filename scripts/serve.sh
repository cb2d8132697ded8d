#!/usr/bin/env bash
# `make serve`: the model server and the batching proxy on 127.0.0.1, kept running.
# The first time, it versions the demo model in a scratch repository (.nexus/serve-demo,
# git-ignored); later runs serve what is there. Ctrl-C stops both processes.
#
# Environment: SERVE_PORT (the proxy, 8080), SERVER_PORT (the model server, 8000),
# SERVE_DIR (the scratch repository, .nexus/serve-demo).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$here")"
# shellcheck source=scripts/processes.sh
source "$here/processes.sh"

proxy_port="${SERVE_PORT:-8080}"
server_port="${SERVER_PORT:-8000}"
repo="${SERVE_DIR:-$root/.nexus/serve-demo}"
server="http://127.0.0.1:$server_port"
proxy="http://127.0.0.1:$proxy_port"

trap 'stop_processes' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if [[ ! -f "$repo/.nexus_meta.json" ]] || ! grep -q '"demo_model"' "$repo/.nexus_meta.json"; then
    python "$here/demo_client.py" step "first run: versioning the demo model in $repo"
    rm -rf "$repo"
    mkdir -p "$repo"
    cd "$repo"
    git init -q -b main
    git config user.name "NexusML demo"
    git config user.email "demo@nexusml.invalid"
    git config commit.gpgsign false
    printf 'out/\nlogs/\n' > .gitignore
    git add .gitignore && git commit -q -m "serve demo"
    nexus init >/dev/null
    git add -A && git commit -q -m "nexus init"
    python "$here/demo_model.py" out/model.pt --seed 1
    nexus store out/model.pt demo_model -m "demo model" --input-shape 8
    git add .nexus_meta.json && git commit -q -m "nexus: store demo_model"
fi
cd "$repo"
mkdir -p logs

python "$here/demo_client.py" step "model server on $server, proxy on $proxy"
start_model_server "$server_port" "$repo/.nexus_meta.json" "$repo/.nexus/cache" logs/model-server.log
start_proxy "$proxy_port" "$server" logs/proxy.log
python "$here/demo_client.py" wait "$proxy/readyz" --timeout 90 \
    --process "model server:${NEXUS_PIDS[0]}:$repo/logs/model-server.log" \
    --process "proxy:${NEXUS_PIDS[1]}:$repo/logs/proxy.log"
cat <<INFO

Try:
  curl -s $proxy/predict -H 'Content-Type: application/json' \\
       -d '{"input": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]}'
  curl -s $proxy/v1/metadata        # open docs: $proxy/docs
Store a new version in $repo, then: curl -s -X POST $server/admin/reload
Logs: $repo/logs/. Ctrl-C stops both.
INFO

# keep running until one of them exits (or Ctrl-C); then stop the other
status=0
wait -n "${NEXUS_PIDS[@]}" || status=$?
echo "a process exited (status $status); stopping the other" >&2
exit "$status"

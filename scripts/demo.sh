#!/usr/bin/env bash
# `make demo`: the whole loop on the embedded local store, in a scratch git repository.
# Version a model with nexus, serve it (model server + batching proxy on 127.0.0.1), send
# predictions, store a second version and hot-reload it, roll back and reload again; then
# stop every process it started and remove the scratch repository. Exits 0.
#
# Environment: DEMO_SERVER_PORT, DEMO_PROXY_PORT (default: free ports), DEMO_KEEP=1 keeps
# the scratch repository and its logs for a look afterwards.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=scripts/processes.sh
source "$here/processes.sh"

scratch="$(mktemp -d -t nexus-demo-XXXXXX)"
cleanup() {
    local status=$?
    stop_processes
    if [[ -n "${DEMO_KEEP:-}" ]]; then
        echo "scratch repository kept: $scratch"
    else
        rm -rf "$scratch"
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

step() { python "$here/demo_client.py" step "$*"; }
client() { python "$here/demo_client.py" "$@"; }

server_port="${DEMO_SERVER_PORT:-$(free_port)}"
proxy_port="${DEMO_PROXY_PORT:-$(free_port)}"
server="http://127.0.0.1:$server_port"
proxy="http://127.0.0.1:$proxy_port"

cd "$scratch"
git init -q -b main
git config user.name "NexusML demo"
git config user.email "demo@nexusml.invalid"
git config commit.gpgsign false
printf 'out/\nlogs/\n' > .gitignore
printf 'print("training code v1")\n' > train.py
mkdir -p out logs
git add . && git commit -q -m "training code v1"

step "nexus init: a local store in .nexus/store (git-ignored)"
nexus init
git add -A && git commit -q -m "nexus init"

step "train v1 and store it with nexus"
python "$here/demo_model.py" out/model.pt --seed 1
nexus store out/model.pt demo_model -m "first model" --metric accuracy=0.91 --input-shape 8
git add .nexus_meta.json && git commit -q -m "nexus: store demo_model v1"
v1=$(git rev-parse --short=12 HEAD~1)

step "start the model server (:$server_port) and the batching proxy (:$proxy_port)"
start_model_server "$server_port" "$scratch/.nexus_meta.json" "$scratch/.nexus/cache" logs/model-server.log
start_proxy "$proxy_port" "$server" logs/proxy.log
client wait "$proxy/readyz" --timeout 90 \
    --process "model server:${NEXUS_PIDS[0]}:$scratch/logs/model-server.log" \
    --process "proxy:${NEXUS_PIDS[1]}:$scratch/logs/proxy.log"

step "POST /predict through the proxy (model v1 @ $v1)"
client predict "$proxy" --save out/v1.json

step "train v2 on a new commit, store it, reload the model server"
printf 'print("training code v2")\n' > train.py
git commit -q -am "training code v2"
python "$here/demo_model.py" out/model.pt --seed 2
nexus store out/model.pt demo_model -m "more data" --metric accuracy=0.94 --input-shape 8
git add .nexus_meta.json && git commit -q -m "nexus: store demo_model v2"
client reload "$server"
client predict "$proxy" --save out/v2.json --compare out/v1.json --expect changed

step "nexus list"
nexus list demo_model

step "nexus rollback to v1, commit, reload: the answers go back"
nexus rollback demo_model
git add .nexus_meta.json && git commit -q -m "nexus: roll demo_model back"
client reload "$server"
client predict "$proxy" --save out/rolled-back.json --compare out/v1.json --expect same

step "done: stopping the model server and the proxy"
stop_processes
echo "demo finished: every process stopped, the scratch repository is removed on exit"

#!/usr/bin/env bash
# `make publish-demo`: build the demo model, store it in the compose stack's MinIO and
# record it in the top-level .nexus_meta.json, the registry the stack's model server reads.
#
# It is a plain `nexus store`: the version is tied to this clone's HEAD, so the working
# tree must be clean (changes to .nexus_meta.json alone are allowed; git-ignored files
# don't count). Commit or stash your changes first; nexus says so (exit 3) otherwise.
# Storing again at the same commit uploads nothing and succeeds.
#
# MinIO settings as docker-compose.yml has them: from .env when there is one, else its
# defaults. NEXUS_PUBLISH_ENDPOINT_URL overrides the endpoint (http://127.0.0.1:9000).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$here")"
cd "$root"

if [[ -f .env ]]; then
    set -a
    # shellcheck source=/dev/null
    source .env
    set +a
fi
export NEXUS_PROVIDER=minio
export NEXUS_ENDPOINT_URL="${NEXUS_PUBLISH_ENDPOINT_URL:-http://127.0.0.1:9000}"
export NEXUS_BUCKET="${NEXUS_BUCKET:-nexus-models}"
export NEXUS_REGION="${NEXUS_REGION:-us-east-1}"
export AWS_ACCESS_KEY_ID="${MINIO_ROOT_USER:-minioadmin}"
export AWS_SECRET_ACCESS_KEY="${MINIO_ROOT_PASSWORD:-minioadmin}"

model="$root/.nexus/publish-demo/model.pt"  # .nexus/ is git-ignored: the tree stays clean
mkdir -p "$(dirname "$model")"
python "$here/demo_model.py" "$model" --seed "${DEMO_SEED:-1}"
nexus store "$model" demo_model --meta .nexus_meta.json -m "demo model (make publish-demo)" \
    --input-shape 8

echo
echo "Published to s3://$NEXUS_BUCKET on $NEXUS_ENDPOINT_URL and recorded in .nexus_meta.json."
# The server mounts .nexus_meta.json; nexus replaced the file (write, then rename), which a
# running container's file mount does not follow: a restart mounts the new one.
if command -v docker >/dev/null 2>&1 \
    && [[ -n "$(docker compose ps --status running --quiet model-server 2>/dev/null)" ]]; then
    echo "Restarting the stack's model server to serve it: docker compose restart model-server"
    docker compose restart model-server
else
    echo "With the compose stack running: docker compose restart model-server"
fi
cat <<NEXT
Then (once /readyz says ready):
  curl -s localhost:8080/predict -H 'Content-Type: application/json' \\
       -d '{"input": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]}'
NEXT

#!/usr/bin/env bash
# Publish a model from CI: `nexus store --json`, commit .nexus_meta.json back, push.
#
#   scripts/publish_model.sh MODEL_FILE MODEL_NAME [more `nexus store` options]
#
# Run it at the root of a clean checkout of the commit that produced MODEL_FILE (keep the
# file outside the working tree, or in a git-ignored folder). Storage and credentials come
# from the environment (NEXUS_PROVIDER, NEXUS_BUCKET, AWS_* ...), never from this repo.
# A re-run for a commit already published on the branch succeeds without storing again.
# Any failure exits non-zero: nexus's own exit code when it is nexus that failed (SPEC
# section 4: 3 git, 4 not found, 5 conflict, 6 storage/credentials, 7 integrity).
#
# The metadata commit says [skip ci] so that pushing it does not start the workflow again.
# When the push loses a race (another job or a person pushed first), the commit is rebased
# on the new branch tip, with nexus's merge driver joining the two registries, and pushed
# again: at most PUBLISH_MAX_ATTEMPTS times.
#
# Environment: PUBLISH_REMOTE (origin), PUBLISH_BRANCH (main), PUBLISH_MAX_ATTEMPTS (5),
# PUBLISH_RETRY_DELAY_S (2; doubled each time), NEXUS (the nexus command, `nexus`).
set -euo pipefail

if [[ $# -lt 2 ]]; then
    echo "usage: $0 MODEL_FILE MODEL_NAME [nexus store options...]" >&2
    exit 2
fi
model_file=$1
model_name=$2
shift 2

remote=${PUBLISH_REMOTE:-origin}
branch=${PUBLISH_BRANCH:-main}
max_attempts=${PUBLISH_MAX_ATTEMPTS:-5}
delay=${PUBLISH_RETRY_DELAY_S:-2}
nexus=${NEXUS:-nexus}
meta=.nexus_meta.json

log() { printf 'publish: %s\n' "$*" >&2; }

# Rebases join concurrent registries through nexus's merge driver, whether or not the
# repository declares it in .gitattributes (.git/info/attributes stays local).
git config merge.nexus-meta.name "nexus registry merge"
git config merge.nexus-meta.driver "$nexus merge-driver %O %A %B"
if [[ "$(git check-attr merge -- "$meta" | awk '{print $NF}')" != "nexus-meta" ]]; then
    info_attributes="$(git rev-parse --git-path info/attributes)"
    mkdir -p "$(dirname "$info_attributes")"
    printf '%s merge=nexus-meta\n' "$meta" >> "$info_attributes"
fi

built_from=$(git rev-parse HEAD)
result=$(mktemp)
published=$(mktemp)
trap 'rm -f "$result" "$published"' EXIT

# A re-run of the job for a commit that is already published has nothing to do (its
# rebuilt weights may differ byte for byte, which nexus would refuse as a conflict).
git fetch --quiet "$remote" "$branch"
if git show "FETCH_HEAD:$meta" > "$published" 2>/dev/null \
    && "$nexus" list "$model_name" --json --meta "$published" 2>/dev/null | grep -q "$built_from"; then
    log "$model_name is already published for ${built_from:0:12} on $remote/$branch: nothing to do"
    exit 0
fi

log "storing $model_file as $model_name at ${built_from:0:12}"
status=0
"$nexus" store "$model_file" "$model_name" --json "$@" > "$result" || status=$?
cat "$result"
if [[ $status -ne 0 ]]; then
    log "nexus store failed with exit code $status"
    exit "$status"
fi

git add -- "$meta"
if git diff --cached --quiet -- "$meta"; then
    log "$meta already records this version: nothing to commit"
    exit 0
fi
git commit --quiet -m "nexus: publish $model_name from ${built_from:0:12} [skip ci]" -- "$meta"

for ((attempt = 1; ; attempt++)); do
    if git push --quiet "$remote" "HEAD:refs/heads/$branch"; then
        log "pushed the metadata commit $(git rev-parse --short HEAD) to $remote/$branch"
        exit 0
    fi
    if ((attempt >= max_attempts)); then
        log "push still rejected after $attempt attempts; giving up"
        exit 1
    fi
    log "push rejected (attempt $attempt of $max_attempts): rebasing on $remote/$branch"
    sleep "$delay"
    delay=$((delay * 2))
    git fetch --quiet "$remote" "$branch"
    if ! git rebase --quiet FETCH_HEAD; then
        git rebase --abort || true
        log "could not rebase the metadata commit on $remote/$branch (see above)"
        exit 1
    fi
done

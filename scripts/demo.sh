#!/usr/bin/env bash
# `make demo`: version a small model with nexus in a scratch git repository, on the
# embedded local store: store two versions, list, load, roll back, verify. Exits 0.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
scratch="$(mktemp -d -t nexus-demo-XXXXXX)"
trap 'rm -rf "$scratch"' EXIT
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

cd "$scratch"
git init -q -b main
git config user.name "NexusML demo"
git config user.email "demo@nexusml.invalid"
printf 'out/\n' > .gitignore
printf 'print("training code v1")\n' > train.py
git add . && git commit -q -m "training code v1"

step "nexus init"
nexus init
git add .nexusrc .nexus_meta.json && git commit -q -m "nexus init"

step "train v1 and store it"
python "$here/demo_model.py" out/model.pt --seed 1
nexus store out/model.pt demo_model -m "first model" --metric accuracy=0.91 --input-shape 8
git add .nexus_meta.json && git commit -q -m "nexus: store demo_model v1"

step "train v2 on a new commit and store it"
printf 'print("training code v2")\n' > train.py
git commit -q -am "training code v2"
python "$here/demo_model.py" out/model.pt --seed 2
nexus store out/model.pt demo_model -m "more data" --metric accuracy=0.94 --input-shape 8
git add .nexus_meta.json && git commit -q -m "nexus: store demo_model v2"

step "nexus list"
nexus list

step "nexus load (latest)"
nexus load demo_model -o out/latest.pt

step "nexus rollback, then load again"
nexus rollback demo_model
nexus load demo_model -o out/rolled_back.pt
python - <<'PY'
import hashlib, pathlib
latest, rolled = (hashlib.sha256(pathlib.Path(p).read_bytes()).hexdigest()[:12]
                  for p in ("out/latest.pt", "out/rolled_back.pt"))
print(f"latest sha256 {latest}…, after rollback {rolled}…")
assert latest != rolled, "rollback should serve the other version"
PY

step "nexus verify"
nexus verify

step "done: the demo repository is removed on exit"

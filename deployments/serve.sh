#!/usr/bin/env bash
# Run the deployments of deployments/prefect.yaml on this machine.
#
#   deployments/serve.sh          start a Prefect server on 127.0.0.1, create the process work pool
#                                 if missing, deploy everything, then run a worker (Ctrl-C stops both)
#   deployments/serve.sh deploy   only create the pool if missing and deploy, against the server
#                                 of PREFECT_API_URL
#
# Environment (defaults in brackets): SEGFLOW_HOME [~/segflow]; SEGFLOW_LANDING [$SEGFLOW_HOME/landing],
# SEGFLOW_IMAGES [$SEGFLOW_HOME/images], SEGFLOW_CHECKPOINT [$SEGFLOW_HOME/model.safetensors],
# SEGFLOW_TRAIN_STORE [$SEGFLOW_HOME/train/store.zarr], SEGFLOW_LAKE [$SEGFLOW_HOME/lake] become the
# deployments' default parameters; SEGFLOW_PREFECT_PORT [4200] is the server's port.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
export PWD="$root"  # prefect.yaml's pull step sends flow runs to the directory deployed from

if [[ -x "$root/.venv/bin/prefect" ]]; then
    bin="$root/.venv/bin/" py="$root/.venv/bin/python"
elif command -v prefect >/dev/null; then
    bin="" py="$(command -v python3 || command -v python)"
else
    echo "serve.sh: prefect not found: run 'make install' (creates .venv) or install segflow" >&2
    exit 1
fi

export PREFECT_SERVER_ANALYTICS_ENABLED="${PREFECT_SERVER_ANALYTICS_ENABLED:-false}"
export DO_NOT_TRACK="${DO_NOT_TRACK:-1}"
export SEGFLOW_HOME="${SEGFLOW_HOME:-$HOME/segflow}"
export SEGFLOW_LANDING="${SEGFLOW_LANDING:-$SEGFLOW_HOME/landing}"
export SEGFLOW_IMAGES="${SEGFLOW_IMAGES:-$SEGFLOW_HOME/images}"
export SEGFLOW_CHECKPOINT="${SEGFLOW_CHECKPOINT:-$SEGFLOW_HOME/model.safetensors}"
export SEGFLOW_TRAIN_STORE="${SEGFLOW_TRAIN_STORE:-$SEGFLOW_HOME/train/store.zarr}"
export SEGFLOW_LAKE="${SEGFLOW_LAKE:-$SEGFLOW_HOME/lake}"
pool=segflow-process  # the work pool named in prefect.yaml

deploy() {
    case "$SEGFLOW_LANDING" in *://*) ;; *) mkdir -p "$SEGFLOW_LANDING" ;; esac
    "${bin}prefect" work-pool inspect "$pool" >/dev/null 2>&1 \
        || "${bin}prefect" work-pool create "$pool" --type process
    # = prefect --no-prompt deploy --all --prefect-file deployments/prefect.yaml (see deploy.py)
    CI=true "$py" deployments/deploy.py --all --prefect-file deployments/prefect.yaml
}

case "${1:-all}" in
    deploy)
        if [[ -z "${PREFECT_API_URL:-}" ]]; then
            echo "serve.sh deploy: set PREFECT_API_URL to your Prefect server (e.g. http://127.0.0.1:4200/api)" >&2
            exit 1
        fi
        deploy
        ;;
    all)
        port="${SEGFLOW_PREFECT_PORT:-4200}"
        export PREFECT_API_URL="http://127.0.0.1:$port/api"
        "${bin}prefect" server start --host 127.0.0.1 --port "$port" &
        server=$!
        trap 'kill "$server" 2>/dev/null; wait "$server" 2>/dev/null' EXIT INT TERM
        healthy() { "$py" -c "import urllib.request as u; u.urlopen('$PREFECT_API_URL/health', timeout=2)" 2>/dev/null; }
        for _ in $(seq 120); do
            healthy && break
            kill -0 "$server" 2>/dev/null || { echo "serve.sh: the Prefect server exited" >&2; exit 1; }
            sleep 1
        done
        healthy || { echo "serve.sh: no answer from $PREFECT_API_URL/health after 120 s" >&2; exit 1; }
        deploy
        echo "serve.sh: UI at http://127.0.0.1:$port; starting a worker on pool $pool (Ctrl-C stops)"
        "${bin}prefect" worker start --pool "$pool" --install-policy never
        ;;
    *)
        echo "usage: deployments/serve.sh [all|deploy]" >&2
        exit 2
        ;;
esac

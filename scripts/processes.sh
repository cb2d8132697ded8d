# Sourced by demo.sh and serve.sh: start the model server and the proxy in the background,
# logs to files, and stop every process they started (also on Ctrl-C or an error).
# Needs: python (with nexusml installed) on PATH; sets NEXUS_PIDS.

NEXUS_PIDS=()

# A free TCP port on 127.0.0.1 (the kernel picks; a tiny race with other programs remains).
free_port() {
    python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# start_model_server PORT META_PATH CACHE_DIR LOG
start_model_server() {
    NEXUS_HOST=127.0.0.1 NEXUS_PORT="$1" NEXUS_META="$2" NEXUS_CACHE_DIR="$3" NEXUS_DEVICE="${NEXUS_DEVICE:-cpu}" \
        python -m model_server >"$4" 2>&1 &
    NEXUS_PIDS+=("$!")
}

# start_proxy PORT MODEL_SERVER_URL LOG
start_proxy() {
    NEXUS_HOST=127.0.0.1 NEXUS_PORT="$1" NEXUS_MODEL_SERVER_URL="$2" \
        python -m proxy >"$3" 2>&1 &
    NEXUS_PIDS+=("$!")
}

# Stop what we started: SIGTERM (both drain gracefully), SIGKILL after 15 s.
stop_processes() {
    local pid waited
    ((${#NEXUS_PIDS[@]})) || return 0
    for pid in "${NEXUS_PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${NEXUS_PIDS[@]}"; do
        for ((waited = 0; waited < 150; waited++)); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    NEXUS_PIDS=()
}

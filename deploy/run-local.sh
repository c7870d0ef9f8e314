#!/usr/bin/env bash
# Procfile-style launcher: RabbitMQ (if none answers) plus one process per
# service, each logging JSON to deploy/logs/<service>.log. Ctrl-C stops them all.
#
#   deploy/run-local.sh --model DIR [--replicas N] [--gateways N] [--port 8000]
#
# Every other setting comes from FASTSERVE_* variables (see `fastserve up --help`),
# e.g. FASTSERVE_POLICY=fcfs FASTSERVE_GPU_KV_BLOCKS=256 deploy/run-local.sh --model DIR
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL="${FASTSERVE_MODEL:-}"
REPLICAS=1
GATEWAYS=1
PORT=8000
while [ $# -gt 0 ]; do
    case "$1" in
        --model) MODEL="$2"; shift 2 ;;
        --replicas) REPLICAS="$2"; shift 2 ;;
        --gateways) GATEWAYS="$2"; shift 2 ;;
        --port) PORT="$2"; shift 2 ;;
        *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
done
if [ -z "$MODEL" ]; then
    MODEL="${HOME}/.cache/fastserve/models/llama-small-random"
    [ -f "$MODEL/model.safetensors" ] || fastserve make-model "$MODEL" --preset small
    echo "run-local: no --model: serving the RANDOM-weight small model in $MODEL" >&2
fi
export FASTSERVE_MODEL="$MODEL"
export FASTSERVE_BROKER="${FASTSERVE_BROKER:-amqp://guest:guest@127.0.0.1:5672/}"

broker_up() { python3 -c 'import socket,sys,urllib.parse as u; p=u.urlparse(sys.argv[1]); socket.create_connection((p.hostname or "127.0.0.1", p.port or 5672), 1).close()' "$FASTSERVE_BROKER" 2>/dev/null; }
if ! broker_up; then
    echo "run-local: starting rabbitmq-server" >&2
    rabbitmq-server -detached
    for _ in $(seq 1 60); do broker_up && break; sleep 1; done
    broker_up || { echo "run-local: RabbitMQ does not answer at $FASTSERVE_BROKER" >&2; exit 1; }
fi

mkdir -p deploy/logs
pids=()
start() {  # start NAME CMD...: one process, its log in deploy/logs/NAME.log
    local name="$1"; shift
    "$@" >>"deploy/logs/$name.log" 2>&1 &
    pids+=($!)
    echo "run-local: $name (pid $!) -> deploy/logs/$name.log" >&2
}
stop_all() {
    trap - INT TERM EXIT
    echo "run-local: stopping ${#pids[@]} processes" >&2
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait || true
    exit 0
}
trap stop_all INT TERM EXIT

for r in $(seq 0 $((REPLICAS - 1))); do
    # One KV store, worker and scheduler per replica; replicas share the job queue.
    start "kvstore-$r" fastserve kvstore --replica "r$r"
    start "worker-$r" fastserve worker --replica "r$r"
    start "scheduler-$r" fastserve scheduler --replica "r$r"
done
for g in $(seq 0 $((GATEWAYS - 1))); do
    start "gateway-$g" fastserve gateway --port $((PORT + g))
done
echo "run-local: gateways on http://127.0.0.1:$PORT/v1 (and following ports); Ctrl-C stops" >&2
wait -n || true
echo "run-local: a process exited; see deploy/logs" >&2

#!/usr/bin/env bash
# Starts one peer, waits for GET /health, runs check_peer.py and wrk on each route, stops it.
#   bench/peers/smoke.sh PEER PORT [extra peer args...]      (PEER: bare, bare_batched, ...)
# Env: PY (python, default .venv/bin/python), TTA (flip_translate), THREADS (2), C (8),
#      D (5s), TRITON=1 for Triton (no /v1, /v2/models/classifier/ready, [N,1] bodies, Triton stats).
# The peer runs in its own process group (setsid) and is killed by group on exit.
set -u
cd "$(dirname "$0")/../.."
peer=$1 port=$2; shift 2
PY=${PY:-.venv/bin/python}
HEALTH=/health STATS=/stats OIP=infer.bin
[ -n "${TRITON:-}" ] && HEALTH=/v2/models/classifier/ready STATS=/v2/models/classifier/stats OIP=infer_2d.bin
bodies=/tmp/peer-bodies
.venv/bin/python bench/peers/make_bodies.py --out "$bodies" >/dev/null
log=/tmp/peer-$peer.log
setsid "$PY" "bench/peers/$peer.py" --port "$port" --checkpoint models/cifar10-classifier \
    --tta "${TTA:-flip_translate}" --threads "${THREADS:-2}" "$@" >"$log" 2>&1 &
pid=$!
trap 'kill -TERM -- -$pid 2>/dev/null; sleep 2; kill -KILL -- -$pid 2>/dev/null' EXIT
for _ in $(seq 240); do
    curl -sf "http://127.0.0.1:$port$HEALTH" >/dev/null && break
    kill -0 $pid 2>/dev/null || { echo "peer died:"; tail -40 "$log"; exit 1; }
    sleep 0.5
done
echo "== $peer ready (pid $pid)"
.venv/bin/python bench/peers/check_peer.py --port "$port" ${TRITON:+--triton}
run_wrk() {  # name url body ctype [hlen]
    echo "== wrk $1"
    BODY=$3 CTYPE=$4 HLEN=${5:-} wrk -t1 -c"${C:-8}" -d"${D:-5s}" --latency \
        -s bench/peers/post.lua "$2" | grep -E "Requests/sec|Latency  |50%|99%|non-2xx|Non-2xx"
}
url=http://127.0.0.1:$port
[ -z "${TRITON:-}" ] && run_wrk "v1 jpeg" $url/v1/classify $bodies/image.jpg image/jpeg
run_wrk "v2 oip binary" $url/v2/models/classifier/infer $bodies/$OIP \
    application/octet-stream "$(cat $bodies/$OIP.hlen)"
echo "== stats: $(curl -s $url$STATS | head -c 600)"

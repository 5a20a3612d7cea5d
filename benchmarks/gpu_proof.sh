#!/usr/bin/env bash
# The GPU proof run: ember's CUDA paths on a real device, with logs and figures.
#
#   bash benchmarks/gpu_proof.sh OUTDIR STAGE...
#
# Stages: env, tests (the LLM suite with the model on cuda, then every gpu-marked test), offline
# (offline_llm on the Llama-3-8B shape; OFFLINE_ARGS adds arguments), quant, serving, two_models, video.
# Each stage runs under its own time limit (STAGE_LIMIT_<stage> seconds) and logs to OUTDIR/<stage>.log;
# the result files this run wrote are copied there too (PACK=1 also packs it all into gpu_proof.tgz).
# Wheels the host lacks can sit in WHEELS_DIR (default .whl): they are installed to a private target.
set -u
out=$(realpath -m "${1:?OUTDIR}"); shift
mkdir -p "$out"
cd "$(dirname "$0")/.."
wheels=${WHEELS_DIR:-.whl}
if ls "$wheels"/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$wheels"/*.whl > "$out/pip.log" 2>&1 || { echo "wheel install failed"; tail "$out/pip.log"; }
  export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
start_marker=$(mktemp); touch "$start_marker"

run_stage() {
  local name=$1 limit=$2; shift 2
  local started=$(date +%s)
  echo "=== $name (limit ${limit}s)"
  timeout --kill-after=10 "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  echo "=== $name rc=$rc in $(( $(date +%s) - started ))s"
  tail -n "${TAIL_LINES:-6}" "$out/$name.log"
}

for stage in "$@"; do
  case $stage in
    env) run_stage env 60 bash -c 'nvidia-smi; python3 -c "import torch, triton, transformers; \
print(torch.__version__, torch.version.cuda, triton.__version__, transformers.__version__, \
torch.cuda.get_device_name())"; python3 -c "import engine.llm.engine, server.app; print(\"imports ok\")"' ;;
    tests)
      run_stage tests_llm_cuda "${STAGE_LIMIT_tests:-360}" env EMBER_TEST_DEVICE=cuda python3 -m pytest -q -rfE \
        -p no:cacheprovider --timeout 120 tests/test_llm_engine.py tests/test_llm_greedy.py \
        tests/test_llm_async_scheduling.py tests/test_llm_attention.py tests/test_llm_sampler.py tests/test_llm_scheduler.py tests/test_llm_detokenizer.py
      run_stage tests_gpu_marked "${STAGE_LIMIT_gpu:-200}" python3 -m pytest -q -rfE -p no:cacheprovider \
        --timeout 150 -m gpu tests/test_llm_triton_attention.py tests/test_fleet.py tests/test_video_gpu.py
      run_stage tests_greedy_bf16 "${STAGE_LIMIT_bf16:-120}" env EMBER_TEST_DEVICE=cuda EMBER_TEST_DTYPE=bfloat16 \
        python3 -m pytest -q -rfE -p no:cacheprovider --timeout 100 tests/test_llm_greedy.py ;;
    offline) run_stage offline "${STAGE_LIMIT_offline:-400}" python3 -m benchmarks.offline_llm --device cuda \
        ${OFFLINE_ARGS:-} ;;
    quant) run_stage quant "${STAGE_LIMIT_quant:-300}" python3 -m benchmarks.quantized ${QUANT_ARGS:-} ;;
    serving) run_stage serving "${STAGE_LIMIT_serving:-400}" python3 -m benchmarks.serving --device cuda \
        --systems ember ${SERVING_ARGS:-} ;;
    two_models) run_stage two_models "${STAGE_LIMIT_two_models:-300}" python3 -m benchmarks.two_models \
        ${TWO_MODELS_ARGS:-} ;;
    video) run_stage video "${STAGE_LIMIT_video:-400}" python3 -m benchmarks.video --device cuda ${VIDEO_ARGS:-} ;;
    *) echo "unknown stage $stage" ;;
  esac
done
find benchmarks/results -newer "$start_marker" -type f -print0 | xargs -0 -r cp -t "$out"
if [ -n "${PACK:-}" ]; then (cd "$out" && tar czf gpu_proof.tgz --exclude gpu_proof.tgz ./*.log $(ls *.json *.png 2>/dev/null)); fi

#!/usr/bin/env bash
# The GPU figures of issues 11 and 18 in one go, on a machine whose Python has torch and transformers
# (Ray and the rest come from .whl/, built by ../shared/tools/device-wheels.sh) and whose
# RAYMED_CACHE holds the corpus and tokenizers (no model weights: the models are built from
# configs). Each part writes its JSON to $OUT (default ./gpu-results) as soon as it ends, and a
# part that fails or runs past its time does not stop the next.
#     OUT=/tmp/gpu RAYMED_CACHE=... SMOLLM2_TOKENIZER=DIR bash bench/gpu_suite.sh [quick]
set -uo pipefail
OUT="${OUT:-gpu-results}"; mkdir -p "$OUT"
QUICK="${1:-}"
TOK="${SMOLLM2_TOKENIZER:-smollm2-135m-instruct}"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false RAY_DEDUP_LOGS=0
BUDGET="${BUDGET:-540}"  # seconds for the whole suite; each part gets at most what is left
if [[ -n "$QUICK" ]]; then   # a CPU dry run of every part, tiny sizes
  TRAIN=(--steps 3 --set train.use_gpu=false --set train.bf16=false --set train.compile=false
         --set data.block_size=128 --set train.micro_batch_size=2)
  SERVE=(--set serve.num_gpus=0 --set serve.num_cpus=1 --set serve.max_batch_size=8)
  GPT2=(--set "model.architecture={model_type: gpt2, n_layer: 2, n_head: 2, n_embd: 64, n_positions: 1024}")
  SMOL=(--set "model.architecture={model_type: llama, num_hidden_layers: 2, hidden_size: 64, intermediate_size: 128, num_attention_heads: 2, num_key_value_heads: 1, tie_word_embeddings: true}")
  LEVELS=(1 4); STREAM_LEVELS=(4); ROUNDS=1; TOKENS=8; BATCHES=(1 4); BUDGET=900
else
  GPT2=(); SMOL=(); TRAIN=(--steps 30); SERVE=(--set serve.num_gpus=1 --set serve.num_cpus=4 --set serve.max_batch_size=128)
  LEVELS=(1 8 32 64 128); STREAM_LEVELS=(8 64 128); ROUNDS=2; TOKENS=128; BATCHES=(1 8 32 64 128)
fi
part() {  # part NAME LIMIT CMD...: stdout (the JSON) to NAME.json, stderr's end to logs.txt
  local name="$1" limit="$2"; shift 2
  local left=$((BUDGET - SECONDS - 5))
  (( left < limit )) && limit=$left
  (( limit < 20 )) && { echo "== $name skipped: out of time"; return; }
  echo "== $name ($(date +%T), up to $limit s)"
  timeout "$limit" "$@" > "$OUT/$name.json" 2> "/tmp/$name.log"
  echo "   exit $? after $SECONDS s"
  { echo "==== $name"; tail -c 20000 "/tmp/$name.log"; } >> "$OUT/logs.txt"
  grep -E "Error|Traceback" "/tmp/$name.log" | tail -3
  tail -c 3000 "$OUT/$name.json"
}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
  python3 -c "import torch, transformers, ray; print('torch', torch.__version__, 'transformers', transformers.__version__, 'ray', ray.__version__)"
} > "$OUT/env.txt" 2>&1; cat "$OUT/env.txt"

MODEL_DIR="$(mktemp -d)/smollm2-random"
python3 bench/random_model.py --config smollm2-pretrain --set model.tokenizer="$TOK" "${SMOL[@]}" "$MODEL_DIR" || exit 1
part decode_step 90 python3 bench/decode_step.py "$MODEL_DIR" --batch "${BATCHES[@]}"

python3 -m raymed serve --set serve.model="$MODEL_DIR" "${SERVE[@]}" --set serve.max_ongoing_requests=256 \
  --set serve.max_queued_requests=1024 --set serve.target_ongoing_requests=256 \
  --set serve.request_timeout_s=600 --set serve.default_max_tokens="$TOKENS" > "$OUT/serve.log" 2>&1 &
SERVER=$!
python3 - <<'PY'
import time, urllib.request
for _ in range(240):
    try:
        urllib.request.urlopen("http://127.0.0.1:8000/health", timeout=2); break
    except OSError:
        time.sleep(0.5)
PY
# prompts of about 64-1,024 tokens (4 characters each); half the requests sampled, half greedy
LOAD=(--rounds "$ROUNDS" --max-tokens "$TOKENS" --prompt-chars 256 4096 --sampled-share 0.5)
part serve_nostream 120 python3 bench/serve_load.py "${LOAD[@]}" --concurrency "${LEVELS[@]}" --no-stream \
  --baseline-model "$MODEL_DIR" --baseline-requests 64 --baseline-batch 64
part serve_stream 90 python3 bench/serve_load.py "${LOAD[@]}" --concurrency "${STREAM_LEVELS[@]}"
kill -TERM $SERVER; wait $SERVER  # TERM: a script's background job ignores SIGINT

part train_smollm2 150 python3 bench/train_throughput.py --config smollm2-pretrain \
  --set model.tokenizer="$TOK" "${TRAIN[@]}" "${SMOL[@]}"
part train_gpt2 150 python3 bench/train_throughput.py --config gpt2-pretrain "${TRAIN[@]}" "${GPT2[@]}" \
  --profile "$OUT/train_gpt2_profile.txt"
echo "== done after $SECONDS s"

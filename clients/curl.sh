#!/usr/bin/env bash
# llmserve's OpenAI-compatible API with nothing but curl: list the models, a chat completion, a
# streamed chat completion (-N: print each SSE event as it arrives), a plain completion.
#
#   LLMSERVE_BASE_URL=http://127.0.0.1:8000/v1 LLMSERVE_API_KEY=... bash clients/curl.sh
set -euo pipefail

base_url="${LLMSERVE_BASE_URL:-http://127.0.0.1:8000/v1}"
api_key="${LLMSERVE_API_KEY:-${OPENAI_API_KEY:-}}"
max_tokens="${LLMSERVE_MAX_TOKENS:-64}"
# Send the key only when there is one; a server started without --api-key needs none.
auth=()
if [[ -n "$api_key" ]]; then
  auth=(-H "Authorization: Bearer $api_key")
fi

echo "== GET /models"
models=$(curl -sS --fail-with-body "${auth[@]}" "$base_url/models")
echo "$models"
# The first model id, without needing jq.
model="${LLMSERVE_MODEL:-$(grep -o '"id": *"[^"]*"' <<<"$models" | head -n 1 | sed 's/.*"\([^"]*\)"$/\1/')}"
echo "model: $model"

echo "== POST /chat/completions"
curl -sS --fail-with-body "${auth[@]}" "$base_url/chat/completions" -H 'Content-Type: application/json' \
  -d "{\"model\": \"$model\", \"max_tokens\": $max_tokens, \"temperature\": 0,
       \"messages\": [{\"role\": \"user\", \"content\": \"Name three primary colours.\"}]}"
echo

echo "== POST /chat/completions, streamed"
curl -sS -N --fail-with-body "${auth[@]}" "$base_url/chat/completions" -H 'Content-Type: application/json' \
  -d "{\"model\": \"$model\", \"max_tokens\": $max_tokens, \"stream\": true,
       \"stream_options\": {\"include_usage\": true},
       \"messages\": [{\"role\": \"user\", \"content\": \"Write a haiku about the sea.\"}]}"

echo "== POST /completions"
curl -sS --fail-with-body "${auth[@]}" "$base_url/completions" -H 'Content-Type: application/json' \
  -d "{\"model\": \"$model\", \"prompt\": \"The capital of France is\", \"max_tokens\": $max_tokens,
       \"temperature\": 0}"
echo

"""`llmserve`: the command line.

    llmserve serve [MODEL] [--config FILE] [--host H] [--port P] [--api-key KEY] ...
    llmserve chat [--url URL] [--api-key KEY] [--model ID] [--system TEXT] ...

Every field of the config dataclasses is a flag (`max_num_seqs` -> `--max-num-seqs`); a flag wins
over the `--config` file, which wins over the defaults.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from llmserve import chat_client
from llmserve.config import add_config_args, config_from_args

# What each config field does, for --help (the dataclasses' comments, in words a user reads).
_FLAG_HELP = {
    "model.dtype": "weights and activations dtype: auto (float32 on CPU, bfloat16 on CUDA), float32, "
    "bfloat16, float16 (bfloat16 on a CPU needs AVX-512 or AMX to be fast: AVX2-only CPUs emulate it)",
    "model.device": "auto (cuda when available), cpu or cuda",
    "model.max_model_len": "context window in tokens (prompt + completion); None: the model's own",
    "model.seed": "seed for requests that give none, so a server run is reproducible end to end",
    "model.attention_backend": "auto (on CUDA the Triton kernels if triton is installed, else torch; on CPU "
    "the C++ decode and prefill kernels, compiled on first use, else torch), torch (the reference), cpp "
    "(CPU), or triton (CUDA; on CPU only with TRITON_INTERPRET=1, Triton's slow interpreter, for tests)",
    "model.num_threads": "torch intra-op threads; None: torch's choice",
    "model.quantization": "quantize the linear layers' weights at load: int8 (CPU, float32 or bfloat16: "
    "per-row int8 weights and LM head, a C++ kernel for decode steps), int4 (CPU: 4-bit groups of 32 as in "
    "GGUF Q4_1, lossless on the built-in model, int8 LM head, a C++ VNNI kernel for decode steps), w8a8 "
    "(CPU with AMX-INT8 or AVX-512 VNNI, bfloat16: int8 weights and LM head, activations quantized to int8 per token, "
    "~2x bf16 on large batches at some quality cost) or, with bitsandbytes, bnb-8bit "
    "(LLM.int8()) or bnb-4bit (NF4); None: no quantization",
    "model.enforce_eager": "run every step eagerly; without it, pure-decode steps on CUDA replay CUDA "
    "graphs captured at start-up (on CPU every step is eager anyway)",
    "model.cuda_graph_max_batch": "largest decode batch captured as a CUDA graph (larger steps run "
    "eagerly); None: --max-num-seqs",
    "cache.block_size": "tokens per KV cache block (a power of two)",
    "cache.kv_cache_memory_gb": "memory budget of the KV cache pool, in GB",
    "cache.num_blocks": "number of KV blocks, overriding --kv-cache-memory-gb",
    "cache.enable_prefix_caching": "reuse the KV blocks of identical prompt prefixes",
    "cache.kv_cache_dtype": "auto (the model's dtype) or int8 (CPU with the C++ or torch attention: each "
    "token's K and V rows per head as int8 codes and one float32 scale, about half the bytes of bfloat16: "
    "~1.9x the tokens in the same memory, at some quality cost)",
    "scheduler.max_num_seqs": "sequences that run at once",
    "scheduler.max_num_batched_tokens": "token budget of one step (decodes first, then prefill chunks)",
    "server.host": "address to listen on",
    "server.port": "port to listen on",
    "server.api_key": "require 'Authorization: Bearer KEY' on /v1/*; also read from $LLMSERVE_API_KEY",
    "server.served_model_name": "the model id clients send and /v1/models lists; None: the model's name",
    "server.allowed_origins": "origins allowed by CORS (e.g. http://localhost:3000, or *); none: CORS off",
    "server.max_request_body_bytes": "larger request bodies get 413",
    "server.max_waiting_requests": "when more requests than this wait for the engine, new ones get 429 "
    "with Retry-After",
    "server.shutdown_grace_s": "on SIGTERM, seconds in-flight requests get to finish before being aborted",
    "server.health_stall_s": "/health is 503 when the engine loop has made no progress for this long",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmserve", description="LLM text-generation server.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_serve(commands)
    chat_client.add_parser(commands)
    return parser


def _add_serve(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    serve = commands.add_parser(
        "serve",
        help="run the OpenAI-compatible HTTP server",
        description="Run the OpenAI-compatible HTTP server: /v1/chat/completions, /v1/completions, "
        "/v1/models, /health, /metrics.",
    )
    serve.add_argument(
        "model",
        nargs="?",
        metavar="MODEL",
        default=None,
        help="a .gguf file, a folder with config.json and safetensors, or a Hugging Face id "
        "already in the local cache; default: the built-in SmolLM2-135M-Instruct",
    )
    serve.add_argument("--config", metavar="FILE", help="TOML config file; flags override its values")
    serve.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="log verbosity (default: info)",
    )
    add_config_args(serve)
    for action in serve._actions:
        if action.dest in _FLAG_HELP:
            action.help = f"{_FLAG_HELP[action.dest]} {action.help or ''}".strip()
            if action.nargs != 0:  # not a --x/--no-x switch: show VALUE rather than SECTION.VALUE
                action.metavar = action.dest.split(".", 1)[1].upper()
    serve.set_defaults(run=_serve)


def _serve(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if getattr(args, "server.api_key") is None and os.environ.get("LLMSERVE_API_KEY"):
        setattr(args, "server.api_key", os.environ["LLMSERVE_API_KEY"])
    try:
        config = config_from_args(args)
    except (ValueError, OSError) as e:
        parser.error(str(e))
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from llmserve.server.launch import serve

    return serve(config, log_level=args.log_level)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return int(args.run(args, parser))


if __name__ == "__main__":
    sys.exit(main())

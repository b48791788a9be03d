"""Request bodies of `/v1/chat/completions` and `/v1/completions` -> validated requests.

Policy: every field is either honoured or rejected with a 400 that names it. The only fields that
are read and then ignored are the ones in `_read_ignorable`, each of which cannot change what
the model generates or what the response contains (see the README section for the list and why).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llmserve.sampling_params import MAX_LOGPROBS, SamplingParams
from llmserve.server.errors import bad_request
from llmserve.server.fields import Body, check_int

MAX_CHOICES = 128  # OpenAI's cap on n; also bounds n x len(prompt) for completions
_SEED_RANGE = (-(2**63), 2**63 - 1)
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}

# Known OpenAI fields this server cannot honour: a 400 that says so beats "unrecognized".
_UNSUPPORTED = {
    "audio": "audio output is not available",
    "prediction": "predicted outputs are not available",
    "reasoning_effort": "the served model is not a reasoning model",
    "verbosity": "the served model has no verbosity control",
    "web_search_options": "web search is not available",
    "suffix": "insertion (suffix) is not available",
    "best_of": "best_of other than n is not available",
    "guided_json": "structured output is not available",
    "guided_regex": "structured output is not available",
    "guided_choice": "structured output is not available",
}


@dataclass
class StreamOptions:
    stream: bool = False
    include_usage: bool = False


@dataclass
class ChatRequest:
    model: str
    messages: list[dict[str, str]]
    params: SamplingParams
    stream: StreamOptions
    logprobs: bool  # chat-format logprobs for the generated tokens


@dataclass
class Prompt:
    text: str | None = None  # None when given as token ids
    token_ids: list[int] | None = None  # None until tokenized


@dataclass
class CompletionRequest:
    model: str
    prompts: list[Prompt]
    params: SamplingParams
    stream: StreamOptions
    echo: bool
    logprobs: int | None  # completions-format logprobs; with echo also for the prompt


# ---- chat ----------------------------------------------------------------------------------


def parse_chat_request(data: Any, vocab_size: int) -> ChatRequest:
    body = _body(data)
    model = _model(body)
    messages = parse_messages(body.raw("messages"))
    logprobs = body.bool_("logprobs", False)
    top_logprobs = body.int_("top_logprobs", None, low=0, high=MAX_LOGPROBS)
    if top_logprobs is not None and not logprobs:
        raise bad_request("'top_logprobs' requires 'logprobs' to be true", param="top_logprobs")
    max_tokens = _max_tokens(body, default=None, names=("max_completion_tokens", "max_tokens"))
    params = _sampling_params(
        body, vocab_size, max_tokens, logprobs=(top_logprobs or 0) if logprobs else None
    )
    stream = _stream_options(body)
    _read_ignorable(body)
    _read_chat_only_defaults(body)
    body.reject_unknown(_UNSUPPORTED)
    return ChatRequest(model, messages, params, stream, logprobs)


def parse_messages(value: Any) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise bad_request("'messages' must be a non-empty array of messages", param="messages")
    return [_message(i, m) for i, m in enumerate(value)]


def _message(i: int, message: Any) -> dict[str, str]:
    where = f"messages[{i}]"
    if not isinstance(message, dict):
        raise bad_request(f"'{where}' must be an object", param=where)
    role = message.get("role")
    if role not in _ROLES:
        raise bad_request(
            f"'{where}.role' must be one of {sorted(_ROLES)}, got {role!r}", param=f"{where}.role"
        )
    for key, value in message.items():
        # A message echoed back from a response carries these as null/empty; real values need tools.
        if key in ("role", "content") or (
            key in ("refusal", "tool_calls", "function_call", "audio", "annotations") and not value
        ):
            continue
        raise bad_request(f"'{where}.{key}' is not supported", param=f"{where}.{key}")
    return {"role": _ROLES[role], "content": _content(where, message.get("content"))}


def _content(where: str, content: Any) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad_request(
            f"'{where}.content' must be a string or an array of text parts", param=f"{where}.content"
        )
    texts = []
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        if not isinstance(part, dict) or part.get("type") != "text":
            kind = part.get("type") if isinstance(part, dict) else None
            raise bad_request(
                f"'{at}.type' must be 'text' (only text parts are supported), got {kind!r}",
                param=f"{at}.type",
            )
        if not isinstance(part.get("text"), str) or set(part) - {"type", "text"}:
            raise bad_request(f'\'{at}\' must be {{"type": "text", "text": <string>}}', param=at)
        texts.append(part["text"])
    # Parts join with a newline, as vLLM does for text-only templates.
    return "\n".join(texts)


def _read_chat_only_defaults(body: Body) -> None:
    """Chat fields whose default value is the only one we honour; anything else is a 400."""
    tools = body.raw("tools")
    if tools not in (None, []):
        raise bad_request("'tools' is not supported: the server has no tool calling", param="tools")
    if body.raw("functions") not in (None, []):
        raise bad_request("'functions' is not supported: the server has no tool calling", param="functions")
    for name in ("tool_choice", "function_call"):
        if body.raw(name) not in (None, "none", "auto"):
            raise bad_request(f"'{name}' is not supported: the server has no tool calling", param=name)
    body.bool_("parallel_tool_calls", False)  # meaningless without tools
    fmt = body.object_("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        raise bad_request(
            '\'response_format\' is not supported except {"type": "text"}', param="response_format"
        )
    modalities = body.raw("modalities")
    if modalities not in (None, ["text"]):
        raise bad_request("'modalities' must be [\"text\"]", param="modalities")


# ---- completions ---------------------------------------------------------------------------


def parse_completion_request(data: Any, vocab_size: int) -> CompletionRequest:
    body = _body(data)
    model = _model(body)
    prompts = parse_prompt(body.raw("prompt"), vocab_size)
    echo = body.bool_("echo", False)
    logprobs = body.int_("logprobs", None, low=0, high=MAX_LOGPROBS)
    max_tokens = _max_tokens(body, default=16, names=("max_tokens",))  # OpenAI's default for completions
    params = _sampling_params(body, vocab_size, max_tokens, logprobs=logprobs)
    if echo and logprobs is not None:
        params.prompt_logprobs = logprobs
    if len(prompts) * params.n > MAX_CHOICES:
        raise bad_request(
            f"len(prompt) x n must be <= {MAX_CHOICES}, got {len(prompts) * params.n}", param="n"
        )
    if body.raw("suffix") not in (None, ""):
        raise bad_request("'suffix' is not supported: insertion is not available", param="suffix")
    best_of = body.raw("best_of")
    if best_of is not None and check_int("best_of", best_of) != params.n:
        raise bad_request("'best_of' is only supported equal to n", param="best_of")
    stream = _stream_options(body)
    _read_ignorable(body)
    body.reject_unknown(_UNSUPPORTED)
    return CompletionRequest(model, prompts, params, stream, echo, logprobs)


def parse_prompt(value: Any, vocab_size: int) -> list[Prompt]:
    """A string, a list of strings, a list of token ids, or a list of lists of token ids."""
    if isinstance(value, str):
        return [_text_prompt(value, "prompt")]
    if not isinstance(value, list) or not value:
        raise bad_request(
            "'prompt' must be a string, an array of strings, or token id array(s)", param="prompt"
        )
    if all(isinstance(p, str) for p in value):
        return [_text_prompt(p, f"prompt[{i}]") for i, p in enumerate(value)]
    if all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        return [Prompt(token_ids=_token_ids(value, "prompt", vocab_size))]
    if all(isinstance(p, list) for p in value):
        return [Prompt(token_ids=_token_ids(p, f"prompt[{i}]", vocab_size)) for i, p in enumerate(value)]
    raise bad_request("'prompt' must not mix strings, token ids and arrays", param="prompt")


def _text_prompt(text: str, where: str) -> Prompt:
    if not text:
        raise bad_request(f"'{where}' must not be empty", param="prompt")
    return Prompt(text=text)


def _token_ids(ids: list[Any], where: str, vocab_size: int) -> list[int]:
    if not ids:
        raise bad_request(f"'{where}' must not be empty", param="prompt")
    for t in ids:
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size:
            raise bad_request(f"'{where}' holds {t!r}, not a token id in [0, {vocab_size})", param="prompt")
    return list(ids)


# ---- shared --------------------------------------------------------------------------------


def _body(data: Any) -> Body:
    if not isinstance(data, dict):
        raise bad_request("the request body must be a JSON object")
    return Body(data)


def _model(body: Body) -> str:
    model = body.raw("model")
    if not isinstance(model, str) or not model:
        raise bad_request("'model' is required and must be a string", param="model")
    return model


def _max_tokens(body: Body, default: int | None, names: tuple[str, ...]) -> int | None:
    """`max_completion_tokens` is the newer name of `max_tokens`; two different values are a 400."""
    given = {name: body.int_(name, None, low=1) for name in names}
    values = {v for v in given.values() if v is not None}
    if len(values) > 1:
        raise bad_request("'max_tokens' and 'max_completion_tokens' disagree; give one", param="max_tokens")
    return values.pop() if values else default


def _sampling_params(
    body: Body, vocab_size: int, max_tokens: int | None, logprobs: int | None
) -> SamplingParams:
    n = body.int_("n", 1, low=1, high=MAX_CHOICES)
    assert n is not None
    kwargs: dict[str, Any] = {
        "n": n,
        "max_tokens": max_tokens,
        "logprobs": logprobs,
        "temperature": body.number("temperature", 1.0, low=0.0, high=2.0),
        "top_p": body.number("top_p", 1.0, low=0.0, high=1.0),
        "presence_penalty": body.number("presence_penalty", 0.0, low=-2.0, high=2.0),
        "frequency_penalty": body.number("frequency_penalty", 0.0, low=-2.0, high=2.0),
        "seed": body.int_("seed", None, low=_SEED_RANGE[0], high=_SEED_RANGE[1]),
        "stop": _stop(body.raw("stop")),
        "logit_bias": _logit_bias(body.object_("logit_bias"), vocab_size),
        # vLLM's extras, passed by OpenAI SDKs through `extra_body`
        "top_k": body.int_("top_k", 0, low=-1),
        "min_p": body.number("min_p", 0.0, low=0.0, high=1.0),
        "repetition_penalty": body.number("repetition_penalty", 1.0, low=0.0),
        "ignore_eos": body.bool_("ignore_eos", False),
        "min_tokens": body.int_("min_tokens", 0, low=0),
        "stop_token_ids": _stop_token_ids(body.raw("stop_token_ids"), vocab_size),
        "include_stop_str_in_output": body.bool_("include_stop_str_in_output", False),
        "skip_special_tokens": body.bool_("skip_special_tokens", True),
    }
    if kwargs["top_p"] == 0.0:
        raise bad_request("'top_p' must be > 0; use temperature 0 for greedy decoding", param="top_p")
    if kwargs["repetition_penalty"] == 0.0:
        raise bad_request("'repetition_penalty' must be > 0", param="repetition_penalty")
    if max_tokens is not None and kwargs["min_tokens"] > max_tokens:
        raise bad_request(
            f"'min_tokens' ({kwargs['min_tokens']}) must be <= max_tokens ({max_tokens})", param="min_tokens"
        )
    try:
        return SamplingParams(**kwargs)
    except ValueError as e:  # a backstop: the checks above should have caught it with a better param
        name = str(e).split(" ", 1)[0]
        raise bad_request(str(e), param=name if name in kwargs else None) from e


def _stop(value: Any) -> list[str]:
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise bad_request("'stop' must be a non-empty string or an array of non-empty strings", param="stop")
    return stops


def _stop_token_ids(value: Any, vocab_size: int) -> list[int]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise bad_request("'stop_token_ids' must be an array of token ids", param="stop_token_ids")
    return [check_int("stop_token_ids", t, low=0, high=vocab_size - 1) for t in value]


def _logit_bias(value: dict[str, Any] | None, vocab_size: int) -> dict[int, float]:
    bias: dict[int, float] = {}
    for key, v in (value or {}).items():
        try:
            token_id = int(key)
        except ValueError:
            token_id = -1
        if not 0 <= token_id < vocab_size:
            raise bad_request(
                f"'logit_bias' keys must be token ids in [0, {vocab_size}), got {key!r}", param="logit_bias"
            )
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not -100 <= v <= 100:
            raise bad_request(
                f"'logit_bias' values must be numbers in [-100, 100], got {v!r} for {key}", param="logit_bias"
            )
        bias[token_id] = float(v)
    return bias


def _stream_options(body: Body) -> StreamOptions:
    stream = body.bool_("stream", False)
    options = body.object_("stream_options")
    if options is None:
        return StreamOptions(stream=stream)
    if not stream:
        raise bad_request("'stream_options' is only allowed when 'stream' is true", param="stream_options")
    for key, value in options.items():
        # include_obfuscation only pads chunks against a side channel; the content is the same.
        if key not in ("include_usage", "include_obfuscation"):
            raise bad_request(f"Unrecognized stream option: {key}", param=f"stream_options.{key}")
        if not isinstance(value, bool):
            raise bad_request(f"'stream_options.{key}' must be a boolean", param=f"stream_options.{key}")
    return StreamOptions(stream=True, include_usage=bool(options.get("include_usage", False)))


def _read_ignorable(body: Body) -> None:
    """Fields that cannot change the output: identifiers and bookkeeping for OpenAI's own services."""
    for name in ("user", "safety_identifier", "prompt_cache_key"):
        body.str_(name, None)
    if body.bool_("store", False):
        raise bad_request("'store' is not supported: this server keeps no completions", param="store")
    body.object_("metadata")
    tier = body.str_("service_tier", None)
    if tier not in (None, "auto", "default"):
        raise bad_request("'service_tier' must be 'auto' or 'default'", param="service_tier")

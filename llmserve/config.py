"""Typed configuration. Each dataclass is one table of a `configs/*.toml` file and one group of
CLI flags: field `max_num_seqs` of `SchedulerConfig` is `[scheduler] max_num_seqs` in a file and
`--max-num-seqs` on the command line. Values are checked in `__post_init__`."""

from __future__ import annotations

import argparse
import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")
ATTENTION_BACKENDS = ("auto", "torch", "cpp", "triton")
KV_CACHE_DTYPES = ("auto", "int8")  # auto: the model's dtype
QUANTIZATIONS = ("bnb-8bit", "bnb-4bit", "int8", "int4", "w8a8")  # each a quantizer registered in llmserve/quantization.py


@dataclass
class ModelConfig:
    model: str | None = None  # None: the built-in SmolLM2-135M-Instruct (Q4_1 GGUF)
    dtype: str = "auto"  # auto: float32 on CPU, bfloat16 on CUDA
    device: str = "auto"  # auto: cuda when available, else cpu
    max_model_len: int | None = None  # None: the model's own context length
    seed: int = 0  # seeds unseeded sampling, so a server run is reproducible end to end
    attention_backend: str = "auto"  # auto: Triton on CUDA, the C++ attention kernels on CPU; else torch
    num_threads: int | None = None  # torch intra-op threads; None: torch's default
    quantization: str | None = None  # None: weights stay in dtype; else one of QUANTIZATIONS
    enforce_eager: bool = False  # True: no CUDA graphs, every step eager (CPU steps always are)
    cuda_graph_max_batch: int | None = None  # largest decode batch run as a CUDA graph; None: max_num_seqs

    def __post_init__(self) -> None:
        _choice("dtype", self.dtype, DTYPES)
        _choice("device", self.device, DEVICES)
        _choice("attention_backend", self.attention_backend, ATTENTION_BACKENDS)
        if self.quantization is not None:
            _choice("quantization", self.quantization, QUANTIZATIONS)
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {self.num_threads}")
        if not isinstance(self.enforce_eager, bool):  # a TOML string "false" would read as true
            raise ValueError(f"enforce_eager must be true or false, got {self.enforce_eager!r}")
        if self.cuda_graph_max_batch is not None and self.cuda_graph_max_batch < 1:
            raise ValueError(f"cuda_graph_max_batch must be >= 1, got {self.cuda_graph_max_batch}")


@dataclass
class CacheConfig:
    block_size: int = 16  # tokens per KV block
    kv_cache_memory_gb: float = 1.0  # budget for the KV pool; sets the number of blocks
    num_blocks: int | None = None  # overrides the budget (tests use it to force preemption)
    enable_prefix_caching: bool = True
    kv_cache_dtype: str = "auto"  # auto: the model dtype; int8: codes + a scale per token and head (CPU)

    def __post_init__(self) -> None:
        _choice("kv_cache_dtype", self.kv_cache_dtype, KV_CACHE_DTYPES)
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two >= 1, got {self.block_size}")
        if self.kv_cache_memory_gb <= 0:
            raise ValueError(f"kv_cache_memory_gb must be > 0, got {self.kv_cache_memory_gb}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {self.num_blocks}")


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 64  # sequences running at once
    max_num_batched_tokens: int = 512  # token budget of one step: decodes first, then prefill chunks

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= "
                f"max_num_seqs ({self.max_num_seqs}) so every running sequence can decode each step"
            )


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None  # when set, requests need `Authorization: Bearer <key>`
    served_model_name: str | None = None  # the id in /v1/models; default derived from the model
    allowed_origins: list[str] = field(default_factory=list)  # CORS; empty: CORS off
    max_request_body_bytes: int = 4 * 1024 * 1024  # larger bodies get 413
    max_waiting_requests: int = 256  # more waiting than this: 429 with Retry-After
    shutdown_grace_s: float = 30.0  # SIGTERM: in-flight streams get this long to finish
    health_stall_s: float = 30.0  # /health is 503 if the engine made no progress for this long while busy

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.max_request_body_bytes < 1:
            raise ValueError(f"max_request_body_bytes must be >= 1, got {self.max_request_body_bytes}")
        if self.max_waiting_requests < 0:
            raise ValueError(f"max_waiting_requests must be >= 0, got {self.max_waiting_requests}")
        if self.shutdown_grace_s < 0:
            raise ValueError(f"shutdown_grace_s must be >= 0, got {self.shutdown_grace_s}")
        if self.health_stall_s <= 0:
            raise ValueError(f"health_stall_s must be > 0, got {self.health_stall_s}")


@dataclass
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    server: ServerConfig = field(default_factory=ServerConfig)

    @classmethod
    def from_file(cls, path: str | Path) -> EngineConfig:
        with open(path, "rb") as f:
            data = tomllib.load(f)
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> EngineConfig:
        sections = {f.name: f.type for f in dataclasses.fields(cls)}
        unknown = set(data) - set(sections)
        if unknown:
            raise ValueError(f"{source}: unknown section(s) {sorted(unknown)}; expected {sorted(sections)}")
        parts = {}
        for f in dataclasses.fields(cls):
            section_cls = _SECTIONS[f.name]
            values = data.get(f.name, {})
            names = {sf.name for sf in dataclasses.fields(section_cls)}
            bad = set(values) - names
            if bad:
                raise ValueError(f"{source}: unknown key(s) {sorted(bad)} in [{f.name}]; expected {sorted(names)}")
            parts[f.name] = section_cls(**values)
        return cls(**parts)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "cache": CacheConfig,
    "scheduler": SchedulerConfig,
    "server": ServerConfig,
}


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


# ---- CLI mapping: one flag per field --------------------------------------------------------


def add_config_args(parser: argparse.ArgumentParser, sections: tuple[str, ...] = tuple(_SECTIONS)) -> None:
    """Add `--field-name` for every field of the given sections. Defaults stay None so that
    a flag only overrides the config file when it was given."""
    for section in sections:
        cls = _SECTIONS[section]
        group = parser.add_argument_group(f"[{section}] ({cls.__name__})")
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if section == "model" and f.name == "model":
                continue  # the positional MODEL argument
            flag = "--" + f.name.replace("_", "-")
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            help_text = f"(default: {default!r})"
            kind = _base_type(hints[f.name])
            dest = f"{section}.{f.name}"
            if kind is bool:
                group.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=None,
                                   help=help_text)
            elif kind is list:
                group.add_argument(flag, dest=dest, nargs="*", default=None, help=help_text)
            else:
                group.add_argument(flag, dest=dest, type=kind, default=None, help=help_text)


def config_from_args(args: argparse.Namespace) -> EngineConfig:
    """File values first (`--config`), then every flag that was given on top."""
    config_path = getattr(args, "config", None)
    data: dict[str, dict[str, Any]] = {}
    if config_path:
        with open(config_path, "rb") as f:
            data = tomllib.load(f)
    for key, value in vars(args).items():
        if "." not in key or value is None:
            continue
        section, name = key.split(".", 1)
        data.setdefault(section, {})[name] = value
    model = getattr(args, "model", None)
    if model is not None:
        data.setdefault("model", {})["model"] = model
    return EngineConfig.from_dict(data, source=config_path or "command line")


def _base_type(hint: Any) -> type:
    """`int | None` -> int, `list[str]` -> list."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return _base_type(args[0])
    if origin is list:
        return list
    return hint

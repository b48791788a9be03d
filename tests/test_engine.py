"""Engine behaviour on tiny random models: validation, abort, seeds, stops, logprobs, and parity
with transformers for each supported family."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from llmserve import LLM, SamplingParams
from llmserve.config import EngineConfig
from llmserve.engine import LLMEngine


@pytest.fixture()
def llm(tiny_path: Path) -> LLM:
    return LLM(str(tiny_path), dtype="float32", block_size=4, num_blocks=256)


def hf_greedy(path: Path, prompt_ids: list[int], max_new: int) -> list[int]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new, do_sample=False)
    return out[0, len(prompt_ids) :].tolist()


PROMPTS = [[5, 6, 7], list(range(100, 140)), [42] * 9, list(range(300, 317))]


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_greedy_matches_transformers_for_each_family(family: str, tiny_path: Path, tiny_qwen3_path: Path) -> None:
    path = tiny_path if family == "llama" else tiny_qwen3_path
    llm = LLM(str(path), dtype="float32", block_size=4, max_num_batched_tokens=16, max_num_seqs=4)
    results = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=12))
    for prompt, result in zip(PROMPTS, results, strict=True):
        assert result.token_ids == hf_greedy(path, prompt, 12)


def test_unsupported_architecture_is_named_with_the_supported_list(tmp_path: Path, tiny_path: Path) -> None:
    for f in tiny_path.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    config = json.loads((tmp_path / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"GPT2LMHeadModel.*LlamaForCausalLM"):
        LLM(str(tmp_path))


def test_prompt_longer_than_context_names_both_numbers(tiny_path: Path) -> None:
    llm = LLM(str(tiny_path), dtype="float32", max_model_len=64)
    with pytest.raises(ValueError, match=r"70 tokens.*64"):
        llm.generate([list(range(70))], SamplingParams(max_tokens=1))
    with pytest.raises(ValueError, match=r"max_tokens.*64.*60 prompt \+ 10 max_tokens"):
        llm.generate([list(range(60))], SamplingParams(max_tokens=10))


def test_logit_bias_outside_vocab_is_rejected(llm: LLM) -> None:
    with pytest.raises(ValueError, match="logit_bias"):
        llm.generate([[1, 2, 3]], SamplingParams(logit_bias={10**6: 1.0}))


def test_abort_frees_blocks_by_next_step(tiny_path: Path) -> None:
    engine = LLMEngine(EngineConfig.from_dict({"model": {"model": str(tiny_path)}, "cache": {"block_size": 4, "num_blocks": 64}}))
    engine.add_request("a", list(range(20)), SamplingParams(max_tokens=100, ignore_eos=True))
    engine.add_request("b", list(range(30, 40)), SamplingParams(max_tokens=100, ignore_eos=True))
    engine.step()
    engine.step()
    assert engine.block_manager.num_free_blocks < 64
    engine.abort("a")
    outputs = engine.step()
    aborted = [o for o in outputs if o.request_id == "a"]
    assert len(aborted) == 1 and aborted[0].finished and aborted[0].finish_reason == "abort"
    engine.abort("b")
    engine.step()
    assert engine.block_manager.num_free_blocks == 64
    assert not engine.has_unfinished_requests()


def test_seeded_sampling_is_reproducible_and_independent_of_neighbours(llm: LLM) -> None:
    seeded = SamplingParams(temperature=5.0, seed=1234, max_tokens=16, ignore_eos=True)
    alone = llm.generate([[5, 6, 7]], seeded)[0].token_ids
    others = [SamplingParams(temperature=1.0, max_tokens=n, ignore_eos=True) for n in (3, 20, 7)]
    crowd = llm.generate([list(range(50, 60)), [5, 6, 7], [9] * 30, [11, 12]], [others[0], seeded, others[1], others[2]])
    assert crowd[1].token_ids == alone
    different = llm.generate([[5, 6, 7]], SamplingParams(temperature=5.0, seed=99, max_tokens=16, ignore_eos=True))
    assert different[0].token_ids != alone


def test_stop_string_truncates_text_and_reports_it(llm: LLM) -> None:
    base = SamplingParams(temperature=5.0, seed=7, max_tokens=20, ignore_eos=True, skip_special_tokens=False)
    free = llm.generate([[5, 6, 7]], base)[0]
    stop = free.text[len(free.text) // 2 : len(free.text) // 2 + 3]
    assert len(stop) == 3
    cut = llm.generate([[5, 6, 7]], dataclasses.replace(base, stop=[stop]))[0]
    assert cut.text == free.text[: free.text.index(stop)]
    assert cut.outputs[0].finish_reason == "stop" and cut.outputs[0].stop_reason == stop


def test_stop_token_id_and_length_finish_reasons(llm: LLM) -> None:
    free = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))[0]
    assert free.outputs[0].finish_reason == "length" and len(free.token_ids) == 10
    stop_id = free.token_ids[3]
    first = free.token_ids.index(stop_id)
    cut = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[stop_id]))[0]
    assert cut.token_ids == free.token_ids[: first + 1]
    assert cut.outputs[0].finish_reason == "stop" and cut.outputs[0].stop_reason == stop_id


def test_logprobs_and_prompt_logprobs(llm: LLM) -> None:
    params = SamplingParams(temperature=0, max_tokens=5, logprobs=3, prompt_logprobs=2)
    [result] = llm.generate([[5, 6, 7, 8]], params)
    lps = result.outputs[0].logprobs
    assert lps is not None and len(lps) == 5
    for token_id, lp in zip(result.token_ids, lps, strict=True):
        assert lp.token_id == token_id and lp.rank == 1  # greedy picks the most likely token
        assert len(lp.top) == 3 and lp.top[0][0] == token_id and lp.logprob == pytest.approx(lp.top[0][1])
    assert result.prompt_logprobs is not None and len(result.prompt_logprobs) == 4
    assert result.prompt_logprobs[0] is None
    assert [p.token_id for p in result.prompt_logprobs[1:]] == [6, 7, 8]  # type: ignore[union-attr]


def test_config_file_presets_load_and_reject_unknown_keys(tmp_path: Path) -> None:
    presets = sorted(Path(__file__).parent.parent.joinpath("configs").glob("*.toml"))
    assert presets, "configs/ must hold at least one preset"
    for preset in presets:
        EngineConfig.from_file(preset)
    bad = tmp_path / "bad.toml"
    bad.write_text("[scheduler]\nmax_num_seq = 3\n")
    with pytest.raises(ValueError, match="max_num_seq"):
        EngineConfig.from_file(bad)

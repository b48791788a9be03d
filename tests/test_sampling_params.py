"""Invalid sampling parameters raise a ValueError that names the field."""

from __future__ import annotations

import pytest

from llmserve.sampling_params import SamplingParams


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", -0.1),
        ("temperature", float("nan")),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_k", -2),
        ("min_p", 1.5),
        ("max_tokens", 0),
        ("max_tokens", 2.5),
        ("n", 0),
        ("presence_penalty", 2.5),
        ("frequency_penalty", -3),
        ("repetition_penalty", 0),
        ("logprobs", 21),
        ("prompt_logprobs", -1),
        ("min_tokens", -1),
        ("seed", 2**64),
        ("seed", "7"),
    ],
)
def test_invalid_value_names_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})  # type: ignore[arg-type]


def test_min_tokens_above_max_tokens_is_rejected() -> None:
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(min_tokens=5, max_tokens=4)


def test_logit_bias_range_and_stop_normalisation() -> None:
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias={5: 101.0})
    params = SamplingParams(stop="###", top_k=-1, logit_bias={"3": 1})  # type: ignore[dict-item]
    assert params.stop == ["###"] and params.top_k == 0 and params.logit_bias == {3: 1.0}
    with pytest.raises(ValueError, match="stop"):
        SamplingParams(stop=[""])

"""decoding.validation.prepare at its edges: each limit accepted at it and refused one past it,
naming the field; a chat template's refusal and empty messages."""

from __future__ import annotations

import pytest

from decoding.errors import InvalidRequestError
from decoding.params import ChatMessage, GenerationRequest, SpeculationParams
from decoding.validation import MAX_STOP_TOKEN_IDS, MAX_TOP_LOGPROBS, Limits, prepare

LIMITS = Limits(vocab_size=400, context_window=256, max_speculative_tokens=8,
                default_max_new_tokens=8, max_new_tokens_limit=64, max_stop_strings=4,
                max_stop_string_length=10)


def req(**fields) -> GenerationRequest:
    fields.setdefault("prompt_token_ids", (1,))
    return GenerationRequest(request_id="r", **fields)


def refused(field: str, **fields) -> None:
    with pytest.raises(InvalidRequestError) as err:
        prepare(req(**fields), None, LIMITS)
    assert err.value.field == field


def test_gamma_may_equal_the_maximum() -> None:
    prepare(req(speculation=SpeculationParams(num_speculative_tokens=8)), None, LIMITS)
    refused("speculation.num_speculative_tokens",
            speculation=SpeculationParams(num_speculative_tokens=9))


def test_max_new_tokens_may_fill_exactly_the_room_left() -> None:
    ids = (1,) * 200  # room = 56
    assert prepare(req(prompt_token_ids=ids, max_new_tokens=56), None, LIMITS).max_new_tokens == 56
    refused("max_new_tokens", prompt_token_ids=ids, max_new_tokens=57)


def test_stop_string_length_limit_is_inclusive() -> None:
    prepare(req(stop=("x" * 10,)), None, LIMITS)
    refused("stop[0]", stop=("x" * 11,))


def test_truncate_prompt_tokens_keeps_the_last_ones() -> None:
    """In [1, context window - 1]; the prompt keeps its last that many tokens, and only the
    kept ones count against the context window."""
    ids = tuple(range(1, 301))  # longer than the context window (256)
    assert prepare(req(prompt_token_ids=ids, truncate_prompt_tokens=5), None,
                   LIMITS).prompt_ids == ids[-5:]
    assert prepare(req(prompt_token_ids=ids, truncate_prompt_tokens=255), None,
                   LIMITS).prompt_ids == ids[-255:]
    assert prepare(req(prompt_token_ids=(7, 8), truncate_prompt_tokens=5), None,
                   LIMITS).prompt_ids == (7, 8)
    assert prepare(req(prompt_token_ids=(7, 8), truncate_prompt_tokens=1), None,
                   LIMITS).prompt_ids == (8,)
    refused("truncate_prompt_tokens", prompt_token_ids=ids, truncate_prompt_tokens=256)
    refused("truncate_prompt_tokens", prompt_token_ids=ids, truncate_prompt_tokens=0)
    refused("prompt_token_ids", prompt_token_ids=ids)


@pytest.mark.parametrize("priority", [None, "1", True, 1.0, 2**31, -(2**31) - 1])
def test_a_priority_that_is_no_int32_is_refused(priority) -> None:
    """From Python any value can come (gRPC sends an int32): one that does not compare with
    the queue's integers broke every later request's admission. Refused as the request is
    made, before admission compares it."""
    with pytest.raises(InvalidRequestError) as err:
        req(priority=priority)
    assert err.value.field == "priority"


def test_priority_may_span_int32() -> None:
    prepare(req(priority=-(2**31)), None, LIMITS)
    prepare(req(priority=2**31 - 1), None, LIMITS)


def test_prompt_logprobs_may_be_0_to_the_maximum() -> None:
    prepare(req(prompt_logprobs=0), None, LIMITS)
    prepare(req(prompt_logprobs=MAX_TOP_LOGPROBS), None, LIMITS)
    refused("prompt_logprobs", prompt_logprobs=MAX_TOP_LOGPROBS + 1)
    refused("prompt_logprobs", prompt_logprobs=-1)


def test_negative_top_logprobs_is_refused() -> None:
    prepare(req(logprobs=True, top_logprobs=MAX_TOP_LOGPROBS), None, LIMITS)
    refused("top_logprobs", logprobs=True, top_logprobs=-1)


def test_stop_token_id_count_limit() -> None:
    prepare(req(stop_token_ids=(1,) * MAX_STOP_TOKEN_IDS), None, LIMITS)
    refused("stop_token_ids", stop_token_ids=(1,) * (MAX_STOP_TOKEN_IDS + 1))


def test_stop_token_ids_run_to_vocab_size_minus_one() -> None:
    prepare(req(stop_token_ids=(399,)), None, LIMITS)
    refused("stop_token_ids[1]", stop_token_ids=(3, 400))
    refused("stop_token_ids[0]", stop_token_ids=(-1,))


def test_negative_prompt_token_id_is_refused() -> None:
    refused("prompt_token_ids[1]", prompt_token_ids=(1, -1))


class RejectingTemplate:
    def apply_chat_template(self, *args, **kwargs):
        raise ValueError("Conversation roles must alternate user/assistant")


def test_a_template_refusal_is_an_invalid_request_naming_messages() -> None:
    with pytest.raises(InvalidRequestError) as err:
        prepare(GenerationRequest(request_id="r", messages=(ChatMessage("assistant", "hi"),)),
                RejectingTemplate(), LIMITS)
    assert err.value.field == "messages"


def test_empty_messages_is_refused_before_the_template() -> None:
    with pytest.raises(InvalidRequestError) as err:
        prepare(GenerationRequest(request_id="r", messages=()), RejectingTemplate(), LIMITS)
    assert err.value.field == "messages" and "at least one" in err.value.message


def test_min_new_tokens_may_equal_max_new_tokens() -> None:
    """At most max_new_tokens given; unset, at most the server's limit (64 here) and the room
    in the context (3 where the prompt leaves 3), and the default (8) counts from after it,
    up to those."""
    prepare(req(max_new_tokens=20, min_new_tokens=20), None, LIMITS)
    refused("min_new_tokens", max_new_tokens=20, min_new_tokens=21)
    assert prepare(req(), None, LIMITS).max_new_tokens == 8
    assert prepare(req(min_new_tokens=5), None, LIMITS).max_new_tokens == 13
    assert prepare(req(min_new_tokens=9), None, LIMITS).max_new_tokens == 17
    assert prepare(req(min_new_tokens=60), None, LIMITS).max_new_tokens == 64
    assert prepare(req(min_new_tokens=64), None, LIMITS).max_new_tokens == 64
    assert prepare(req(prompt_token_ids=(1,) * 250, min_new_tokens=2), None,
                   LIMITS).max_new_tokens == 6  # the room
    refused("min_new_tokens", min_new_tokens=65)
    assert prepare(req(prompt_token_ids=(1,) * 253, min_new_tokens=3), None,
                   LIMITS).max_new_tokens == 3
    refused("min_new_tokens", prompt_token_ids=(1,) * 253, min_new_tokens=4)
    refused("min_new_tokens", min_new_tokens=-1)


def test_logit_bias_ids_stay_inside_the_vocabulary() -> None:
    from decoding.params import SamplingParams

    prepare(req(sampling=SamplingParams(logit_bias=((399, 1.0),))), None, LIMITS)
    refused("sampling.logit_bias[400]", sampling=SamplingParams(logit_bias=((400, 1.0),)))

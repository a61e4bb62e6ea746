"""service.converters: proto presence, request_id bounds, deadline, finish reasons, usage."""

from __future__ import annotations

import time

from decoding.params import Chunk, FinishReason, Usage
from service import converters
from service._proto.tandem.v1 import generation_pb2 as pb


def test_gamma_zero_sent_is_kept_and_unset_is_none() -> None:
    sent = pb.GenerateRequest(prompt="x")
    sent.speculation.num_speculative_tokens = 0
    assert converters.to_request(sent, "r", None).speculation.num_speculative_tokens == 0
    unset = converters.to_request(pb.GenerateRequest(prompt="x"), "r", None)
    assert unset.speculation.num_speculative_tokens is None


def test_request_id_bounds() -> None:
    assert converters.valid_request_id("a" * converters.MAX_REQUEST_ID_LENGTH)
    assert not converters.valid_request_id("a" * (converters.MAX_REQUEST_ID_LENGTH + 1))
    assert converters.valid_request_id(" ~")
    assert not converters.valid_request_id("a\x7f")  # DEL is not printable


def test_deadline_is_now_plus_time_remaining() -> None:
    before = time.monotonic()
    request = converters.to_request(pb.GenerateRequest(prompt="x"), "r", 5.0)
    assert request.deadline is not None
    assert before + 5.0 <= request.deadline <= time.monotonic() + 5.0
    assert converters.to_request(pb.GenerateRequest(prompt="x"), "r", None).deadline is None


def test_each_finish_reason_maps_to_its_own_proto_value() -> None:
    expected = {FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
                FinishReason.STOP: pb.FINISH_REASON_STOP, FinishReason.EOS: pb.FINISH_REASON_EOS}
    for reason, value in expected.items():
        chunk = Chunk(token_ids=(1,), text="a", finish_reason=reason)
        assert converters.to_stream_response("r", chunk).finish_reason == value
        assert converters.to_response("r", [chunk]).finish_reason == value


def test_usage_carries_every_field() -> None:
    usage = Usage(prompt_tokens=3, completion_tokens=4, draft_tokens=6, accepted_draft_tokens=3,
                  target_forward_passes=2, accepted_by_position=[2, 1], drafted_by_position=[3, 3])
    out = converters.to_usage(usage)
    assert (out.prompt_tokens, out.completion_tokens, out.draft_tokens,
            out.accepted_draft_tokens, out.target_forward_passes) == (3, 4, 6, 3, 2)
    assert list(out.accepted_by_position) == [2, 1]
    assert list(out.drafted_by_position) == [3, 3]
    assert abs(out.acceptance_rate - 0.5) < 1e-6


def test_each_penalty_sent_reaches_the_engine_and_unset_is_its_default() -> None:
    """Each penalty on its own, so that one copied into another's place, or read whether set
    or not, shows; values a float32 holds exactly, so they compare equal."""
    sent = {"repetition_penalty": 1.25, "frequency_penalty": -0.5, "presence_penalty": 1.5}
    defaults = {"repetition_penalty": 1.0, "frequency_penalty": 0.0, "presence_penalty": 0.0}
    for name, value in sent.items():
        message = pb.GenerateRequest(prompt="x")
        setattr(message.sampling, name, value)
        sampling = converters.to_request(message, "r", None).sampling
        assert {n: getattr(sampling, n) for n in sent} == {**defaults, name: value}, name
    unset = converters.to_request(pb.GenerateRequest(prompt="x"), "r", None).sampling
    assert {n: getattr(unset, n) for n in sent} == defaults
    assert not unset.penalized


def test_min_p_sent_reaches_the_engine_and_unset_is_off() -> None:
    message = pb.GenerateRequest(prompt="x", sampling=pb.SamplingParams(min_p=0.25))
    assert converters.to_request(message, "r", None).sampling.min_p == 0.25
    assert converters.to_request(pb.GenerateRequest(prompt="x"), "r", None).sampling.min_p == 0


def test_prompt_logprobs_sent_reach_the_engine_and_unset_asks_for_none() -> None:
    for top in (0, 5):
        message = pb.GenerateRequest(prompt="x", prompt_logprobs=top)
        assert converters.to_request(message, "r", None).prompt_logprobs == top
    assert converters.to_request(pb.GenerateRequest(prompt="x"), "r", None).prompt_logprobs is None


def test_stop_string_and_truncation_fields_reach_the_engine() -> None:
    message = pb.GenerateRequest(prompt="x", include_stop_str_in_output=True,
                                 truncate_prompt_tokens=9, priority=-4)
    request = converters.to_request(message, "r", None)
    assert (request.include_stop_str_in_output, request.truncate_prompt_tokens,
            request.priority) == (True, 9, -4)
    unset = converters.to_request(pb.GenerateRequest(prompt="x"), "r", None)
    assert (unset.include_stop_str_in_output, unset.truncate_prompt_tokens,
            unset.priority) == (False, None, 0)
    zero = converters.to_request(pb.GenerateRequest(prompt="x", truncate_prompt_tokens=0), "r",
                                 None)
    assert zero.truncate_prompt_tokens == 0  # set to 0 is sent as 0, and refused


def test_min_new_tokens_sent_reaches_the_engine() -> None:
    assert converters.to_request(pb.GenerateRequest(prompt="x", min_new_tokens=7), "r",
                                 None).min_new_tokens == 7
    assert converters.to_request(pb.GenerateRequest(prompt="x"), "r", None).min_new_tokens == 0


def test_logit_bias_sent_reaches_the_engine_as_sorted_pairs() -> None:
    message = pb.GenerateRequest(prompt="x", sampling=pb.SamplingParams(
        logit_bias={9: -2.5, 3: 0.25}))
    assert converters.to_request(message, "r", None).sampling.logit_bias == (
        (3, 0.25), (9, -2.5))
    unset = converters.to_request(pb.GenerateRequest(prompt="x"), "r", None).sampling
    assert unset.logit_bias == ()

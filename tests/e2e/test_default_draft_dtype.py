"""The real default pair as ``tandem serve`` loads it by default: the draft in
``--draft-dtype auto`` (bfloat16 on this CPU, where oneDNN runs it; prepacked on the fast path).

A module of its own, with the pair loaded inside the test, so that it is never in memory beside
the module-scoped pair of ``test_default_pair.py``: two float32 targets, each with its prepacked
copy, do not fit in 24 GiB (tried: the machine swapped and the test took 162 s instead of 39).
"""

from __future__ import annotations

import pytest
import torch

from decoding.engine import Engine, EngineConfig
from decoding.models import load_pair, resolve_draft_dtype
from decoding.params import GenerationRequest
from tests.conftest import TEST_COSTS
from tests.e2e.test_default_pair import chat_ids, target_greedy

pytestmark = pytest.mark.slow


async def test_the_servers_default_draft_dtype_changes_nothing_but_speed() -> None:
    cpu = torch.device("cpu")
    if resolve_draft_dtype("auto", cpu, torch.float32) == torch.float32:
        pytest.skip("auto keeps the draft in float32 on this CPU")
    pair = load_pair("default", "default", device="cpu", dtype="float32", draft_dtype="auto")
    assert pair.draft_dtype == torch.bfloat16
    engine = Engine(pair, EngineConfig(num_speculative_tokens=4), costs=TEST_COSTS)
    try:
        ids = chat_ids(pair)
        handle = engine.submit(GenerationRequest(
            request_id="bf16-draft", prompt_token_ids=tuple(ids), max_new_tokens=32))
        chunks = [c async for c in handle]
    finally:
        engine.close()
    assert [t for c in chunks for t in c.token_ids] == target_greedy(pair, ids, 32)
    assert chunks[-1].usage.accepted_draft_tokens > 0  # the bfloat16 draft did propose

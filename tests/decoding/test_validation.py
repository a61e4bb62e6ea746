"""How a request's input becomes token ids: a prompt as the tokenizer encodes text by default
(its BOS included, as transformers, vLLM and TGI do), chat messages through the template,
which writes any BOS itself."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from decoding.errors import InvalidRequestError
from decoding.params import ChatMessage, GenerationRequest
from decoding.validation import Limits, prepare, special_tokens
from tests.tiny_models import make_tiny_tokenizer

BOS = "<s>"
LIMITS = Limits(vocab_size=400, context_window=256, max_speculative_tokens=8,
                default_max_new_tokens=8, max_new_tokens_limit=64, max_stop_strings=4)


def llama_like_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer whose default encoding starts with BOS, as Llama's does, and
    whose chat template writes BOS into the text."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=[BOS, "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    backend.train_from_iterator(["def add(a, b):\n    return a + b\n"] * 4, trainer)
    bos_id = backend.token_to_id(BOS)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=BOS, eos_token="</s>",
        chat_template="{{ bos_token }}{% for m in messages %}{{ m['content'] }}\n{% endfor %}",
    )


def test_a_prompt_gets_the_tokenizers_bos_and_chat_messages_get_it_once() -> None:
    tokenizer = llama_like_tokenizer()
    bos_id = tokenizer.convert_tokens_to_ids(BOS)
    text = "def add(a, b):"
    plain = tokenizer.encode(text, add_special_tokens=False)
    prompt = prepare(GenerationRequest(request_id="p", prompt=text), tokenizer, LIMITS)
    assert prompt.prompt_ids == (bos_id, *plain)  # as tokenizer(text) and vLLM give it
    rendered = prepare(GenerationRequest(request_id="r", prompt=BOS + text), tokenizer, LIMITS)
    assert rendered.prompt_ids == prompt.prompt_ids  # a prompt with its own BOS gets no second
    chat = prepare(GenerationRequest(request_id="c", messages=(ChatMessage("user", text),)),
                   tokenizer, LIMITS)
    assert chat.prompt_ids[0] == bos_id and chat.prompt_ids.count(bos_id) == 1
    ids = (5, 6, 7)  # token ids are taken as they are
    assert prepare(GenerationRequest(request_id="i", prompt_token_ids=ids), tokenizer,
                   LIMITS).prompt_ids == ids


def test_a_stop_string_that_is_a_special_token_is_refused_with_its_id() -> None:
    """The output text is detokenized without special tokens, so such a stop string would be
    accepted and never match; the error says which id to give in stop_token_ids instead.
    Text that merely contains one is the client's to give."""
    tokenizer = make_tiny_tokenizer()
    start = tokenizer.convert_tokens_to_ids("<|im_start|>")  # special, not in all_special_tokens
    assert special_tokens(tokenizer) == {"<|endoftext|>": 0, "<|im_start|>": start,
                                         "<|im_end|>": tokenizer.eos_token_id}
    with pytest.raises(InvalidRequestError) as err:
        prepare(GenerationRequest(request_id="r", prompt="x", stop=("\n", "<|im_start|>")),
                tokenizer, LIMITS)
    assert err.value.field == "stop[1]"
    assert f"special token {start}" in str(err.value) and "stop_token_ids" in str(err.value)
    prepare(GenerationRequest(request_id="r", prompt="x", stop=("<|im_start|>user",)),
            tokenizer, LIMITS)


def test_limits_hold_at_their_edges() -> None:
    """A prompt filling the context window leaves no room for a token; token ids run to
    vocab_size - 1; max_stop_strings stop strings are allowed, one more is not. (Mutants: each
    bound off by one.)"""
    def request(**fields) -> GenerationRequest:
        return GenerationRequest(request_id="r", **fields)

    with pytest.raises(InvalidRequestError) as err:
        prepare(request(prompt_token_ids=(1,) * 256), None, LIMITS)
    assert err.value.field == "prompt_token_ids"
    assert prepare(request(prompt_token_ids=(1,) * 255), None, LIMITS).max_new_tokens == 1
    with pytest.raises(InvalidRequestError) as err:
        prepare(request(prompt_token_ids=(1, 400)), None, LIMITS)
    assert err.value.field == "prompt_token_ids[1]"
    assert prepare(request(prompt_token_ids=(1, 399)), None, LIMITS).prompt_ids == (1, 399)
    assert prepare(request(prompt_token_ids=(1,), stop=("a",) * 4), None, LIMITS)
    with pytest.raises(InvalidRequestError) as err:
        prepare(request(prompt_token_ids=(1,), stop=("a",) * 5), None, LIMITS)
    assert err.value.field == "stop"

"""Streaming detokenization: multi-byte characters and stop strings across tokens."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

from decoding.detokenize import REPLACEMENT, IncrementalDetokenizer
from tests.tiny_models import make_tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return make_tiny_tokenizer()


TEXT = "naïve café → 世界 🙂🚀 done"


def stream(tokenizer, ids, stop=(), include_stop=False):
    detokenizer = IncrementalDetokenizer(tokenizer, stop, include_stop)
    deltas = []
    for token in ids:
        stopped = detokenizer.add(token)
        deltas.append(detokenizer.delta(final=stopped))
        if stopped:
            break
    deltas.append(detokenizer.delta(final=True))
    return deltas


def test_multibyte_characters_never_surface_half_decoded(tokenizer) -> None:
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    # the byte-level tokenizer never saw these characters: they are split into byte tokens
    assert len(ids) > len(TEXT.encode()) // 2
    deltas = stream(tokenizer, ids)
    assert all(REPLACEMENT not in d for d in deltas)
    assert "".join(deltas) == tokenizer.decode(ids) == TEXT


def test_a_split_emoji_is_held_back_until_complete(tokenizer) -> None:
    ids = tokenizer.encode("🙂", add_special_tokens=False)
    assert len(ids) == 4  # one token per byte
    detokenizer = IncrementalDetokenizer(tokenizer)
    for token in ids[:-1]:
        detokenizer.add(token)
        assert detokenizer.delta() == ""
    detokenizer.add(ids[-1])
    assert detokenizer.delta() == "🙂"


@pytest.mark.parametrize("stop", ["世界", "é →", "e", "🚀 d"])
def test_stop_string_spanning_tokens_cuts_everything_after(tokenizer, stop) -> None:
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    deltas = stream(tokenizer, ids, stop=(stop,))
    assert "".join(deltas) == TEXT[: TEXT.find(stop)]


@pytest.mark.parametrize("stop", ["世界", "é →", "e", "🚀 d", "done"])
def test_a_kept_stop_string_ends_the_text_and_nothing_after_it_shows(tokenizer, stop) -> None:
    ids = tokenizer.encode(TEXT + " and more", add_special_tokens=False)
    deltas = stream(tokenizer, ids, stop=(stop,), include_stop=True)
    assert "".join(deltas) == TEXT[: TEXT.find(stop) + len(stop)]


@pytest.mark.parametrize(("stops", "kept"), [
    (("va", "al"), "va"), (("al", "va"), "va"), (("alu", "v"), "v"), (("lue", "valu"), "valu"),
    (("val", "valu"), "val"), (("valu", "val"), "valu"),
])
def test_a_kept_stop_string_is_the_earliest_and_of_those_the_first_listed(
    tokenizer, stops, kept
) -> None:
    (token,) = tokenizer.encode("value", add_special_tokens=False)
    detokenizer = IncrementalDetokenizer(tokenizer, stops, include_stop=True)
    assert detokenizer.add(token)
    assert detokenizer.delta(final=True) == kept


def test_earliest_of_several_stop_strings_wins(tokenizer) -> None:
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    deltas = stream(tokenizer, ids, stop=("done", "café"))
    assert "".join(deltas) == "naïve "


@pytest.mark.parametrize("stops", [("va", "al"), ("al", "va"), ("alu", "v"), ("lue", "valu")])
def test_overlapping_stop_strings_completed_by_one_token_cut_at_the_earliest(
    tokenizer, stops
) -> None:
    """One token ("value") completes two stop strings that overlap: whichever is listed
    first, the text is cut where the earlier one starts."""
    (token,) = tokenizer.encode("value", add_special_tokens=False)
    detokenizer = IncrementalDetokenizer(tokenizer, stops)
    assert detokenizer.add(token)
    expected = min("value".find(stop) for stop in stops)
    assert detokenizer.delta(final=True) == "value"[:expected]


def test_text_that_could_start_a_stop_string_is_held_back(tokenizer) -> None:
    ids = tokenizer.encode("abc abd", add_special_tokens=False)
    detokenizer = IncrementalDetokenizer(tokenizer, ("abd!",))
    shown = ""
    for token in ids:
        detokenizer.add(token)
        shown += detokenizer.delta()
    assert shown == "abc "  # "abd" might still become "abd!"
    assert shown + detokenizer.delta(final=True) == "abc abd"


def byte_fallback_tokenizer() -> PreTrainedTokenizerFast:
    """SentencePiece-style, as Llama's and Mistral's: characters outside the vocabulary become
    <0xXX> byte tokens, and an incomplete UTF-8 sequence decodes to one U+FFFD per byte."""
    vocab = {"<unk>": 0, "a": 1, "b": 2, "▁": 3}
    vocab.update({f"<0x{b:02X}>": 4 + b for b in range(256)})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    backend.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")


def test_several_incomplete_bytes_are_all_held_back() -> None:
    """After 1, 2 and 3 of an emoji's 4 byte tokens the text ends in as many U+FFFD: none is
    shown, and the emoji comes out whole. (Mutant: only one trailing U+FFFD held back.)"""
    tokenizer = byte_fallback_tokenizer()
    ids = [1, *(4 + b for b in "🙂".encode()), 2]  # "a🙂b"
    assert tokenizer.decode(ids[:3]) == "a" + REPLACEMENT * 2
    detokenizer = IncrementalDetokenizer(tokenizer)
    deltas = []
    for token in ids:
        detokenizer.add(token)
        deltas.append(detokenizer.delta())
    deltas.append(detokenizer.delta(final=True))
    assert all(REPLACEMENT not in delta for delta in deltas), deltas
    assert "".join(deltas) == "a🙂b"


def sentencepiece_like() -> PreTrainedTokenizerFast:
    """Llama's decoder: '▁' -> ' ', then the first leading space stripped, so a token decodes
    differently alone ('b') than after its left neighbour (' b')."""
    vocab = {"<unk>": 0, "▁a": 1, "▁b": 2, "▁c": 3, "d": 4}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")


def test_leading_spaces_survive_the_window() -> None:
    """The window keeps a left neighbour, so ' b' after 'a' is not decoded as 'b' alone."""
    tokenizer = sentencepiece_like()
    ids = [1, 2, 4, 3, 2]
    assert tokenizer.decode(ids) == "a bd c b"
    assert "".join(stream(tokenizer, ids)) == "a bd c b"


def test_special_tokens_are_left_out_of_the_text(tokenizer) -> None:
    ids = [*tokenizer.encode("hi", add_special_tokens=False), tokenizer.eos_token_id]
    detokenizer = IncrementalDetokenizer(tokenizer)
    for token in ids:
        detokenizer.add(token)
    assert detokenizer.delta(final=True) == "hi" == detokenizer.text


def test_a_stop_string_ends_the_text_only_where_stopping_is_allowed(tokenizer) -> None:
    """Before min_new_tokens (``stop=False``) a stop string does not end the text; one that a
    later token completes does, even where it began before."""
    ids = tokenizer.encode("ab ab ab", add_special_tokens=False)
    detokenizer = IncrementalDetokenizer(tokenizer, ("ab",))
    stopped = [detokenizer.add(token, stop=k >= len(ids) - 1) for k, token in enumerate(ids)]
    assert stopped == [False] * (len(ids) - 1) + [True]
    assert detokenizer.text == tokenizer.decode(ids)[: "ab ab ab".rindex("ab")]

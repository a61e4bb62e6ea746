"""IncrementalDetokenizer: left-context window for SentencePiece-style decoders; special tokens."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

from decoding.detokenize import IncrementalDetokenizer
from tests.tiny_models import make_tiny_tokenizer


def sentencepiece_like() -> PreTrainedTokenizerFast:
    """Llama's decoder: '▁' -> ' ', then the first leading space stripped, so a token decodes
    differently alone ('b') than after its left neighbour (' b')."""
    vocab = {"<unk>": 0, "▁a": 1, "▁b": 2, "▁c": 3, "d": 4}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")


def test_leading_spaces_survive_the_window() -> None:
    tokenizer = sentencepiece_like()
    ids = [1, 2, 4, 3, 2]
    assert tokenizer.decode(ids) == "a bd c b"
    detokenizer = IncrementalDetokenizer(tokenizer)
    deltas = []
    for token in ids:
        detokenizer.add(token)
        deltas.append(detokenizer.delta())
    deltas.append(detokenizer.delta(final=True))
    assert "".join(deltas) == "a bd c b" == detokenizer.text


def test_special_tokens_are_left_out_of_the_text() -> None:
    tokenizer = make_tiny_tokenizer()
    ids = [*tokenizer.encode("hi", add_special_tokens=False), tokenizer.eos_token_id]
    detokenizer = IncrementalDetokenizer(tokenizer)
    for token in ids:
        detokenizer.add(token)
    assert detokenizer.delta(final=True) == "hi" == detokenizer.text

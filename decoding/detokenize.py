"""Streaming detokenization with stop strings.

Each step's tokens are turned into a text delta. Text is held back while it ends in an
incomplete UTF-8 sequence (U+FFFD) or while its tail could still become a stop string, so
the deltas of a stream concatenate to exactly the text a unary call returns, and nothing after
a stop string ever reaches the caller (nor, unless the request keeps it, the stop string).
"""

from __future__ import annotations

from typing import Any

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Decodes a window of the last few tokens per step, not the whole output (vLLM's and TGI's
    prefix/read offsets): the text of ``ids[prefix:read]`` is already decoded, so the new text
    is what decoding ``ids[prefix:]`` adds to it. The window starts at the tokens made final one
    step before the last, so that tokenizers whose decoding of a token depends on its left
    neighbour (SentencePiece's leading space) decode both texts alike. A step's text is final
    only when it does not end in an incomplete UTF-8 sequence; until then the window keeps its
    tokens."""

    def __init__(
        self, tokenizer: Any, stop: tuple[str, ...] = (), include_stop: bool = False
    ) -> None:
        self._tokenizer = tokenizer
        self._stop = stop
        self._include_stop = include_stop  # the text ends after the stop string, not before
        self._ids: list[int] = []
        self._prefix = 0  # the window starts here
        self._read = 0  # ids[:read] are final: their text is _final
        self._prefix_text = ""  # decode(ids[prefix:read])
        self._final = ""
        self._text = ""  # decoded text of every id so far, cut at a stop string
        self._emitted = 0  # characters of _text already returned
        self.stopped = False

    @property
    def text(self) -> str:
        return self._text

    def _decode(self, ids: list[int]) -> str:
        return str(
            self._tokenizer.decode(
                ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
            )
        )

    def add(self, token_id: int, stop: bool = True) -> bool:
        """Add one token; return True when it completes a stop string (text is cut before it,
        or after it with ``include_stop``).
        ``stop`` False: no stop string ends the text here (the request's min_new_tokens);
        a later token may still complete one that began here."""
        self._ids.append(token_id)
        window = self._decode(self._ids[self._prefix :])
        if window.startswith(self._prefix_text):
            text = self._final + window[len(self._prefix_text) :]
        else:  # a tokenizer whose window decodes differently: decode everything
            text = self._decode(self._ids)
        if not text.endswith(REPLACEMENT) and len(text) > len(self._final):
            self._final = text
            self._prefix, self._read = self._read, len(self._ids)
            self._prefix_text = self._decode(self._ids[self._prefix : self._read])
        # Only a match ending in the new text is new. The previous text's trailing U+FFFD were
        # incomplete bytes that this token may have completed, so they do not count as seen.
        seen = len(self._text.rstrip(REPLACEMENT))
        # The earliest match of any stop wins, each searched in the uncut text: one listed
        # later may start before, and end after, the start of another's match.
        found = [text.find(s, max(0, seen - len(s) + 1)) for s in self._stop] if stop else []
        matches = [(at, k) for k, at in enumerate(found) if at != -1]
        if matches:
            at, k = min(matches)  # the earliest; of those starting together, the first listed
            end = at + len(self._stop[k]) if self._include_stop else at
            text, self.stopped = text[:end], True
        self._text = text
        return self.stopped

    def delta(self, final: bool = False) -> str:
        """Text not yet returned that is safe to show now (everything, when ``final``)."""
        end = len(self._text)
        if not final:
            while end > self._emitted and self._text[end - 1] == REPLACEMENT:
                end -= 1
            end -= self._stop_prefix_length(self._text[self._emitted : end])
        out = self._text[self._emitted : end]
        self._emitted = max(self._emitted, end)
        return out

    def _stop_prefix_length(self, pending: str) -> int:
        """Length of the longest tail of ``pending`` that is a proper prefix of a stop string."""
        longest = 0
        for stop in self._stop:
            for n in range(min(len(stop) - 1, len(pending)), longest, -1):
                if pending.endswith(stop[:n]):
                    longest = n
                    break
        return longest

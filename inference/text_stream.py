"""Turning one sequence's tokens into text as they are decoded: multi-byte characters are
never split across deltas, stop strings end the sequence and are never emitted."""

from __future__ import annotations

from typing import Any

_INCOMPLETE = "\ufffd"


class TextStream:
    """Feed token ids with `push`; it returns the text that is safe to send now.

    Decoding follows the prefix/read offsets of Hugging Face's text-generation-inference: a
    window of already-decoded tokens is decoded again with the new ones, so tokenizers that
    merge spaces or bytes across tokens give the same text as decoding all at once. Text that
    may still become the start of a stop string is held back until it cannot.
    """

    def __init__(self, tokenizer: Any, stop: list[str]) -> None:
        self._tokenizer = tokenizer
        self._stop = stop
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0
        self._text = ""      # everything decoded so far
        self._emitted = 0    # characters of _text already returned
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add a decoded token; the text to send now (maybe empty). After a stop string,
        `stopped` is True and the text up to it has been returned."""
        self._ids.append(token_id)
        prefix = self._tokenizer.decode(self._ids[self._prefix_offset:self._read_offset],
                                        skip_special_tokens=True)
        full = self._tokenizer.decode(self._ids[self._prefix_offset:],
                                      skip_special_tokens=True)
        if len(full) > len(prefix) and not full.endswith(_INCOMPLETE):
            self._text += full[len(prefix):]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
        return self._release(final=False)

    def finish(self) -> str:
        """The text still held back when the sequence ends without a stop string."""
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        end = len(self._text)
        for stop in self._stop:
            at = self._text.find(stop, max(0, self._emitted - len(stop) + 1))
            if at != -1 and at < end:
                end = at
                self.stopped = True
        if not self.stopped and not final:
            end -= self._held_back()
        out = self._text[self._emitted:end] if end > self._emitted else ""
        self._emitted = max(self._emitted, end)
        return out

    def _held_back(self) -> int:
        """How many trailing characters could begin a stop string."""
        longest = 0
        for stop in self._stop:
            for size in range(min(len(stop) - 1, len(self._text)), longest, -1):
                if self._text.endswith(stop[:size]):
                    longest = size
                    break
        return longest

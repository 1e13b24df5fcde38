"""Streaming detokenization: token ids in, text deltas out, correct by construction.

- A delta never ends in a partial UTF-8 character: while decoding the newest tokens ends
  in U+FFFD (bytes of a character still to come), the text is held back.
- Text that could still become a stop sequence is held back; a stop sequence is cut
  exactly, even when it spans tokens or starts inside a multibyte character's tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

REPLACEMENT = "\ufffd"
# Prompt tokens decoded in front of the output, so decoders that treat the first token
# of a string specially (a leading space) decode the output as it reads in context.
_CONTEXT_TOKENS = 4


class IncrementalDetokenizer:
    """Turns a stream of token ids into text deltas for one request.

    `decode` maps a list of ids to text (e.g. `tokenizers.Tokenizer.decode`). Call `add`
    per generated token; when `stopped` turns true, generation must end. Call `flush` at
    the end of a stream that did not stop, for text still held back.
    """

    def __init__(
        self,
        decode: Callable[[list[int]], str],
        *,
        stop: Sequence[str] = (),
        prompt_ids: Sequence[int] = (),
        include_stop: bool = False,
    ):
        self._decode = decode
        self._stop = tuple(s for s in stop if s)
        self._ids: list[int] = list(prompt_ids[-_CONTEXT_TOKENS:]) if prompt_ids else []
        # TGI-style offsets: ids[prefix:read] decode to text already accounted for.
        self._prefix = 0
        self._read = len(self._ids)
        self._pending = ""  # decoded, not yet emitted (could become a stop sequence)
        self.text = ""  # everything emitted so far
        self.stopped = False
        # Keep the stop sequence itself in the text (include_stop_str_in_output).
        self._include_stop = include_stop
        # Stop sequences end the text only once armed (min_tokens holds them off).
        self.stop_armed = True

    def add(self, token_id: int) -> str:
        """Adds one token; returns the text that can be sent now (may be empty)."""
        if self.stopped:
            return ""
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        new_text = self._decode(self._ids[self._prefix :])
        if len(new_text) > len(prefix_text) and not new_text.endswith(REPLACEMENT):
            self._pending += new_text[len(prefix_text) :]
            self._prefix, self._read = self._read, len(self._ids)
        return self._release(final=False)

    def flush(self) -> str:
        """The text still held back, at the end of a stream that did not hit a stop."""
        if self.stopped:
            return ""
        # A character whose bytes never all arrived (generation ended inside it) is dropped.
        rest = self._decode(self._ids[self._prefix :]).rstrip(REPLACEMENT)
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        if len(rest) > len(prefix_text):
            self._pending += rest[len(prefix_text) :]
        self._prefix = self._read = len(self._ids)
        return self._release(final=True)

    def _release(self, *, final: bool) -> str:
        pending = self._pending
        # The earliest stop sequence wins. Emitted text never holds the start of one (the
        # held-back suffix below guarantees it), so searching the pending text suffices.
        cut, found = -1, ""
        for s in self._stop if self.stop_armed else ():
            i = pending.find(s)
            if i != -1 and (cut == -1 or i < cut):
                cut, found = i, s
        if cut != -1:
            cut += len(found) if self._include_stop else 0
            self.stopped = True
            out, self._pending = pending[:cut], ""
        elif final or not self.stop_armed:
            out, self._pending = pending, ""
        else:
            hold = self._held_suffix(pending)
            out, self._pending = pending[: len(pending) - hold], pending[len(pending) - hold :]
        self.text += out
        return out

    def _held_suffix(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of a stop."""
        best = 0
        for s in self._stop:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best

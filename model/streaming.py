"""Writing generated tokens as they arrive: text through the tokenizer's incremental decoder, so a
character whose bytes span several tokens is written whole once its last byte arrives (decoding
token by token would write replacement characters), or token ids where there is no tokenizer."""
from __future__ import annotations

import sys


class TokenPrinter:
    """push(token id) writes whatever text is complete; finish() writes what is still pending (an
    unfinished character becomes U+FFFD, the end of output being reached mid-character).

    Special tokens (end of turn, end of text) are not written unless skip_special_tokens=False."""

    def __init__(self, tokenizer=None, out=None, *, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.out = out if out is not None else sys.stdout
        self.skip_special_tokens = skip_special_tokens
        self.text = ""              # everything written so far
        self._pending: list[int] = []
        self._stream = None
        if tokenizer is not None:
            from tokenizers.decoders import DecodeStream

            self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)

    def _write(self, chunk: str) -> str:
        if chunk:
            self.out.write(chunk)
            self.out.flush()
            self.text += chunk
        return chunk

    def push(self, token: int) -> str:
        """Feed one generated token id; returns the text written for it ('' while it is pending)."""
        token = int(token)
        if self._stream is None:
            return self._write(f"{token} ")
        self._pending.append(token)
        chunk = self._stream.step(self.tokenizer, token)
        if chunk is None:
            return ""
        self._pending.clear()
        return self._write(chunk)

    def finish(self) -> str:
        """Write the tokens still held back (an incomplete character at the very end)."""
        if not self._pending:
            return ""
        rest = self.tokenizer.decode(self._pending, skip_special_tokens=self.skip_special_tokens)
        self._pending.clear()
        return self._write(rest)

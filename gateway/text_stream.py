"""TextStream: generated token ids -> text deltas for the client, with stop strings.

Text is released only as whole characters (IncrementalDetokenizer), and text that might be the start
of a stop string is held back until it is clearly not one. When a stop string appears, the text up
to it is released and the stream is done; the stop string itself is never sent.
"""

from common.basics.stop_strings import find_stop, stop_prefix_length
from common.basics.tokenizer import IncrementalDetokenizer, TextTokenizer


class TextStream:
    def __init__(self, tokenizer: TextTokenizer, stop: tuple[str, ...]) -> None:
        self._detokenizer = IncrementalDetokenizer(tokenizer)
        self._stop = stop
        self._text = ""  # all text decoded so far
        self._sent = 0  # characters of _text already released
        self.stopped = False

    def push(self, token_ids: list[int]) -> str:
        """Adds tokens; returns the text that can be released now. Sets `stopped` at a stop string."""
        if self.stopped:
            return ""
        self._text += self._detokenizer.push(token_ids)
        return self._release(final=False)

    def finish(self) -> str:
        """The rest of the text when generation ended for another reason (EOS, length)."""
        if self.stopped:
            return ""
        self._text += self._detokenizer.flush()
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        stop_at = find_stop(self._text, self._stop, self._sent)
        if stop_at >= 0:
            self.stopped = True
            end = stop_at
        elif final:
            end = len(self._text)
        else:
            end = len(self._text) - stop_prefix_length(self._text, self._stop)
        end = max(end, self._sent)
        delta, self._sent = self._text[self._sent:end], end
        return delta

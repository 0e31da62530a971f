"""Stop strings in growing text: where the first one starts, and how much of the text's end might
still become one. Shared by the decode tier (to stop generating) and the gateway (to cut the text)."""

from common.basics.tokenizer import IncrementalDetokenizer, TextTokenizer


def find_stop(text: str, stops: tuple[str, ...], searched: int) -> int:
    """Index of the earliest stop string in text, or -1. Only matches ending after `searched` are new."""
    start = max(searched - max((len(s) for s in stops), default=0), 0)
    hits = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(hits) if hits else -1


def stop_prefix_length(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest end of text that is a proper prefix of some stop string."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:size]):
                longest = size
                break
    return longest


class StopWatcher:
    """Detokenizes a sequence's new tokens and says when its text first contains a stop string."""

    def __init__(self, tokenizer: TextTokenizer, stops: tuple[str, ...]) -> None:
        self._detokenizer = IncrementalDetokenizer(tokenizer)
        self._stops = stops
        self._text = ""

    def push(self, token_ids: list[int]) -> bool:
        searched = len(self._text)
        self._text += self._detokenizer.push(token_ids)
        return find_stop(self._text, self._stops, searched) >= 0

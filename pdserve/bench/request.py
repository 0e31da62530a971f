"""One request of a workload, as the load generator sends it."""

from dataclasses import dataclass


@dataclass(frozen=True)
class BenchRequest:
    index: int
    kind: str
    prompt_ids: tuple[int, ...]  # empty for a text request; for a later turn, what the turn adds
    max_new_tokens: int
    text: str = ""  # a text request: sent as one user chat turn (the gateway tokenizes it)
    session: int | None = None  # requests of one session are sent in order, each once the one before has ended
    # A later turn of a conversation: the ids that close the previous reply in the history (see prompt_after).
    reply_close_ids: tuple[int, ...] | None = None

    def prompt_after(self, previous_prompt: tuple[int, ...], reply: tuple[int, ...]) -> tuple[int, ...]:
        """The ids this request sends, given the previous request's prompt and reply in its session: prompt_ids,
        or for a later turn the previous prompt, the reply closed by reply_close_ids (a reply that ended with
        their first id, the end-of-turn token, is not closed twice), then prompt_ids."""
        if self.reply_close_ids is None:
            return self.prompt_ids
        if reply and reply[-1] == self.reply_close_ids[0]:
            reply = reply[:-1]
        return previous_prompt + reply + self.reply_close_ids + self.prompt_ids

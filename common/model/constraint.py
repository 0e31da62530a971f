"""A sequence's grammar while tokens are chosen: which tokens it allows next (a mask over the vocabulary), and
what it allows along a speculative draft, so verification accepts only tokens the grammar takes and stays lossless.
The matcher always stands at the output generated so far."""

from collections.abc import Sequence

import numpy as np
import torch

from common.basics.errors import FailedPrecondition, InvalidArgument
from common.basics.grammar import GrammarError, ModelGrammars


class Constraint:
    def __init__(self, grammars: ModelGrammars, grammar: str, output: Sequence[int] = ()) -> None:
        """`output`: the tokens the request generated before (a resumed or migrated request): consumed now."""
        self.vocab_size = grammars.vocab_size
        self.eos_token_ids = list(grammars.eos_token_ids)
        self.matcher = grammars.matcher(grammar)
        if output and not self.matcher.consume_tokens(list(output)):
            raise GrammarError(f"the output so far breaks the grammar: {self.matcher.get_error()}")

    def allowed(self) -> torch.Tensor:
        """(vocab,) bool: the tokens the grammar takes next. The end-of-sequence tokens only, once it is complete
        and takes nothing more (or if it fell into an error state)."""
        bits = np.unpackbits(np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
        mask = torch.from_numpy(bits[:self.vocab_size].astype(bool))
        if not mask.any():
            mask[self.eos_token_ids] = True
        return mask

    def along(self, draft: Sequence[int]) -> list[torch.Tensor]:
        """The masks of rows 0..len(draft): row i's after draft[:i]. Past the first draft token the grammar refuses,
        rows repeat the last mask (verification rejects that token, so they are never read). The matcher is left
        where it was."""
        masks = [self.allowed()]
        taken = 0
        for token in draft:
            if not self.matcher.try_consume_tokens([token]):
                break
            taken += 1
            masks.append(self.allowed())
        if taken:
            self.matcher.rollback(taken)
        masks += [masks[-1]] * (len(draft) + 1 - len(masks))
        return masks

    def advance(self, tokens: Sequence[int]) -> None:
        """The chosen tokens (each allowed by construction); an end-of-sequence token ends the matcher's use."""
        for token in tokens:
            if token in self.eos_token_ids and (self.matcher.is_accepting() or self.matcher.is_stopped()):
                return
            self.matcher.consume_token(token)


def request_constraint(grammars: ModelGrammars | None, grammar: str, context: Sequence[int], num_generated: int,
                       tier: str) -> Constraint | None:
    """A request's constraint on a tier (None when it has no grammar), at the output it already has: the last
    num_generated tokens of `context`. Raises what the caller answers with: InvalidArgument for a grammar that
    does not compile or an output that breaks it, FailedPrecondition where the tier enforces none."""
    if not grammar:
        return None
    if grammars is None:
        raise FailedPrecondition(f"this {tier} instance enforces no response formats")
    try:
        return Constraint(grammars, grammar, context[len(context) - num_generated:] if num_generated else ())
    except GrammarError as error:
        raise InvalidArgument(f"response format: {error}") from None


def masked(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """logits (vocab,) with the tokens outside mask at -inf (a new tensor)."""
    return logits.masked_fill(~mask.to(logits.device), float("-inf"))

"""A draft model's LM head may cover only some tokens: the checkpoint lists them beside its weights
(`pdserve distill-draft` writes the list; the decode tier reads it and gives every other token draft
probability 0, which rejection sampling handles exactly)."""

HEAD_FILE = "draft_head.json"  # {"token_ids": [...]}: the tokens of the draft's LM head rows, in order

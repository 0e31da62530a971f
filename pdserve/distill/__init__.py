"""`pdserve distill-draft`: a small draft model for speculative decoding, distilled from the target.

No published checkpoint shares SmolLM2's tokenizer and is much smaller, so the draft is trained here: a few
of the target's layers (576 wide), the target's tokenizer and frozen embedding, and an LM head over only the
tokens the target writes most. The target's full head is 49,152 x 576 = 28 M parameters, more than the
draft's layers together (3.5 M each) and about 11 ms per step on these CPUs: a draft paying it would gain
little. With 8,192 head tokens a 2-layer draft step costs about 4 ms here against about 50 ms for a target step.
The head's tokens are listed in draft_head.json beside an otherwise ordinary Hugging Face checkpoint (tied
embedding, full vocabulary), so any Llama loader reads it; the decode tier uses the list where present and
gives every other token draft probability 0, which rejection sampling handles exactly.
"""

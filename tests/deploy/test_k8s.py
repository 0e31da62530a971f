"""Static checks of the Kubernetes manifests (deploy/k8s): every overlay rendered by `kubectl kustomize`.

Every object is validated against the Kubernetes API schema (kubernetes-validate, strict: an unknown field
fails). KEDA's ScaledObject is a custom resource with no schema there: it is checked against
components/keda/scaledobject.schema.json (the fields these manifests use), and the parts it borrows from
Kubernetes (metadata, the HPA behavior) against Kubernetes' own schemas. Each tier's arguments are parsed by the
real `pdserve` parser and checked against the Services, probes, Secrets, model volume, drain grace and
autoscalers around them, so a name, port or path that disagrees fails here rather than as a pod that never gets
ready. The exec probe script runs against a real health server over mutual TLS. No cluster needed."""

import re
import shutil
from pathlib import PurePosixPath
from types import SimpleNamespace

import kubernetes_validate
import pytest
import yaml
from compose_file import TIERS, parse_command
from k8s_manifests import (
    CONFIGS,
    DNS_TARGET,
    K8S,
    KUBERNETES_VERSION,
    MODEL_TIERS,
    OVERLAYS,
    PROBE,
    container,
    declared_flags,
    exported_labels,
    named,
    pod_spec,
    probe_args,
    probe_module,
    readme_commands,
    render,
    secret_file,
    selects,
    service_target,
    tier_args,
    validate_scaled_object,
)

from common.edge.server import (
    Tls,
    add_health,
    make_server,
    set_not_serving,
    set_serving,
)
from pdserve.certs import cert_files, make_certs
from pdserve.flags import config_from_args


@pytest.fixture(params=OVERLAYS)
def overlay(request) -> str:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed: it renders the kustomize overlays")
    return request.param


@pytest.fixture
def objects(overlay) -> tuple[dict, ...]:
    return render(overlay)


def test_every_object_matches_its_schema(objects):
    for obj in objects:
        if obj["kind"] == "ScaledObject":
            validate_scaled_object(obj)
        else:  # any other kind without a schema raises SchemaNotFoundError
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def test_everything_lands_in_one_namespace(objects):
    assert len({obj["metadata"].get("namespace") for obj in objects} - {None}) == 1
    assert all("namespace" in obj["metadata"] for obj in objects)


@pytest.mark.parametrize("tier", TIERS)
def test_tier_runs_its_subcommand_with_declared_flags(objects, tier):
    c = container(objects, tier)
    args = parse_command(c["args"])
    assert c["command"] == ["pdserve"] and args.command == tier and args.host == "0.0.0.0"
    assert {token for token in c["args"] if token.startswith("--")} <= declared_flags(tier)
    config_from_args(CONFIGS[tier], args)  # validated as the tier validates it at start (dns: targets included)


@pytest.mark.parametrize("tier", TIERS)
def test_headless_service_serves_the_tier_ports(objects, tier):
    args, pod = tier_args(objects, tier), pod_spec(objects, tier)
    service = named(objects, "Service")[f"pdserve-{tier}"]
    assert service["spec"]["clusterIP"] == "None"
    assert selects(service["spec"]["selector"], named(objects, "Deployment")[f"pdserve-{tier}"]["spec"]["template"]
                   ["metadata"]["labels"])
    assert service_target(service, args.port, pod) == args.port
    assert service_target(service, args.metrics_port, pod) == args.metrics_port


def test_gateway_public_service_reaches_the_gateway_port(objects):
    args, pod = tier_args(objects, "gateway"), pod_spec(objects, "gateway")
    public = named(objects, "Service")["pdserve-gateway-public"]
    assert public["spec"]["type"] in ("ClusterIP", "LoadBalancer") and public["spec"].get("clusterIP") != "None"
    assert service_target(public, args.port, pod) == args.port == 50051


@pytest.mark.parametrize("tier", TIERS)
def test_prometheus_scrapes_the_metrics_port(objects, tier):
    annotations = named(objects, "Deployment")[f"pdserve-{tier}"]["spec"]["template"]["metadata"]["annotations"]
    metrics_port = tier_args(objects, tier).metrics_port
    assert annotations == {"prometheus.io/scrape": "true", "prometheus.io/port": str(metrics_port),
                           "prometheus.io/path": "/metrics"}
    assert metrics_port in [p["containerPort"] for p in container(objects, tier)["ports"]]


@pytest.mark.parametrize("tier", MODEL_TIERS)
def test_internal_tier_probes_speak_mutual_tls_with_its_own_certificate(objects, tier):
    c, args = container(objects, tier), tier_args(objects, tier)
    for kind, alive in (("startupProbe", True), ("livenessProbe", True), ("readinessProbe", False)):
        probe = probe_args(c[kind]["exec"]["command"])
        assert probe.address == f"localhost:{args.port}" and probe.alive == alive
        assert [str(path) for path in probe.tls] == [str(args.tls_cert), str(args.tls_key), str(args.tls_ca)]


def test_gateway_is_ready_only_while_serving_and_alive_while_it_answers(objects):
    c, args = container(objects, "gateway"), tier_args(objects, "gateway")
    assert c["readinessProbe"]["grpc"] == {"port": args.port}  # plaintext public port: the native probe works
    for kind in ("startupProbe", "livenessProbe"):
        probe = probe_args(c[kind]["exec"]["command"])
        assert probe.address == f"localhost:{args.port}" and probe.alive and probe.tls is None


@pytest.mark.parametrize("tier", TIERS)
def test_probe_script_is_mounted_from_its_configmap(objects, tier):
    pod, c = pod_spec(objects, tier), container(objects, tier)
    path = PurePosixPath(c["livenessProbe"]["exec"]["command"][1])
    mount = next(m for m in c["volumeMounts"] if path.is_relative_to(m["mountPath"]))
    configmap = next(v["configMap"]["name"] for v in pod["volumes"] if v["name"] == mount["name"])
    data = named(objects, "ConfigMap")[configmap]["data"]
    assert data[str(path.relative_to(mount["mountPath"]))] == PROBE.read_text()


@pytest.fixture
def tier_server(tmp_path):
    """A health server on a mutual-TLS port, as a tier runs one (NOT_SERVING until set), and its certificates."""
    files = make_certs(tmp_path, ("prefill",))
    server = make_server(1 << 20)
    health = add_health(server)
    tls = Tls.from_files(*files.for_tier("prefill"), files.ca)
    port = server.add_secure_port("localhost:0", tls.server_credentials())
    server.start()
    yield SimpleNamespace(server=server, health=health, address=f"localhost:{port}", files=files)
    server.stop(None)


def test_probe_script_answers_by_health_status(tier_server):
    """Readiness passes only on SERVING; liveness on any answer (a draining tier is alive); neither without
    the tier's certificate (the handshake is refused) or without a server."""
    files = tier_server.files
    tls = ["--tls", *map(str, files.for_tier("prefill")), str(files.ca), "--timeout-s", "2"]

    def probe(*extra: str) -> tuple[int, int]:  # (readiness, liveness) exit codes
        argv = [tier_server.address, *extra]
        return probe_module().main(argv), probe_module().main([*argv, "--alive"])

    assert probe(*tls) == (1, 0)  # loading: NOT_SERVING
    set_serving(tier_server.health, [])
    assert probe(*tls) == (0, 0)
    assert probe("--timeout-s", "2") == (1, 1)  # plaintext to a mutual-TLS port
    set_not_serving(tier_server.health, [])  # draining
    assert probe(*tls) == (1, 0)
    tier_server.server.stop(None)
    assert probe(*tls) == (1, 1)


def test_prefill_and_decode_agree_on_kv_layout(objects):
    prefill, decode = tier_args(objects, "prefill"), tier_args(objects, "decode")
    assert (prefill.block_size, prefill.kv_dtype) == (decode.block_size, decode.kv_dtype)


@pytest.mark.parametrize(("caller", "flag", "tier"),
                         [("gateway", "prefill", "prefill"), ("gateway", "decode", "decode"),
                          ("prefill", "decode", "decode")])
def test_dns_targets_name_the_tier_headless_service(objects, caller, flag, tier):
    """Every address the name resolves to is an instance: the name must be the tier's headless Service, and its
    port a Service port onto the tier's gRPC port."""
    [target] = getattr(tier_args(objects, caller), flag)
    name, port = DNS_TARGET.fullmatch(target).groups()
    service = named(objects, "Service")[name]
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["selector"]["app.kubernetes.io/component"] == tier
    assert service_target(service, int(port), pod_spec(objects, tier)) == tier_args(objects, tier).port
    # Starting and draining pods stay listed: the gateway health-checks each one; prefill keeps pushing KV to a
    # draining decode pod.
    assert service["spec"]["publishNotReadyAddresses"] is True


def test_readme_certificates_name_every_dns_target_and_secrets_hold_every_mounted_file(objects):
    commands = readme_commands()
    shown = [parse_command(c[1:]) for c in commands if c[0] == "pdserve"]  # each one a command pdserve takes
    certs = next(args for args in shown if args.command == "certs")
    names = {DNS_TARGET.fullmatch(t).group(1) for tier in TIERS for flag in ("prefill", "decode")
             for t in getattr(tier_args(objects, tier), flag, None) or []}
    assert names and names <= set(certs.host)
    created = {(c[c.index("generic") + 1], PurePosixPath(arg.split("=", 1)[1]).name)
               for c in commands if "secret" in c for arg in c if arg.startswith("--from-file=")}
    volumes = [volume for tier in TIERS for volume in pod_spec(objects, tier)["volumes"]]
    mounted = {(source["secret"]["name"], item["key"]) for volume in volumes
               for source in volume.get("projected", {}).get("sources", []) for item in source["secret"]["items"]}
    assert mounted <= created and ("pdserve-tls", "ca-key.pem") not in created | mounted


@pytest.mark.parametrize("tier", TIERS)
def test_tls_and_api_key_files_come_from_the_secrets(objects, tier):
    pod, c, args = pod_spec(objects, tier), container(objects, tier), tier_args(objects, tier)
    written = cert_files(PurePosixPath("/any"), TIERS)  # the file names `pdserve certs` writes
    cert, key = (path.name for path in written.for_tier(tier))
    assert secret_file(pod, c, args.tls_cert) == ("pdserve-tls", cert)
    assert secret_file(pod, c, args.tls_key) == ("pdserve-tls", key)
    assert secret_file(pod, c, args.tls_ca) == ("pdserve-tls", written.ca.name)
    if tier == "gateway":
        assert secret_file(pod, c, args.api_keys_file) == ("pdserve-api-keys", "api-keys.txt")


@pytest.mark.parametrize("tier", TIERS)
def test_grace_period_covers_the_drain(objects, tier):
    grace_s = pod_spec(objects, tier)["terminationGracePeriodSeconds"]
    drain_s = tier_args(objects, tier).drain_timeout_s
    assert drain_s + 5 <= grace_s <= drain_s + 60
    assert "lifecycle" not in container(objects, tier)  # no preStop: the tier drains on SIGTERM itself


def test_model_job_prepares_what_every_tier_loads_read_only(objects):
    job = named(objects, "Job")["pdserve-model-init"]["spec"]["template"]["spec"]
    [prepare] = job["containers"]
    model = PurePosixPath(parse_command(prepare["args"]).model)
    assert parse_command(prepare["args"]).command == "prepare-model"
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in job["volumes"]}
    assert any(claims[m["name"]] == "pdserve-models" and not m.get("readOnly") and model.is_relative_to(m["mountPath"])
               for m in prepare["volumeMounts"])
    assert "pdserve-models" in named(objects, "PersistentVolumeClaim")
    for tier in TIERS:
        pod = pod_spec(objects, tier)
        claims = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in pod["volumes"]}
        assert PurePosixPath(tier_args(objects, tier).model) == model
        for c in (container(objects, tier), *pod["initContainers"]):
            [mount] = [m for m in c["volumeMounts"] if claims[m["name"]] == "pdserve-models"]
            assert mount["readOnly"] and model.is_relative_to(mount["mountPath"])
        [wait] = pod["initContainers"]
        assert wait["command"][-1] == str(model)  # waits for the Job's model directory


def test_every_deployment_has_a_budget_and_exactly_one_autoscaler(objects):
    autoscalers = [*named(objects, "ScaledObject").values(), *named(objects, "HorizontalPodAutoscaler").values()]
    for name, deployment in named(objects, "Deployment").items():
        assert "replicas" not in deployment["spec"]  # the autoscaler owns the count
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        budgets = [b["spec"] for b in named(objects, "PodDisruptionBudget").values()
                   if selects(b["spec"]["selector"]["matchLabels"], labels)]
        assert len(budgets) == 1, f"{name}: {len(budgets)} disruption budgets"
        assert 1 in (budgets[0].get("maxUnavailable"), budgets[0].get("minAvailable")), name
        # two autoscalers on one Deployment (KEDA's and an HPA) would fight over its replica count
        assert len([a for a in autoscalers if a["spec"]["scaleTargetRef"]["name"] == name]) == 1, name


def test_autoscalers_read_series_the_tier_exports(objects):
    """A renamed metric or label would leave an autoscaler reading nothing: every series a KEDA query or a
    prometheus-adapter rule behind an HPA names is one the scaled tier serves, with those label values."""
    adapter = yaml.safe_load((K8S / "components" / "hpa" / "prometheus-adapter-values.yaml").read_text())
    rules = {rule["name"]["as"]: rule for rule in adapter["rules"]["custom"]}
    queries = []
    for obj in named(objects, "ScaledObject").values():
        queries += [(obj, t["metadata"]["query"]) for t in obj["spec"]["triggers"] if t["type"] == "prometheus"]
    for obj in named(objects, "HorizontalPodAutoscaler").values():
        rules_used = [rules[m["pods"]["metric"]["name"]] for m in obj["spec"]["metrics"] if m["type"] == "Pods"]
        queries += [(obj, f"{rule['seriesQuery']} {rule['metricsQuery']}") for rule in rules_used]
    assert queries
    for obj, query in queries:
        tier = obj["metadata"]["labels"]["app.kubernetes.io/component"]
        for series, matchers in re.findall(r"(pdserve_\w+)\{([^}]*)\}", query):
            assert series in exported_labels(tier), f"{tier} exports no {series}"
            for label, value in re.findall(r'(\w+)="([^"]*)"', matchers):
                exported = {**exported_labels(tier)[series], "namespace": obj["metadata"]["namespace"]}
                assert value == exported.get(label), f"{series}{{{matchers}}}"


def test_cpu_utilization_targets_have_cpu_requests(objects):
    """Utilization is of the CPU requested: without a request the autoscaler has nothing to divide by."""
    for obj in [*named(objects, "ScaledObject").values(), *named(objects, "HorizontalPodAutoscaler").values()]:
        triggers = [t["type"] for t in obj["spec"].get("triggers", [])]
        resources = [m["resource"]["name"] for m in obj["spec"].get("metrics", []) if m["type"] == "Resource"]
        if "cpu" in triggers + resources:
            tier = obj["metadata"]["labels"]["app.kubernetes.io/component"]
            assert container(objects, tier)["resources"]["requests"]["cpu"]


def test_gateway_holds_no_gpu(objects):
    assert "nvidia.com/gpu" not in container(objects, "gateway")["resources"].get("limits", {})
    assert "nodeSelector" not in pod_spec(objects, "gateway")


@pytest.mark.parametrize("tier", MODEL_TIERS)
def test_model_tier_holds_one_gpu_in_gpu_overlays_and_none_on_cpu(overlay, objects, tier):
    spec, c, args = pod_spec(objects, tier), container(objects, tier), tier_args(objects, tier)
    gpus = c["resources"].get("limits", {}).get("nvidia.com/gpu")
    if overlay.startswith("gpu"):
        assert args.device == "cuda" and gpus == 1 and spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    else:
        assert args.device == "cpu" and gpus is None
        assert 0 < args.threads <= float(c["resources"]["limits"]["cpu"])  # not a thread per core of the node

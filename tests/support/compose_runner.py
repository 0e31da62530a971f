"""Runs the effective services of compose.yaml (tests/support/compose_file.py) on a real Docker engine through
the Docker SDK, as `docker compose up` would: one bridge network where every replica answers to its service
name, named volumes, images built from each service's `build`, services started in `depends_on` order once
each dependency's condition holds (started, healthy, completed successfully), health checks, restart
policies, published ports and replicas. Compose's own CLI (the v2 plugin) is not packaged for these machines
and v1 is unmaintained, so the suite drives the engine itself; a key it does not implement is refused by name
rather than ignored, so what runs is what the file says.

Every object it makes carries the project's label and name prefix; `down()` removes them all."""

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import docker
from docker.types import EndpointConfig

SERVICE_KEYS = {"build", "image", "command", "entrypoint", "environment", "volumes", "ports", "depends_on",
                "healthcheck", "restart", "deploy", "user", "profiles"}
DEPLOY_KEYS = {"replicas"}
PROJECT_LABEL = "com.docker.compose.project"
SERVICE_LABEL = "com.docker.compose.service"
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_DURATION_S = {"ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def docker_engine(timeout_s: float) -> tuple[docker.DockerClient | None, str]:
    """(a client of the engine that answers, "") or (None, why none does)."""
    try:
        client = docker.from_env(timeout=timeout_s)
        client.ping()
    except docker.errors.DockerException as error:
        return None, f"no Docker engine answers ({error})"
    return client, ""


def duration_ns(text: str) -> int:
    """A compose duration ("10s", "1m30s", "500ms") in nanoseconds."""
    parts = _DURATION.findall(text)
    if not parts or "".join(a + b for a, b in parts) != text:
        raise ValueError(f"not a compose duration: {text!r}")
    return int(sum(float(amount) * _DURATION_S[unit] for amount, unit in parts) * 1e9)


def order_services(services: dict) -> list[str]:
    """Service names with every service after the services it depends on."""
    ordered: list[str] = []

    def visit(name: str, path: tuple[str, ...]) -> None:
        if name in path:
            raise ValueError(f"depends_on cycle: {' -> '.join((*path, name))}")
        if name not in ordered:
            for dependency in services[name].get("depends_on", {}):
                visit(dependency, (*path, name))
            ordered.append(name)

    for name in services:
        visit(name, ())
    return ordered


def check_supported(name: str, service: dict) -> None:
    unknown = set(service) - SERVICE_KEYS
    unknown |= {f"deploy.{key}" for key in set(service.get("deploy", {})) - DEPLOY_KEYS}
    if unknown:
        raise ValueError(f"service {name}: the test runner does not implement {sorted(unknown)}")


@dataclass
class ComposeProject:
    client: docker.DockerClient
    compose: dict  # load_compose(...)
    project: str
    root: Path  # where relative build contexts and bind mounts start
    scale: dict[str, int] = field(default_factory=dict)  # service -> replicas, as `--scale`
    host_ports: dict[str, dict[int, int]] = field(default_factory=dict)  # service -> {published: host port}
    log: Callable[[str], None] = print

    def __post_init__(self) -> None:
        for name, service in self.compose["services"].items():
            check_supported(name, service)

    @property
    def network_name(self) -> str:
        return f"{self.project}_default"

    def labels(self, **extra: str) -> dict[str, str]:
        return {PROJECT_LABEL: self.project, **extra}

    def build(self) -> list[str]:
        """Builds every distinct `build` once and tags it with the service's `image`; the tags built."""
        built: dict[tuple, str] = {}
        for name, service in self.compose["services"].items():
            spec = service.get("build")
            if spec is None:
                continue
            spec = {"context": spec} if isinstance(spec, str) else spec
            key = (spec["context"], spec.get("dockerfile", "Dockerfile"), tuple(sorted(spec.get("args", {}).items())))
            tag = service.get("image", f"{self.project}-{name}:latest")
            if key in built:
                assert built[key] == tag, f"{name} builds the same image as another service under another tag"
                continue
            started = time.monotonic()
            self.client.images.build(path=str(self.root / spec["context"]), dockerfile=spec.get("dockerfile"),
                                     buildargs=spec.get("args"), tag=tag, rm=True, forcerm=True,
                                     labels=self.labels())
            self.log(f"built {tag} in {time.monotonic() - started:.0f} s")
            built[key] = tag
        return list(built.values())

    def up(self, timeout_s: float) -> None:
        """Creates the network and volumes, then starts every service once its dependencies are ready."""
        self.client.networks.create(self.network_name, driver="bridge", labels=self.labels())
        for volume in self.compose.get("volumes", {}):
            self.client.volumes.create(f"{self.project}_{volume}", labels=self.labels())
        deadline = time.monotonic() + timeout_s
        services = self.compose["services"]
        for name in order_services(services):
            for dependency, condition in services[name].get("depends_on", {}).items():
                self.wait_for(dependency, condition["condition"], deadline)
            for number in range(1, self.replicas(name) + 1):
                self.start(name, number)

    def replicas(self, name: str) -> int:
        return self.scale.get(name, self.compose["services"][name].get("deploy", {}).get("replicas", 1))

    def start(self, name: str, number: int) -> None:
        service = self.compose["services"][name]
        endpoint = EndpointConfig(self.client.api._version, aliases=[name])
        container = self.client.containers.create(
            service["image"], name=f"{self.project}-{name}-{number}", command=service.get("command"),
            entrypoint=service.get("entrypoint"), environment=service.get("environment"),
            user=service.get("user"), labels=self.labels(**{SERVICE_LABEL: name}),
            network=self.network_name, networking_config={self.network_name: endpoint},
            mounts=[self.mount(spec) for spec in service.get("volumes", [])],
            ports=self.ports(name, service.get("ports", [])), healthcheck=self.healthcheck(service),
            restart_policy=self.restart_policy(service.get("restart", "no")))
        container.start()
        self.log(f"started {container.name}")

    def mount(self, spec: str) -> docker.types.Mount:
        source, target, *mode = spec.split(":")
        read_only = mode == ["ro"]
        if source.startswith((".", "/")):
            return docker.types.Mount(target, str((self.root / source).resolve()), type="bind", read_only=read_only)
        return docker.types.Mount(target, f"{self.project}_{source}", type="volume", read_only=read_only)

    def ports(self, name: str, specs: list) -> dict:
        bound = {}
        for spec in specs:
            published, target = (int(part) for part in str(spec).split(":"))
            bound[f"{target}/tcp"] = ("127.0.0.1", self.host_ports.get(name, {}).get(published, published))
        return bound

    @staticmethod
    def healthcheck(service: dict) -> dict | None:
        check = service.get("healthcheck")
        if check is None:
            return None
        return {"test": check["test"], "retries": check.get("retries", 3),
                **{key: duration_ns(check[key]) for key in ("interval", "timeout", "start_period") if key in check}}

    @staticmethod
    def restart_policy(restart: str) -> dict | None:
        if restart == "no":
            return None
        if restart not in ("always", "unless-stopped", "on-failure"):
            raise ValueError(f"restart: {restart!r} is not a compose restart policy")
        return {"Name": restart}

    def containers(self, name: str | None = None) -> list:
        filters = {"label": [f"{PROJECT_LABEL}={self.project}"] + ([f"{SERVICE_LABEL}={name}"] if name else [])}
        return sorted(self.client.containers.list(all=True, filters=filters), key=lambda c: c.name)

    def state(self, name: str) -> list[dict]:
        return [c.attrs["State"] for c in self.containers(name)]

    def wait_for(self, name: str, condition: str, deadline: float) -> None:
        """Until every replica of `name` meets a depends_on condition; a one-shot that fails is reported."""
        while time.monotonic() < deadline:
            states = self.state(name)
            if condition == "service_completed_successfully":
                failed = [s for s in states if s["Status"] == "exited" and s["ExitCode"] != 0]
                if failed:
                    raise RuntimeError(f"{name} exited with {failed[0]['ExitCode']}:\n{self.logs(name)}")
                if states and all(s["Status"] == "exited" for s in states):
                    return
            elif condition == "service_healthy":
                if states and all(s.get("Health", {}).get("Status") == "healthy" for s in states):
                    return
            elif condition == "service_started":
                if states and all(s["Status"] == "running" for s in states):
                    return
            else:
                raise ValueError(f"depends_on condition {condition!r} is not a compose condition")
            time.sleep(1)
        raise TimeoutError(f"{name} did not reach {condition} in time:\n{self.logs(name)}")

    def logs(self, name: str, tail: int = 40) -> str:
        return "\n".join(f"--- {c.name}\n{c.logs(tail=tail).decode(errors='replace')}" for c in self.containers(name))

    def down(self, remove_images: bool = False) -> None:
        """Removes every container, network and volume of the project (and, if asked, the images it built)."""
        selector = {"label": f"{PROJECT_LABEL}={self.project}"}
        for container in self.client.containers.list(all=True, filters=selector):
            container.remove(force=True, v=True)
        for network in self.client.networks.list(filters=selector):
            network.remove()
        for volume in self.client.volumes.list(filters=selector):
            volume.remove(force=True)
        if remove_images:
            tags = {s["image"] for s in self.compose["services"].values() if "build" in s}
            for tag in tags:
                self.client.images.remove(tag, force=True)

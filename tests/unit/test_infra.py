"""The deployment files hold together without a container engine: every YAML parses, every variable given to the
app is a setting it reads, every command is one `python -m app` accepts, probes hit routes the app serves, and the
Dockerfile keeps to its rules (named stages, pinned bases, a non-root user, exec-form entrypoint)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]
from litestar.routes import HTTPRoute

from app.__main__ import build_parser
from app.main import create_app
from app.settings import Settings

INFRA = Path(__file__).resolve().parents[2] / "infra"
YAML_FILES = sorted([*INFRA.rglob("*.yaml"), *INFRA.rglob("*.yml")])
APP_IMAGE = "clinic-backend"
SETTING_NAMES = frozenset(field.upper() for field in Settings.__struct_fields__)  # as settings_from_env reads them
DEFAULTS = Settings()
WORKLOADS = ("Deployment", "StatefulSet", "DaemonSet", "Job")


def subcommands() -> set[str]:
    action = next(a for a in build_parser()._actions if a.dest == "command")
    return set(action.choices)  # type: ignore[arg-type]


def load(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def manifests() -> list[dict[str, Any]]:
    return [doc for path in sorted((INFRA / "k8s").glob("*.yaml")) for doc in load(path)]


def of_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for doc in manifests() if doc.get("kind") == kind]


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = workload["spec"]["template"]["spec"]
    return spec


def app_containers() -> list[tuple[str, dict[str, Any]]]:
    return [(w["metadata"]["name"], c) for w in manifests() if w.get("kind") in WORKLOADS
            for c in pod_spec(w)["containers"] if APP_IMAGE in c["image"]]


@pytest.fixture(scope="module")
def app_routes(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    """GET paths the API serves, from the app's own route table."""
    settings = Settings(data_dir=str(tmp_path_factory.mktemp("infra")), jwt_keys="k1=" + "x" * 40,
                        secret_key="s" * 40)
    return {r.path for r in create_app(settings).routes if isinstance(r, HTTPRoute) and "GET" in r.methods}


# --- every file -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", YAML_FILES, ids=[str(p.relative_to(INFRA)) for p in YAML_FILES])
def test_every_yaml_parses(path: Path) -> None:
    docs = load(path)
    assert docs
    assert all(isinstance(doc, dict) for doc in docs)


def test_the_deployment_is_complete() -> None:
    assert {p.name for p in YAML_FILES} >= {"compose.yaml"}
    kinds = {(d["kind"], d["metadata"]["name"]) for d in manifests()}
    names_by_kind: dict[str, set[str]] = {}
    for kind, name in kinds:
        names_by_kind.setdefault(kind, set()).add(name)
    commands = {c.get("args", [None])[0] for _, c in app_containers()}
    assert commands >= {"serve", "worker", "sfu", "migrate"}
    for kind in ("Deployment", "Service", "Ingress", "ConfigMap", "Secret", "PodDisruptionBudget", "Job"):
        assert names_by_kind.get(kind), f"no {kind} in infra/k8s"


# --- compose --------------------------------------------------------------------------------------------------

def compose() -> dict[str, Any]:
    doc: dict[str, Any] = load(INFRA / "compose.yaml")[0]
    return doc


def app_services() -> dict[str, dict[str, Any]]:
    return {name: s for name, s in compose()["services"].items()
            if APP_IMAGE in str(s.get("image", "")) or "build" in s}


def test_compose_runs_every_process() -> None:
    services = compose()["services"]
    assert {"postgres", "redis", "seaweedfs", "coturn", "nginx"} <= set(services)
    commands = sorted(s["command"][0] for s in app_services().values())
    assert commands.count("serve") == 2, "two API replicas behind nginx"
    assert {"worker", "sfu", "migrate"} <= set(commands)


def test_compose_gives_the_app_only_real_settings() -> None:
    for name, service in app_services().items():
        env = service.get("environment") or {}
        names = set(env) if isinstance(env, dict) else {item.split("=", 1)[0] for item in env}
        assert names - SETTING_NAMES == set(), f"{name}: not settings of app/settings.py"


def test_compose_commands_are_real_subcommands() -> None:
    for name, service in app_services().items():
        command = service["command"]
        command = shlex.split(command) if isinstance(command, str) else command
        assert command[0] in subcommands(), f"{name}: python -m app {command[0]}"


def test_compose_mounts_files_that_exist() -> None:
    for name, service in compose()["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("."):
                assert (INFRA / source).is_file(), f"{name} mounts a missing {source}"


def test_compose_healthchecks_hit_real_routes(app_routes: set[str]) -> None:
    for name, service in app_services().items():
        check = " ".join(service.get("healthcheck", {}).get("test", []))
        for path in re.findall(r"http://[^/\s'\"]+(/[^\s'\"]*)", check):
            assert path in app_routes, f"{name}'s healthcheck asks for {path}"


def test_the_migrate_service_runs_once_before_the_app() -> None:
    services = app_services()
    migrate = next(name for name, s in services.items() if s["command"][0] == "migrate")
    assert services[migrate]["restart"] == "no"
    for name, service in services.items():
        if service["command"][0] in ("serve", "worker"):
            assert service["depends_on"][migrate]["condition"] == "service_completed_successfully", name


# --- nginx ----------------------------------------------------------------------------------------------------

def seconds(value: str) -> float:
    number, unit = re.fullmatch(r"(\d+)(ms|s|m|h)?", value).groups()  # type: ignore[union-attr]
    return float(number) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 1}[unit]


def size_bytes(value: str) -> int:
    number, unit = re.fullmatch(r"(\d+)([kKmMgG])?", value).groups()  # type: ignore[union-attr]
    return int(number) * {None: 1, "k": 1024, "m": 1024**2, "g": 1024**3}[unit.lower() if unit else None]


def test_nginx_upgrades_sockets_and_outlasts_the_heartbeat() -> None:
    conf = (INFRA / "nginx" / "nginx.conf").read_text()
    directives = dict(re.findall(r"^\s*(\w+) ([^;{]+);", conf, re.MULTILINE))
    assert directives["proxy_http_version"] == "1.1"
    assert re.search(r"proxy_set_header Upgrade \$http_upgrade;", conf)
    assert re.search(r"proxy_set_header Connection \$connection_upgrade;", conf)
    assert re.search(r"map \$http_upgrade \$connection_upgrade", conf)
    for timeout in ("proxy_read_timeout", "proxy_send_timeout"):
        assert seconds(directives[timeout]) > DEFAULTS.ws_heartbeat_seconds, timeout
    assert size_bytes(directives["client_max_body_size"]) >= DEFAULTS.document_max_bytes


def test_nginx_balances_the_api_replicas_of_compose() -> None:
    conf = (INFRA / "nginx" / "nginx.conf").read_text()
    upstreams = set(re.findall(r"^\s*server (\w[\w-]*):(\d+)", conf, re.MULTILINE))
    api = {(name, "8000") for name, s in app_services().items() if s["command"][0] == "serve"}
    assert upstreams == api


# --- Kubernetes -----------------------------------------------------------------------------------------------

def test_configmap_and_secret_hold_only_settings() -> None:
    for doc in [*of_kind("ConfigMap"), *of_kind("Secret")]:
        keys = set(doc.get("data") or {}) | set(doc.get("stringData") or {})
        assert keys, doc["metadata"]["name"]
        assert keys - SETTING_NAMES == set(), doc["metadata"]["name"]


def test_app_containers_get_only_settings_from_existing_sources() -> None:
    configmaps = {d["metadata"]["name"] for d in of_kind("ConfigMap")}
    secrets = {d["metadata"]["name"] for d in of_kind("Secret")}
    for workload, container in app_containers():
        names = {item["name"] for item in container.get("env", [])}
        assert names - SETTING_NAMES == set(), f"{workload}: not settings of app/settings.py"
        for source in container.get("envFrom", []):
            if "configMapRef" in source:
                assert source["configMapRef"]["name"] in configmaps, workload
            if "secretRef" in source:
                assert source["secretRef"]["name"] in secrets, workload


def test_app_containers_run_real_subcommands_through_the_entrypoint() -> None:
    for workload, container in app_containers():
        assert "command" not in container, f"{workload} overrides the image's ENTRYPOINT"
        assert container["args"][0] in subcommands(), f"{workload}: python -m app {container['args'][0]}"


def test_probes_hit_real_routes_on_declared_ports(app_routes: set[str]) -> None:
    probed = set()
    for workload, container in app_containers():
        ports = {p.get("name") for p in container.get("ports", [])} | {p["containerPort"] for p in
                                                                      container.get("ports", [])}
        for kind in ("readinessProbe", "livenessProbe", "startupProbe"):
            probe = container.get(kind)
            if probe is None:
                continue
            check = probe.get("httpGet") or probe.get("tcpSocket")
            assert check is not None, f"{workload} {kind}"
            assert check["port"] in ports, f"{workload} {kind} probes an undeclared port"
            if "httpGet" in probe:
                assert probe["httpGet"]["path"] in app_routes, f"{workload} {kind}"
                probed.add((workload, kind, probe["httpGet"]["path"]))
    api = next(w["metadata"]["name"] for w in of_kind("Deployment")
               if pod_spec(w)["containers"][0].get("args") == ["serve"])
    assert (api, "readinessProbe", "/health/ready") in probed
    assert (api, "livenessProbe", "/health/live") in probed


def test_the_sfu_binds_its_udp_range_on_the_node() -> None:
    sfu = [w for w in of_kind("Deployment") if pod_spec(w)["containers"][0].get("args") == ["sfu"]]
    assert len(sfu) == 1
    spec = pod_spec(sfu[0])
    assert spec["hostNetwork"] is True
    assert spec["dnsPolicy"] == "ClusterFirstWithHostNet"
    env = {item["name"]: item for item in spec["containers"][0]["env"]}
    assert re.fullmatch(r"\d+-\d+", env["RTC_UDP_PORTS"]["value"])
    assert "RTC_HOST_ADDRESSES" in env
    assert "SFU_PUBLIC_URL" in env


def labels_match(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_services_pdbs_and_ingress_point_at_what_exists() -> None:
    pod_labels = [w["spec"]["template"]["metadata"]["labels"] for w in of_kind("Deployment")]
    for doc in [*of_kind("Service"), *of_kind("PodDisruptionBudget")]:
        selector = doc["spec"]["selector"]
        selector = selector.get("matchLabels", selector)
        assert any(labels_match(selector, labels) for labels in pod_labels), doc["metadata"]["name"]
    services = {d["metadata"]["name"]: d for d in of_kind("Service")}
    for ingress in of_kind("Ingress"):
        for rule in ingress["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                backend = path["backend"]["service"]
                ports = {p.get("name") for p in services[backend["name"]]["spec"]["ports"]}
                assert backend["port"].get("name") in ports


def test_ingress_keeps_sockets_past_the_heartbeat_and_takes_uploads() -> None:
    for ingress in of_kind("Ingress"):
        notes = ingress["metadata"]["annotations"]
        for timeout in ("proxy-read-timeout", "proxy-send-timeout"):
            assert float(notes[f"nginx.ingress.kubernetes.io/{timeout}"]) > DEFAULTS.ws_heartbeat_seconds
        body = notes["nginx.ingress.kubernetes.io/proxy-body-size"]
        assert size_bytes(body) >= DEFAULTS.document_max_bytes


def test_pods_run_as_non_root() -> None:
    for workload in manifests():
        if workload.get("kind") in WORKLOADS:
            security = pod_spec(workload).get("securityContext", {})
            assert security.get("runAsNonRoot") is True, workload["metadata"]["name"]
            assert security.get("runAsUser", 0) != 0, workload["metadata"]["name"]


# --- Dockerfile -----------------------------------------------------------------------------------------------

def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", (INFRA / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def test_dockerfile_stages_are_named_and_pinned() -> None:
    stages = [args for op, args in instructions() if op == "FROM"]
    assert len(stages) >= 2, "multi-stage"
    for args in stages:
        match = re.fullmatch(r"(\S+) AS (\S+)", args, re.IGNORECASE)
        assert match, f"unnamed stage: FROM {args}"
        image = match.group(1)
        assert ":" in image.rsplit("/", 1)[-1], f"unpinned: {image}"
        assert not image.endswith(":latest"), f"unpinned: {image}"
    assert re.match(r"python:3\.11-slim\b", stages[-1])


def test_dockerfile_copies_only_from_earlier_stages_and_adds_no_urls() -> None:
    named: list[str] = []
    for op, args in instructions():
        if op == "FROM":
            named.append(args.split()[-1].lower())
        if op == "COPY":
            for source in re.findall(r"--from=(\S+)", args):
                assert source.lower() in named[:-1], f"COPY --from={source}: no such earlier stage"
        assert not (op == "ADD" and re.search(r"\bhttps?://", args)), "ADD of a URL"


def test_dockerfile_runs_as_non_root_through_an_exec_form_entrypoint() -> None:
    ops = instructions()
    last = max(i for i, (op, _) in enumerate(ops) if op == "FROM")
    users = [args for op, args in ops[last:] if op == "USER"]
    assert users, "the last stage sets no USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")
    entrypoints = [args for op, args in ops[last:] if op == "ENTRYPOINT"]
    assert entrypoints, "no ENTRYPOINT"
    assert yaml.safe_load(entrypoints[-1]) == ["python", "-m", "app"], "ENTRYPOINT in exec form"
    cmd = [args for op, args in ops[last:] if op == "CMD"]
    assert not cmd or yaml.safe_load(cmd[-1])[0] in subcommands()


def test_dockerfile_env_sets_only_settings_besides_the_interpreters_own() -> None:
    for op, args in instructions():
        if op == "ENV":
            for name in re.findall(r"(?:^|\s)([A-Za-z_][A-Za-z0-9_]*)=", args):
                if name == "PATH" or name.startswith(("PYTHON", "PIP_")):
                    continue  # the interpreter's and pip's own
                assert name in SETTING_NAMES, f"ENV {name} is not a setting of app/settings.py"

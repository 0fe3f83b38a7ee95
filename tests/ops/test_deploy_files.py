"""Static checks of deploy/: everything parses, and each file passes the linter of its kind.

No server needed; the live checks (Prometheus scraping, dashboard queries, gateway) are in
test_monitoring.py and test_gateway.py.
"""
from __future__ import annotations

import importlib.util
import json
import subprocess

import pytest
import yaml

from .conftest import DEPLOY, REPO, need_tool

YAMLS = sorted(p for ext in ("*.yaml", "*.yml") for p in DEPLOY.rglob(ext))
JSONS = sorted(DEPLOY.rglob("*.json"))
K8S = sorted((DEPLOY / "k8s").glob("*.yaml"))


def load_script(path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(*cmd: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def test_deploy_has_the_expected_files():
    # Guards the globs below against testing nothing after a move.
    assert len(YAMLS) >= 12 and len(JSONS) >= 1 and len(K8S) >= 6


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_yaml_parses(path):
    docs = list(yaml.safe_load_all(path.read_text()))
    assert docs and all(isinstance(d, dict) for d in docs), f"{path}: expected mapping documents"


@pytest.mark.parametrize("path", JSONS, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_json_parses(path):
    assert isinstance(json.loads(path.read_text()), dict)


def test_prometheus_config_passes_promtool():
    r = run(need_tool("promtool"), "check", "config", str(DEPLOY / "prometheus" / "prometheus.yml"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 rule files found" in r.stdout + r.stderr  # rules.yml was found and checked too


def test_prometheus_rules_pass_promtool():
    r = run(need_tool("promtool"), "check", "rules", str(DEPLOY / "prometheus" / "rules.yml"))
    assert r.returncode == 0, r.stdout + r.stderr


def test_alert_rules_pass_their_unit_tests():
    """promtool's rule unit tests: no alert on one malformed request or one lone error, alerts on
    sustained failures, rejections and brownout (deploy/prometheus/rules_test.yml)."""
    r = run(need_tool("promtool"), "test", "rules", str(DEPLOY / "prometheus" / "rules_test.yml"))
    assert r.returncode == 0 and "SUCCESS" in r.stdout + r.stderr, r.stdout + r.stderr


def test_compose_publishes_only_the_gateway():
    """Everything reaches phds-serve through the gateway (which adds the tier and the shared secret);
    the monitoring UIs listen on the host's loopback only."""
    services = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]
    assert "ports" not in services["phds-serve"]
    assert services["gateway"]["ports"] == ["8080:8080"]
    for name, svc in services.items():
        if name != "gateway":
            assert all(str(p).startswith("127.0.0.1:") for p in svc.get("ports", [])), name
    for name in ("phds-serve", "gateway"):
        assert services[name]["environment"]["PHDS_TIER_SECRET"].startswith("${PHDS_TIER_SECRET:?")
    template = (DEPLOY / "gateway" / "templates" / "gateway-secret.conf.template").read_text()
    assert "${PHDS_TIER_SECRET}" in template
    assert "./gateway/templates:/etc/nginx/templates:ro" in services["gateway"]["volumes"]
    gpu = yaml.safe_load((DEPLOY / "compose.gpu.yaml").read_text())["services"]
    assert all("ports" not in svc for svc in gpu.values())


def test_prometheusrule_matches_rules_file():
    """The Operator's PrometheusRule must carry the same rules as the compose stack's rules.yml."""
    rules = yaml.safe_load((DEPLOY / "prometheus" / "rules.yml").read_text())
    text = (DEPLOY / "k8s" / "prometheusrule.yaml").read_text()
    crd = yaml.safe_load(text)
    assert crd["kind"] == "PrometheusRule" and crd["spec"] == rules
    assert text == load_script(DEPLOY / "k8s" / "make_prometheusrule.py").render(), \
        "regenerate: python deploy/k8s/make_prometheusrule.py"


def test_dashboard_json_is_generated_from_script():
    committed = (DEPLOY / "grafana" / "dashboards" / "phds-serve.json").read_text()
    assert load_script(DEPLOY / "grafana" / "make_dashboard.py").render() == committed, \
        "regenerate: python deploy/grafana/make_dashboard.py"


def test_grafana_provisioning_points_at_the_dashboard_and_prometheus():
    ds = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yaml").read_text())
    assert ds["datasources"][0]["type"] == "prometheus"
    assert ds["datasources"][0]["url"] == "http://prometheus:9090"
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    mounts = compose["services"]["grafana"]["volumes"]
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/phds-serve.yaml").read_text())
    path = provider["providers"][0]["options"]["path"]
    assert f"./grafana/dashboards:{path}:ro" in mounts
    assert "./grafana/provisioning:/etc/grafana/provisioning:ro" in mounts


def test_compose_files_match_the_compose_spec():
    r = run(need_tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec",
            str(DEPLOY / "compose.yaml"), str(DEPLOY / "compose.gpu.yaml"))
    assert r.returncode == 0, r.stdout + r.stderr


def test_compose_builds_from_repo_root_with_existing_dockerfiles():
    for name in ("compose.yaml", "compose.gpu.yaml"):
        build = yaml.safe_load((DEPLOY / name).read_text())["services"]["phds-serve"]["build"]
        assert (DEPLOY / build["context"]).resolve() == REPO
        assert (REPO / build["dockerfile"]).is_file()


def test_dockerfiles_pass_hadolint():
    files = sorted(str(p) for p in (DEPLOY / "docker").glob("Dockerfile.*") if p.suffix != ".dockerignore")
    assert len(files) == 2
    r = run(need_tool("hadolint"), *files)
    assert r.returncode == 0, r.stdout + r.stderr


def test_dockerfiles_use_the_intended_bases_and_entrypoint():
    cuda = (DEPLOY / "docker" / "Dockerfile.cuda").read_text()
    cpu = (DEPLOY / "docker" / "Dockerfile.cpu").read_text()
    assert "FROM vllm/vllm-openai:" in cuda and '".[gpu]"' in cuda
    assert '".[cpu]"' in cpu and "torchvision torchaudio torchcodec" in cpu
    for text in (cuda, cpu):
        assert 'ENTRYPOINT ["phds-serve"' in text


def test_kubernetes_manifests_validate_strictly():
    r = run(need_tool("kubernetes-validate"), "--strict", *map(str, K8S), timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    # Core kinds are checked against the Kubernetes schema; CRDs (ServiceMonitor, PrometheusRule) only parse.
    for kind in ("deployment", "service", "horizontalpodautoscaler"):
        assert f"passed for resource {kind}/phds-serve" in r.stdout + r.stderr


def test_kubernetes_deployment_requests_gpu_and_probes_vllm_health():
    dep = yaml.safe_load((DEPLOY / "k8s" / "deployment.yaml").read_text())
    c = dep["spec"]["template"]["spec"]["containers"][0]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"]["path"] == "/health"
    kust = yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text())
    assert sorted(kust["resources"]) == sorted(p.name for p in K8S if p.name != "kustomization.yaml")
    # The multi-GPU overlay patches args by index: it must hit the tensor-parallel flag.
    assert c["args"][4].startswith("--tensor-parallel-size=")

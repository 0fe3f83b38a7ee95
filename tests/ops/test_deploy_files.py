"""Static checks of deploy/: everything parses, and each file passes the linter of its kind.

No server needed; the live checks (Prometheus scraping, dashboard queries, gateway) are in
test_monitoring.py and test_gateway.py.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest
import yaml

from ..scripts import load_script
from .conftest import DEPLOY, KEY_FILE, REPO, TIER_FILE, need_tool

YAMLS = sorted(p for ext in ("*.yaml", "*.yml") for p in DEPLOY.rglob(ext))
JSONS = sorted(DEPLOY.rglob("*.json"))
K8S = sorted((DEPLOY / "k8s" / "base").glob("*.yaml"))


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


def rule_files(tmp_path):
    """Both shipped rule files as promtool reads them: rules.yml, and the groups of the generated
    PrometheusRule (written out next to a copy of rules_test.yml that points at them)."""
    crd = yaml.safe_load((DEPLOY / "k8s" / "base" / "prometheusrule.yaml").read_text())
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(crd["spec"]))
    tests = yaml.safe_load((DEPLOY / "prometheus" / "rules_test.yml").read_text())
    assert tests["rule_files"] == ["rules.yml"]
    (tmp_path / "rules_test.yml").write_text(yaml.safe_dump(tests))
    return {"rules.yml": DEPLOY / "prometheus", "k8s/base/prometheusrule.yaml": tmp_path}


@pytest.mark.parametrize("which", ["rules.yml", "k8s/base/prometheusrule.yaml"])
def test_prometheus_rules_pass_promtool(which, tmp_path):
    folder = rule_files(tmp_path)[which]
    r = run(need_tool("promtool"), "check", "rules", str(folder / "rules.yml"))
    assert r.returncode == 0 and "SUCCESS" in r.stdout + r.stderr, r.stdout + r.stderr


@pytest.mark.parametrize("which", ["rules.yml", "k8s/base/prometheusrule.yaml"])
def test_alert_rules_pass_their_unit_tests(which, tmp_path):
    """promtool's rule unit tests: no alert on one malformed request or one lone error, alerts on
    sustained failures, rejections (naming the instance) and brownout (deploy/prometheus/rules_test.yml)."""
    folder = rule_files(tmp_path)[which]
    r = run(need_tool("promtool"), "test", "rules", str(folder / "rules_test.yml"))
    assert r.returncode == 0 and "SUCCESS" in r.stdout + r.stderr, r.stdout + r.stderr


def test_every_alert_summary_names_only_labels_its_expression_keeps():
    """An annotation's {{ $labels.x }} prints nothing when the expression aggregates x away (the
    PhdsServeRejections summary once read "requests to  are rejected")."""
    rules = yaml.safe_load((DEPLOY / "prometheus" / "rules.yml").read_text())
    alerts = [r for g in rules["groups"] for r in g["rules"] if "alert" in r]
    assert len(alerts) >= 5
    for rule in alerts:
        expr, used = rule["expr"], set(re.findall(r"\$labels\.(\w+)", json.dumps(rule["annotations"])))
        unlabelled = re.findall(r"\b(?:sum|max|min|avg|count)\s*\(", expr)  # an aggregation without "by"
        assert not unlabelled, f"{rule['alert']}: aggregates every label away: {expr}"
        if "by (" not in expr:
            continue  # no aggregation: the series' own labels stay
        kept = {x.strip() for labels in re.findall(r"by \(([^)]*)\)", expr) for x in labels.split(",")}
        assert used <= kept, f"{rule['alert']}: the annotation uses {used - kept}, aggregated away"


def test_compose_publishes_only_the_gateway():
    """Everything reaches phds-serve through the gateway; the monitoring UIs listen on the host's
    loopback only."""
    services = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]
    assert "ports" not in services["phds-serve"]
    assert services["gateway"]["ports"] == ["8080:8080"]
    for name, svc in services.items():
        if name != "gateway":
            assert all(str(p).startswith("127.0.0.1:") for p in svc.get("ports", [])), name
    assert "./gateway/templates:/etc/nginx/templates:ro" in services["gateway"]["volumes"]
    gpu = yaml.safe_load((DEPLOY / "compose.gpu.yaml").read_text())["services"]
    assert all("ports" not in svc for svc in gpu.values())
    # docker stop waits longer than phds-serve drains in-flight requests (default --shutdown-timeout).
    from phds_serve.server.cli import SHUTDOWN_TIMEOUT_S
    assert int(services["phds-serve"]["stop_grace_period"].removesuffix("s")) > SHUTDOWN_TIMEOUT_S
    dep = yaml.safe_load((DEPLOY / "k8s" / "base" / "deployment.yaml").read_text())
    assert dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > SHUTDOWN_TIMEOUT_S


def shipped_server_args() -> dict[str, list[str]]:
    """phds-serve's arguments in every shipped deployment."""
    base = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]["phds-serve"]["command"]
    gpu = yaml.safe_load((DEPLOY / "compose.gpu.yaml").read_text())["services"]["phds-serve"]["command"]
    dep = yaml.safe_load((DEPLOY / "k8s" / "base" / "deployment.yaml").read_text())
    k8s = dep["spec"]["template"]["spec"]["containers"][0]["args"]
    return {"compose": base, "compose.gpu": gpu, "k8s": k8s}


@pytest.mark.parametrize("name", ["compose", "compose.gpu", "k8s"])
def test_every_deployment_makes_a_keys_tier_a_ceiling(name):
    """Tiers are reachable (from API keys), only known keys get in, a tier is a ceiling on k, and
    brownout is on (objectives, and tiers with a range)."""
    args = shipped_server_args()[name]
    for flag in ("--binding-tiers", "--require-api-key"):
        assert flag in args, (name, flag)
    assert any(a.startswith("--api-key-tiers=") for a in args), name
    assert any(a.startswith(("--slo-ttft-ms=", "--slo-itl-ms=")) for a in args), name
    assert not any(a.startswith(("--tier-secret", "--trusted-proxies")) for a in args), name
    assert "--enable-expert-parallel" not in args, name  # an option, not the default (no k savings)


def test_one_source_for_tier_names():
    """The gateway names no tier; keys name only configured tiers, in every deployment."""
    for path in (DEPLOY / "gateway").rglob("*"):
        if path.is_file():
            text = path.read_text()
            for tier in TIER_FILE:
                assert tier not in text.lower(), f"{path} names tier {tier!r}: tiers live in deploy/phds/"
    assert set(KEY_FILE.values()) <= set(TIER_FILE)
    gpu_tiers = yaml.safe_load((DEPLOY / "phds" / "tiers.gpu.yaml").read_text())["tiers"]
    assert set(KEY_FILE.values()) <= set(gpu_tiers)
    k8s_keys = yaml.safe_load((DEPLOY / "k8s" / "base" / "api-keys.demo.yml").read_text())["keys"]
    k8s_tiers = next(a for a in shipped_server_args()["k8s"] if a.startswith("--tiers="))
    assert {t.split("=")[0] for t in k8s_tiers.removeprefix("--tiers=").split(",")} >= set(k8s_keys.values())


def test_prometheusrule_matches_rules_file():
    """The Operator's PrometheusRule must carry the same rules as the compose stack's rules.yml."""
    rules = yaml.safe_load((DEPLOY / "prometheus" / "rules.yml").read_text())
    text = (DEPLOY / "k8s" / "base" / "prometheusrule.yaml").read_text()
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
    dep = yaml.safe_load((DEPLOY / "k8s" / "base" / "deployment.yaml").read_text())
    c = dep["spec"]["template"]["spec"]["containers"][0]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"]["path"] == "/health"
    kust = yaml.safe_load((DEPLOY / "k8s" / "base" / "kustomization.yaml").read_text())
    assert sorted(kust["resources"]) == sorted(p.name for p in K8S if p.name != "kustomization.yaml")


def test_multi_gpu_overlay_patches_by_name():
    """The overlay sets the tensor-parallel size through the container's environment variable (a
    strategic-merge patch keyed by name), never by an argument's position."""
    text = (DEPLOY / "k8s" / "multi-gpu" / "kustomization.yaml").read_text()
    assert "/args/" not in text and "op: replace" not in text
    dep = yaml.safe_load((DEPLOY / "k8s" / "base" / "deployment.yaml").read_text())
    c = dep["spec"]["template"]["spec"]["containers"][0]
    assert "--tensor-parallel-size=$(PHDS_TENSOR_PARALLEL_SIZE)" in c["args"]
    assert {"name": "PHDS_TENSOR_PARALLEL_SIZE", "value": "1"} in c["env"]


def kustomize(path) -> list[dict]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed (it renders kustomizations offline)")
    r = run(kubectl, "kustomize", str(path))
    assert r.returncode == 0, r.stderr
    return list(yaml.safe_load_all(r.stdout))


@pytest.mark.parametrize("overlay,gpus", [("k8s", 1), ("k8s/multi-gpu", 2)])
def test_kustomize_renders_each_layout(overlay, gpus):
    """`kubectl apply -k deploy/k8s[/multi-gpu]` as documented: it renders, the tensor-parallel size
    equals the GPU count, and the API-key Secret the pod mounts is generated."""
    docs = {d["kind"]: d for d in kustomize(DEPLOY / overlay)}
    c = docs["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["PHDS_TENSOR_PARALLEL_SIZE"] == str(gpus)
    assert c["resources"]["limits"]["nvidia.com/gpu"] == gpus == c["resources"]["requests"]["nvidia.com/gpu"]
    assert "--enable-expert-parallel" not in c["args"]
    volumes = {v["name"]: v for v in docs["Deployment"]["spec"]["template"]["spec"]["volumes"]}
    assert volumes["api-keys"]["secret"]["secretName"] == docs["Secret"]["metadata"]["name"]


def test_error_ratio_panel_counts_what_the_error_alert_counts():
    """The dashboard's "Error ratio by k" and PhdsServeErrors select the same outcomes (server-side
    errors), so a red panel and a firing alert mean the same thing."""
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "phds-serve.json").read_text())
    [panel] = [p for p in dashboard["panels"] if p.get("title") == "Error ratio by k"]
    [target] = panel["targets"]
    rules = yaml.safe_load((DEPLOY / "prometheus" / "rules.yml").read_text())
    [alert] = [r for g in rules["groups"] for r in g["rules"] if r.get("alert") == "PhdsServeErrors"]
    outcomes = re.compile(r'outcome\s*(=~|!=|=)\s*"([^"]*)"')
    assert set(outcomes.findall(target["expr"])) == set(outcomes.findall(alert["expr"])) == {("=", "error")}

"""Write prometheusrule.yaml: deploy/prometheus/rules.yml wrapped as a Prometheus Operator PrometheusRule.

  python deploy/k8s/make_prometheusrule.py
"""
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
HEAD = ("# Prometheus Operator copy of deploy/prometheus/rules.yml, written by make_prometheusrule.py\n"
        "# (tests/ops keeps the two equal). Like the ServiceMonitor, it may need your Prometheus's\n"
        "# ruleSelector label (e.g. release: ...).\n")


class _Dumper(yaml.SafeDumper):
    pass


# Multi-line PromQL as literal blocks, readable like the source file.
_Dumper.add_representer(str, lambda d, s: d.represent_scalar(
    "tag:yaml.org,2002:str", s, style="|" if "\n" in s else None))


def render() -> str:
    rules = yaml.safe_load((HERE.parent / "prometheus" / "rules.yml").read_text())
    doc = {"apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule",
           "metadata": {"name": "phds-serve", "labels": {"app.kubernetes.io/name": "phds-serve"}},
           "spec": rules}
    return HEAD + yaml.dump(doc, Dumper=_Dumper, sort_keys=False, width=110)


if __name__ == "__main__":
    (HERE / "base" / "prometheusrule.yaml").write_text(render())

#!/usr/bin/env python3
"""Validates examples/cluster/kubernetes without a cluster.

- Every resource the kustomization lists exists and parses; so do its generators' files.
- Built-in kinds pass kubernetes-validate --strict (the Kubernetes OpenAPI schemas).
- Custom resources (Gateway, HTTPRoute, InferencePool, ScaledObject) validate against the
  schemas in schemas/: the fields their API references require, as no registry ships the CRDs.
- The pieces name each other correctly: the pool selects the node pods and points at the
  picker's service and port, routes point at the pool and the admin service, KEDA scales the
  StatefulSet, the picker resolves the nodes' headless service.
"""
import json
import pathlib
import subprocess
import sys

import jsonschema
import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent / "examples/cluster/kubernetes"
CUSTOM = {"Gateway", "HTTPRoute", "InferencePool", "ScaledObject"}
failures = []


def check(ok, message):
    if not ok:
        failures.append(message)


kustomization = yaml.safe_load((ROOT / "kustomization.yaml").read_text())
namespace = kustomization["namespace"]
docs = []
for name in kustomization["resources"]:
    path = ROOT / name
    check(path.is_file(), f"kustomization lists {name}, which does not exist")
    if path.is_file():
        docs += [(name, d) for d in yaml.safe_load_all(path.read_text()) if d]
for generator in kustomization.get("secretGenerator", []) + kustomization.get("configMapGenerator", []):
    for env in generator.get("envs", []):
        lines = [l for l in (ROOT / env).read_text().splitlines() if l and not l.startswith("#")]
        check(all("=" in l for l in lines), f"{env}: every line is KEY=VALUE")

builtin = sorted({name for name, d in docs if d["kind"] not in CUSTOM})
result = subprocess.run(["kubernetes-validate", "--strict", "--quiet", *builtin], cwd=ROOT, capture_output=True, text=True)
check(result.returncode == 0, f"kubernetes-validate: {result.stdout}{result.stderr}")

by_kind = {}
for name, doc in docs:
    by_kind.setdefault(doc["kind"], []).append(doc)
    if doc["kind"] in CUSTOM:
        schema = json.loads((ROOT / "schemas" / f"{doc['kind']}.json").read_text())
        try:
            jsonschema.validate(doc, schema)
        except jsonschema.ValidationError as e:
            failures.append(f"{name}: {doc['kind']} {doc['metadata']['name']}: {e.message} at {list(e.absolute_path)}")


def one(kind, name):
    found = [d for d in by_kind.get(kind, []) if d["metadata"]["name"] == name]
    check(len(found) == 1, f"expected one {kind} named {name}")
    return found[0] if found else {}


nodes = by_kind["StatefulSet"][0]
pod_labels = nodes["spec"]["template"]["metadata"]["labels"]
node_port = nodes["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"]
pool = by_kind["InferencePool"][0]
check(pool["spec"]["selector"]["matchLabels"].items() <= pod_labels.items(), "the pool selects the node pods")
check([p["number"] for p in pool["spec"]["targetPorts"]] == [node_port], "the pool targets the nodes' port")
picker_ref = pool["spec"]["endpointPickerRef"]
picker_service = one("Service", picker_ref["name"])
check(any(p["port"] == picker_ref["port"]["number"] for p in picker_service.get("spec", {}).get("ports", [])),
      "the pool's picker port is the picker service's")
headless = one("Service", nodes["spec"]["serviceName"])
check(headless.get("spec", {}).get("clusterIP") == "None", "the nodes' service is headless (the picker resolves every pod)")
picker_args = one("Deployment", "kindling-picker")["spec"]["template"]["spec"]["containers"][0]["args"]
check(f"--node={headless['metadata']['name']}.{namespace}.svc.cluster.local:{node_port}" in picker_args,
      "the picker resolves the headless service")
for route in by_kind["HTTPRoute"]:
    for rule in route["spec"]["rules"]:
        for ref in rule["backendRefs"]:
            kind = ref.get("kind", "Service")
            one(kind, ref["name"])
            if kind == "Service":
                check(any(p["port"] == ref["port"] for p in one("Service", ref["name"])["spec"]["ports"]), f"route port {ref}")
    check(all(p["name"] in {g["metadata"]["name"] for g in by_kind["Gateway"]} for p in route["spec"]["parentRefs"]),
          f"route {route['metadata']['name']} is attached to the gateway")
target = by_kind["ScaledObject"][0]["spec"]["scaleTargetRef"]
check((target.get("kind"), target["name"]) == ("StatefulSet", nodes["metadata"]["name"]), "KEDA scales the nodes")

if failures:
    print("\n".join(f"FAIL {f}" for f in failures))
    sys.exit(1)
print(f"kubernetes manifests: {len(docs)} resources valid ({len(builtin)} files of built-in kinds, {sum(len(by_kind.get(k, [])) for k in CUSTOM)} custom resources)")

#!/usr/bin/env python3
"""Validates the custom resources of rendered kustomize output, which kubernetes-validate skips.

kubernetes-validate knows the built-in kinds only: for any other kind (the Prometheus Operator's
ServiceMonitor and PrometheusRule) it prints a WARN and passes. `make k8s` runs this after it, on
the same files and versions: a resource of a kind kubernetes-validate has no schema for is
validated here against the CRD's OpenAPI schema in k8s/components/*/schemas/ (named
<group>_<version>_<kind>.json, objects closed: unknown fields are refused, as --strict does for
the built-in kinds); a kind with no schema at all fails, so nothing passes unvalidated.

Usage: k8s-validate-crs.py -k 1.30.0 [-k 1.37.0 ...] FILE...
Runs with the venv of make k8s (kubernetes-validate brings jsonschema and PyYAML).
"""

import argparse
import glob
import json
import os
import sys

import jsonschema
import kubernetes_validate.utils as kv
import yaml

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def load_schemas():
    schemas = {}
    for path in sorted(glob.glob(os.path.join(ROOT, "k8s/components/*/schemas/*.json"))):
        group, version, kind = os.path.basename(path)[: -len(".json")].split("_")
        with open(path) as f:
            schemas[(f"{group}/{version}", kind)] = json.load(f)
    return schemas


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-k", "--kubernetes-version", action="append", required=True)
    parser.add_argument("files", nargs="+")
    args = parser.parse_args()
    schemas = load_schemas()
    failed = 0
    for path in args.files:
        with open(path) as f:
            resources = [r for r in yaml.safe_load_all(f) if r]
        custom = 0
        for r in resources:
            name = f"{r.get('kind')}/{r.get('metadata', {}).get('name')}"
            for version in args.kubernetes_version:
                try:
                    kv.validate(r, version, strict=True)
                    continue  # a built-in kind: kubernetes-validate's own run reports its errors
                except kv.SchemaNotFoundError:
                    pass
                except kv.ValidationError:
                    continue
                schema = schemas.get((r.get("apiVersion"), str(r.get("kind")).lower()))
                if schema is None:
                    print(f"ERROR {path}: {name} ({r.get('apiVersion')}): no schema: neither "
                          "kubernetes-validate nor k8s/components/*/schemas/ knows this kind")
                    failed += 1
                    break
                errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(r),
                                key=lambda e: list(e.path))
                for e in errors:
                    where = ".".join(str(p) for p in e.path) or "(top)"
                    print(f"ERROR {path}: {name}: {where}: {e.message}")
                failed += len(errors)
                custom += 1
                break  # a CRD schema does not depend on the Kubernetes version
        if custom:
            print(f"{path}: {custom} custom resources valid" if not failed else
                  f"{path}: custom resources invalid")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

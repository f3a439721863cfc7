#!/usr/bin/env bash
# Checks deploy/docker-compose.yml without a Docker engine (make test; make compose-check):
#   - parsed by the Compose Specification's own model, strictly (PyPI `compose-spec`: bindings of
#     the Rust crate compose_spec: unknown keys, wrong types, bad durations and conditions are
#     errors), after YAML anchors/merge keys and ${VAR:-default} interpolation as compose does
#     them with nothing set in the environment;
#   - what the schema cannot see: every depends_on names a service, a service_healthy one has a
#     healthcheck, every named volume is declared, every bind-mounted file or directory exists,
#     every Prometheus scrape target is a compose service and port.
# With a Docker CLI that has the compose plugin, `docker compose config --quiet` runs too.
# The checker lives in a virtual environment under var/ (created on first use, like make k8s's).
set -euo pipefail
cd "$(dirname "$0")/.."

COMPOSE=${1:-deploy/docker-compose.yml}
VENV=${COMPOSE_CHECK_VENV:-var/venv-compose}
PACKAGES=("compose-spec==0.2.1" "PyYAML==6.0.3")
MARKER="$VENV/installed.txt"

if [[ ! -x "$VENV/bin/python" || "$(cat "$MARKER" 2>/dev/null)" != "${PACKAGES[*]}" ]]; then
  echo "compose-check: installing ${PACKAGES[*]} into $VENV"
  python3 -m venv --clear "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "${PACKAGES[@]}"
  echo "${PACKAGES[*]}" >"$MARKER"
fi

echo "compose-check: $COMPOSE"
"$VENV/bin/python" - "$COMPOSE" deploy/prometheus/prometheus.yml <<'PY'
import json, os, re, sys

import yaml
from compose_spec import _PyCompose

compose_path, prometheus_path = sys.argv[1], sys.argv[2]
base = os.path.dirname(compose_path)
errors = []

# Interpolation as compose does it with an empty environment: ${VAR:-default}, ${VAR-default},
# ${VAR} and $VAR (empty), $$ (a literal $). ${VAR:?err} would stop compose: reported.
VAR = re.compile(r"\$(?:\$|\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|([A-Za-z_][A-Za-z0-9_]*))")

def interpolate(value, where):
    if isinstance(value, dict):
        return {k: interpolate(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value
    def sub(m):
        if m.group(0) == "$$":
            return "$"
        op, arg = m.group(2), m.group(3)
        if op in (":?", "?"):
            errors.append(f"{where}: {m.group(0)} requires {m.group(1)} to be set")
            return ""
        return arg if op in (":-", "-") else ""
    return VAR.sub(sub, value)

with open(compose_path) as f:
    raw = yaml.safe_load(f)  # anchors and << merge keys resolved
doc = interpolate(raw, "")

# 1. The Compose Specification, strictly.
try:
    _PyCompose.from_json(json.dumps(doc))
except ValueError as e:
    errors.append(f"not a valid compose file: {e}")

services = doc.get("services") or {}
volumes = doc.get("volumes") or {}

# 2. References the schema does not check.
for name, svc in services.items():
    if not svc.get("image") and not svc.get("build"):
        errors.append(f"services.{name}: neither image nor build")
    deps = svc.get("depends_on") or {}
    if isinstance(deps, list):
        deps = {d: {"condition": "service_started"} for d in deps}
    for dep, spec in deps.items():
        if dep not in services:
            errors.append(f"services.{name}.depends_on: no service {dep!r}")
        elif (spec or {}).get("condition") == "service_healthy":
            hc = services[dep].get("healthcheck")
            if not hc or hc.get("disable"):
                errors.append(f"services.{name}.depends_on.{dep}: service_healthy, but {dep} has no healthcheck")
    for v in svc.get("volumes") or []:
        source = v.split(":")[0] if isinstance(v, str) else v.get("source", "")
        if not source:
            continue
        if source.startswith((".", "/")):
            path = os.path.normpath(os.path.join(base, source))
            if not os.path.exists(path):
                errors.append(f"services.{name}.volumes: {source} does not exist ({path})")
        elif source not in volumes:
            errors.append(f"services.{name}.volumes: named volume {source!r} is not declared")

# Start order must not loop.
def visit(name, seen):
    if name in seen:
        errors.append(f"depends_on cycle: {' -> '.join(seen + [name])}")
        return
    deps = services.get(name, {}).get("depends_on") or {}
    for dep in (deps if isinstance(deps, list) else deps.keys()):
        if dep in services:
            visit(dep, seen + [name])
for name in services:
    visit(name, [])

# 3. Prometheus scrapes compose services, on ports they serve.
with open(prometheus_path) as f:
    prom = yaml.safe_load(f)
for job in prom.get("scrape_configs") or []:
    for sc in job.get("static_configs") or []:
        for target in sc.get("targets") or []:
            host, _, port = target.rpartition(":")
            if host in ("localhost", "127.0.0.1"):
                continue
            if host not in services:
                errors.append(f"{prometheus_path}: job {job['job_name']} scrapes {target}: no compose service {host!r}")

if errors:
    print("compose-check: FAILED", file=sys.stderr)
    for e in errors:
        print(f"  {e}", file=sys.stderr)
    sys.exit(1)
print(f"compose-check: {len(services)} services valid ({', '.join(services)})")
PY

if docker compose version >/dev/null 2>&1; then
  echo "docker compose -f $COMPOSE config --quiet"
  docker compose -f "$COMPOSE" config --quiet
fi

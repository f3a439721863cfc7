#!/usr/bin/env bash
# The Prometheus alert rules, checked and unit-tested with promtool:
#   promtool check rules  k8s/base/alerts/mes-alerts.rules.yaml   (the one rule file: kustomize's
#                         ConfigMap and compose's Prometheus both load it)
#   promtool test rules   deploy/prometheus/tests/*.yml           (a firing and a quiet case per alert)
#   promtool check config deploy/prometheus/prometheus.yml        (compose's scrape config)
# and that every alert of the rule file has both cases in the tests.
#
# promtool comes with Debian's `prometheus` package. When it is missing: with CI=true it is
# installed with apt-get; otherwise the checks are skipped with a message saying how to get it
# (exit 0, so `make test` on a laptop without it still runs everything else).
set -euo pipefail
cd "$(dirname "$0")/.."

RULES=k8s/base/alerts/mes-alerts.rules.yaml
TESTS=(deploy/prometheus/tests/*.yml)
CONFIG=deploy/prometheus/prometheus.yml

if ! command -v promtool >/dev/null 2>&1; then
  if [[ "${CI:-}" == "true" ]]; then
    echo "promtool-test: promtool missing; installing Debian's prometheus package (CI=true)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  else
    echo "promtool-test: SKIPPED: promtool is not installed (apt-get install prometheus; CI installs it)" >&2
    exit 0
  fi
fi

echo "promtool check rules $RULES"
promtool check rules "$RULES"

# The rule file under deploy/prometheus/ is a link to the same file, not a copy that can drift.
if [[ "$(readlink -f deploy/prometheus/mes-alerts.rules.yaml)" != "$(readlink -f "$RULES")" ]]; then
  echo "promtool-test: deploy/prometheus/mes-alerts.rules.yaml must be a link to $RULES" >&2
  exit 1
fi

echo "promtool check config $CONFIG"
# The config names its rule files where compose mounts them; check it against the repository's.
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/rules"
cp "$RULES" "$tmp/rules/"
sed "s#/etc/prometheus/rules/#$tmp/rules/#" "$CONFIG" >"$tmp/prometheus.yml"
promtool check config "$tmp/prometheus.yml"

# The Grafana panels' PromQL parses: each becomes a recording rule of a throwaway rule file
# (Grafana's variables replaced by values of their kind) that promtool checks. Whether the
# metrics and labels exist is tests/dashboards.rs's part, against running services.
echo "promtool check rules <every panel query of deploy/grafana/dashboards/*.json>"
python3 - "$tmp/dashboards.rules.yaml" deploy/grafana/dashboards/*.json <<'PY'
import json, re, sys

out, files = sys.argv[1], sys.argv[2:]
rules = []

def panels(items):
    for p in items or []:
        yield p
        yield from panels(p.get("panels"))

for path in files:
    with open(path) as f:
        board = json.load(f)
    for p in panels(board.get("panels")):
        for t in p.get("targets") or []:
            expr = t.get("expr")
            if not expr:
                continue
            expr = re.sub(r"\$__(rate_)?interval|\$__range", "5m", expr)
            expr = re.sub(r"\$\{\w+(:\w+)?\}|\$\w+", ".*", expr)
            rules.append({"record": f"dashboard_query:{len(rules)}",
                          "expr": expr,
                          "labels": {"source": f"{path}: {p.get('title', '')} {t.get('refId', '')}"}})
with open(out, "w") as f:
    json.dump({"groups": [{"name": "dashboards", "rules": rules}]}, f, indent=1)
print(f"  {len(rules)} panel queries from {len(files)} dashboards")
PY
promtool check rules "$tmp/dashboards.rules.yaml"

echo "promtool test rules ${TESTS[*]}"
promtool test rules "${TESTS[@]}"

# Every alert has a firing case (exp_alerts with entries) and a quiet case (exp_alerts: []).
missing=0
for alert in $(sed -n 's/^[[:space:]]*- alert:[[:space:]]*\([A-Za-z0-9_]*\).*/\1/p' "$RULES"); do
  firing=0 quiet=0
  while read -r next; do
    case "$next" in
      "exp_alerts: []") quiet=1 ;;
      "exp_alerts:") firing=1 ;;
    esac
  done < <(awk -v a="$alert" '
    $1 == "alertname:" && $2 == a { want = 1; next }
    want && NF { sub(/^[ \t]+/, ""); sub(/[ \t]+$/, ""); print; want = 0 }
  ' "${TESTS[@]}")
  if ((firing == 0 || quiet == 0)); then
    echo "promtool-test: alert $alert lacks a $( ((firing == 0)) && echo firing || echo quiet) case in deploy/prometheus/tests/" >&2
    missing=1
  fi
done
# ... and a runbook line in the README's Operating section.
for alert in $(sed -n 's/^[[:space:]]*- alert:[[:space:]]*\([A-Za-z0-9_]*\).*/\1/p' "$RULES"); do
  if ! grep -q "^| \`$alert\` |" README.md; then
    echo "promtool-test: alert $alert has no runbook line in README.md (Operating > Alerts)" >&2
    missing=1
  fi
done
((missing == 0)) || exit 1
echo "promtool-test: every alert has a firing and a quiet case and a runbook line"

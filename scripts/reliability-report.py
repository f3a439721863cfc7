#!/usr/bin/env python3
"""Turns the records the fault suite and the fuzzers wrote (<target>/reliability/*.json) into
<target>/reliability/report.md and report.json. `make reliability-report` runs them first.

Usage: scripts/reliability-report.py TARGET_DIR
"""

import json
import pathlib
import platform
import subprocess
import sys


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip() or "?"
    return f"{cores} cores, {cpu}, {platform.system()} {platform.release()}"


def commit() -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


def main() -> int:
    target = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "target")
    folder = target / "reliability"
    records = []
    for f in sorted(folder.glob("*.json")):
        if f.name == "report.json":
            continue
        records.append(json.loads(f.read_text()))
    if not records:
        print(f"no records in {folder}: run the fault suite first", file=sys.stderr)
        return 1

    faults = [r for r in records if "acknowledged" in r]
    reads = [r for r in records if "reads" in r]
    fuzz = [r for r in records if "acknowledged" not in r and "reads" not in r]
    lines = [
        "# Reliability report",
        "",
        f"Commit `{commit()}`, machine: {machine()}.",
        "Made by `make reliability-report` from `tests/under_fire.rs`, `tests/grpc_fuzz.rs` and",
        "`tests/e2e.rs` (schemathesis); every figure below was measured in that run.",
        "",
        "## Faults under load",
        "",
        "Six tablets over REST, each retrying the same scan id on 503/504/429 and connection",
        "errors; the set check reads the databases afterwards.",
        "",
        "| scenario | load held | faults | acknowledged | lost | duplicated | inventory wrong "
        "| consumers missing | longest outage a tablet saw | 5xx other than 503 | result |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in faults:
        missing = sum(c.get("missing", 0) for c in r.get("consumers", {}).values())
        lines.append(
            f"| {r['scenario']} | {r['load_held_s']:.0f} s | {len(r['faults'])} "
            f"| {r['acknowledged']} | {r['lost']} | {r['duplicated']} "
            f"| {r['inventory_mismatches']} | {missing} "
            f"| {r['longest_client_visible_outage_s']:.1f} s "
            f"| {r['server_errors_other_than_503']} | {'pass' if r['passed'] else 'FAIL'} |"
        )
    lines += ["", "Faults injected, and what the tablets were answered:", ""]
    for r in faults:
        lines.append(f"- **{r['scenario']}**: {'; '.join(r['faults'])}. Answers: "
                     + ", ".join(f"{k}: {v}" for k, v in r["answers"].items()) + ".")
        for p in r.get("problems", []):
            lines.append(f"  - problem: {p}")
    erp = [r for r in faults if r.get("erp")]
    if erp:
        lines += ["", "The ERP's books (the HTTP ERP double), read after erp-sync's outbox drained:", "",
                  "| scenario | confirmations expected | booked | lost | booked twice | not asked for "
                  "| quantity mismatches | keys posted more than once | drained after the load |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in erp:
            e = r["erp"]
            lines.append(
                f"| {r['scenario']} | {e['confirmations_expected']} | {e['booked']} | {e['lost']} "
                f"| {e['booked_twice']} | {e['foreign']} | {e['quantity_mismatches']} "
                f"| {e['keys_posted_more_than_once']} | {e['drained_after_load_s']:.1f} s |")
    for r in reads:
        lines += ["", f"Trace reads during **{r['scenario']}**: answers "
                  + ", ".join(f"{k}: {v}" for k, v in r["reads"].items())
                  + f"; the stalest answer lacked a lot produced {r['stalest_answer_s']:.1f} s before "
                  f"(bound {r['staleness_bound_s']:.0f} s); answers staler than the bound: "
                  f"{r['stale_answers']}; fresh answers after the faults: "
                  f"{r['fresh_answers_after_faults']}; {'pass' if r['passed'] else 'FAIL'}."]
    lines += ["", "## Hostile input", ""]
    for r in fuzz:
        if "cases" in r:
            lines.append(
                f"- **{r['scenario']}**: {r['cases']} calls over {r['methods']} methods "
                f"(seed {r['seed']}); outcomes "
                + ", ".join(f"{k}: {v}" for k, v in r["outcomes"].items())
                + f"; INTERNAL/UNKNOWN failures: {r['internal_or_unknown_failures']}; "
                f"services alive: {r['services_alive']}; {'pass' if r['passed'] else 'FAIL'}."
            )
        else:
            lines.append(f"- **{r['scenario']}** ({r.get('checks', '')}): "
                         f"{'pass' if r['passed'] else 'FAIL'}. "
                         + " / ".join(s.strip() for s in r.get("summary", [])))
    lines.append("")
    (folder / "report.md").write_text("\n".join(lines))
    (folder / "report.json").write_text(json.dumps(
        {"commit": commit(), "machine": machine(), "records": records}, indent=2))
    print("\n".join(lines))
    print(f"written: {folder / 'report.md'} and report.json")
    return 0 if all(r.get("passed") for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())

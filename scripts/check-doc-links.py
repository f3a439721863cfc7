#!/usr/bin/env python3
"""Checks that every relative link in the README and docs/ resolves inside the repository.

    scripts/check-doc-links.py              # README.md and docs/**/*.md
    scripts/check-doc-links.py FILE.md ...  # these files

A link `[text](target)` whose target is not a URL must name an existing file or directory
(relative to the file that links); a `#fragment` must match a heading of the target Markdown file
(GitHub's anchor rule). Exits 1 and lists the broken links otherwise. Standard library only.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^(```|~~~)")


def text_outside_code(path: Path) -> str:
    lines, fenced = [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line.strip()):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(re.sub(r"`[^`]*`", "", line) if "](" not in line else line)
    return "\n".join(lines)


def anchors(path: Path) -> set[str]:
    out, seen = set(), {}
    fenced = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line.strip()):
            fenced = not fenced
            continue
        m = None if fenced else re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        title = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", m.group(1))
        slug = re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def check(path: Path) -> list[str]:
    broken = []
    for target in LINK.findall(text_outside_code(path)):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):
            continue  # http:, https:, mailto:
        file_part, _, fragment = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            broken.append(f"{path.relative_to(ROOT)}: {target} (no such file)")
            continue
        try:
            dest.relative_to(ROOT)
        except ValueError:
            broken.append(f"{path.relative_to(ROOT)}: {target} (outside the repository)")
            continue
        if fragment and dest.suffix == ".md" and fragment not in anchors(dest):
            broken.append(f"{path.relative_to(ROOT)}: {target} (no heading #{fragment})")
    return broken


def main() -> int:
    files = [Path(a).resolve() for a in sys.argv[1:]] or [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    broken = [b for f in files for b in check(f)]
    for b in broken:
        print(b)
    print(f"{len(files)} files checked, {len(broken)} broken links", file=sys.stderr)
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())

"""Audit the locked dependency set (requirements.lock, as installed) with pip-audit (`make audit-deps`).

Exit 1 when pip-audit reports a vulnerability. When it cannot reach a vulnerability service, or
the package index it reaches serves no vulnerability data (every dependency comes back "not
found"), print SKIP with the reason and exit 0: an unreachable service must not fail CI, and must
not pass silently for a clean audit either.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

PIP_AUDIT = Path(sys.executable).with_name("pip-audit")
SERVICES = ("pypi", "osv")


def run(service: str) -> tuple[dict[str, object] | None, str]:
    try:
        proc = subprocess.run(
            [
                str(PIP_AUDIT),
                "--format",
                "json",
                "--progress-spinner",
                "off",
                "--skip-editable",
                "--vulnerability-service",
                service,
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"{service}: {exc}"
    try:
        return json.loads(proc.stdout), ""
    except json.JSONDecodeError:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return None, f"{service}: {last[:200]}"


def main() -> int:
    reasons: list[str] = []
    for service in SERVICES:
        report, reason = run(service)
        if report is None:
            reasons.append(reason)
            continue
        deps = report.get("dependencies", [])
        assert isinstance(deps, list)
        audited = [d for d in deps if "skip_reason" not in d]
        vulnerable = [d for d in audited if d.get("vulns")]
        if vulnerable:
            for d in vulnerable:
                ids = ", ".join(v["id"] for v in d["vulns"])
                print(f"VULNERABLE {d['name']} {d['version']}: {ids}")
            return 1
        if audited:
            print(f"pip-audit ({service}): {len(audited)} packages, no known vulnerabilities")
            return 0
        reasons.append(f"{service}: none of {len(deps)} packages could be looked up")
    print("SKIP pip-audit: no vulnerability service reachable from this machine")
    for reason in reasons:
        print(f"  {reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

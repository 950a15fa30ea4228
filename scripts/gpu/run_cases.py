"""Run verification cases in this process, without Ray (for a GPU host that lacks it).

    python3 scripts/gpu/run_cases.py parity --case 'parity::T8192-*' [--scale full] [--out FILE]

The cases ``nsa verify`` would plan (same suites, scale, ``--case`` globs, backend "triton"), run
one after another by :meth:`Suite.run`, each result printed as one line; ``--out`` writes them as
JSON. Exits 1 when any case does not pass. ``nsa verify`` remains the acceptance path (archived
Arrow tables, reports); this is for a quick parity check beside a benchmark.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from verify.runner import RunnerError, plan_cases


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("suites", nargs="+")
    parser.add_argument("--case", action="append", default=[], help="suite::case glob (repeatable)")
    parser.add_argument("--scale", default="full", choices=("ci", "full"))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    try:
        plan = plan_cases(args.suites, args.scale, "triton", args.case)
    except RunnerError as exc:
        print(f"run_cases.py: {exc}", file=sys.stderr)
        return 2
    rows = []
    for suite, case in plan:
        result = suite.run(case)
        rows.append({"case": case.name, **dataclasses.asdict(result)})
        metrics = ", ".join(f"{k} {v:.4g}" for k, v in result.metrics.items())
        print(f"{result.status:5} {case.name} ({result.duration_s:.1f} s): {metrics} {result.message}",
              flush=True)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))
    return 0 if all(row["status"] == "pass" for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Run every benchmark: `python -m benchmarks [--quick] [--only NAME] [--json FILE]`.

Prints a table and writes JSON (default: benchmarks/results.json).
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from benchmarks._harness import Context, Result

HERE = Path(__file__).resolve().parent


def discover() -> list[str]:
    return sorted(p.stem for p in HERE.glob("bench_*.py"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes, for smoke runs")
    parser.add_argument(
        "--only", action="append", default=[], help="run only these modules (e.g. bench_sealed)"
    )
    parser.add_argument("--json", type=Path, default=HERE / "results.json", help="JSON output")
    args = parser.parse_args(argv)

    console = Console(stderr=True)
    modules = [m for m in discover() if not args.only or m in args.only]
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="sealtorch-bench-") as tmp:
        for name in modules:
            console.print(f"[bold]running {name}[/bold]")
            module = importlib.import_module(f"benchmarks.{name}")
            workdir = Path(tmp) / name
            workdir.mkdir()
            start = time.perf_counter()
            results.extend(module.run(Context(workdir=workdir, quick=args.quick)))
            console.print(f"  done in {time.perf_counter() - start:.1f} s")

    table = Table(title="sealtorch benchmarks")
    for column in ("benchmark", "metric", "value", "target", "ok"):
        table.add_column(column)
    for r in results:
        ok = "" if r.ok is None else ("[green]yes[/green]" if r.ok else "[red]NO[/red]")
        table.add_row(r.benchmark, r.metric, f"{r.value:.3g} {r.unit}", r.target or "", ok)
    Console().print(table)

    report = {
        "machine": {
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "processor": platform.processor(),
        },
        "quick": args.quick,
        "results": [r.as_dict() for r in results],
    }
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    console.print(f"JSON written to {args.json}")
    return 0 if all(r.ok is not False for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())

"""python -m bench: every op's benchmarks on the best device present, one table, JSON + PNG.

    python -m bench                      # all suites, CUDA if present else CPU
    python -m bench --suite mean_pool    # one suite
    python -m bench --quick              # smaller shapes, shorter timing budget
    python -m bench --out DIR            # where results.json and results.png go (bench/out)
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib
import json
import platform
import sys
from pathlib import Path

import torch

from .common import Case, Skipped, roofline, run_case

# One module per op, in the order the table shows them.
SUITES = ["mean_pool", "attention", "attention_kvcache", "contrastive_loss", "moe", "model", "training"]


def _progress(items, desc):
    try:
        from tqdm import tqdm

        return tqdm(items, desc=desc, leave=False, file=sys.stderr)
    except ImportError:
        return items


def _write(line: str) -> None:
    try:
        from tqdm import tqdm

        tqdm.write(line, file=sys.stderr)
    except ImportError:
        print(line, file=sys.stderr, flush=True)


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def print_table(results, skipped, roof) -> None:
    head = ["op", "shape", "backend", "median ms", "TFLOP/s", "GB/s", "% roof", "baseline", "base ms", "ratio"]
    rows = [[r.op, r.shape, r.backend, _fmt(r.median_ms, ".4f"), _fmt(r.tflops, ".1f"), _fmt(r.gbps, ".1f"),
             _fmt(r.roofline_pct, ".1f"), r.baseline_name or "-", _fmt(r.baseline_ms, ".4f"),
             "-" if r.speedup is None else f"{r.speedup:.2f}x"] for r in results]
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    print(f"device: {roof['name']}  (roofline: {roof['source']})")
    print(line(head))
    print(line(["-" * w for w in widths]))
    for row in rows:
        print(line(row))
    if skipped:
        print(f"\nskipped {len(skipped)} benchmark(s):")
        for s in skipped:
            print(f"  {s.op} [{s.shape}]: {s.reason}")
    print("\nratio = baseline time / our time, both measured in this run (medians).")


def plot(results, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib not installed: no plot written to {path}")
        return
    with_ratio = [r for r in results if r.speedup is not None]
    if not with_ratio:
        return
    fig, ax = plt.subplots(figsize=(10, 0.35 * len(with_ratio) + 1.5))
    labels = [f"{r.op} | {r.shape} | {r.backend}" for r in with_ratio]
    ax.barh(range(len(with_ratio)), [r.speedup for r in with_ratio], color="tab:blue")
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(with_ratio)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("speed-up over the same-run baseline (x)")
    ax.set_title(f"grit-kernels on {with_ratio[0].device}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    p.add_argument("--suite", action="append", choices=SUITES, help="run only these suites")
    p.add_argument("--quick", action="store_true", help="small shapes and short timing")
    p.add_argument("--out", default=str(Path(__file__).parent / "out"), help="output folder")
    p.add_argument("--budget", type=float, default=None, help="timing budget per measurement, seconds")
    args = p.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    budget = args.budget if args.budget is not None else (0.2 if args.quick else 0.5)
    roof = roofline(str(device))
    results, skipped = [], []
    for name in args.suite or SUITES:
        try:
            suite = importlib.import_module(f"bench.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"bench.{name}":
                raise
            skipped.append(Skipped(name, "*", "suite not written yet"))
            continue
        cases = suite.cases(device, args.quick)
        for case in _progress(cases, name):
            if isinstance(case, Skipped):
                skipped.append(case)
                continue
            assert isinstance(case, Case)
            r = run_case(case, device, budget)
            results.append(r)
            # One line per case as it finishes, so a run cut short by a time limit still reports.
            ratio = "" if r.speedup is None else f", {r.speedup:.2f}x vs {r.baseline_name}"
            _write(f"[{r.op} | {r.shape} | {r.backend}] {r.median_ms:.4f} ms{ratio}")
            if device.type == "cuda":
                torch.cuda.empty_cache()

    print_table(results, skipped, roof)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        device=roof["name"], roofline=roof, torch=torch.__version__, python=platform.python_version(),
        triton=_version("triton"), command=" ".join(["python -m bench", *(argv or sys.argv[1:])]),
    )
    payload = dict(meta=meta, results=[dataclasses.asdict(r) for r in results],
                   skipped=[dataclasses.asdict(s) for s in skipped])
    (out / "results.json").write_text(json.dumps(payload, indent=1))
    plot(results, out / "results.png")
    print(f"wrote {out / 'results.json'} and {out / 'results.png'}")
    return 0


def _version(module: str) -> str | None:
    try:
        return importlib.import_module(module).__version__
    except ImportError:
        return None


if __name__ == "__main__":
    sys.exit(main())

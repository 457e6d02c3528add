"""python -m bench: every op's benchmarks on the best device present, one table, JSON + PNG.

    python -m bench                      # CPU: representative rows per op, ~1.5 min on 2 cores
                                         # GPU: the GPU suites at full size
    python -m bench --full               # the full sweep (CPU: ~25 min on 2 cores)
    python -m bench --quick              # small shapes and short timing, on any device
    python -m bench --suite mean_pool    # one suite (repeatable)
    python -m bench --out DIR            # where results.json and results.png go (bench/out)

Each case times our implementation and its baseline alternately in the same process until
both medians settle (or the budget runs out), on the CPU with one thread unless the case
says otherwise. The table gives medians, interquartile ranges and repeat counts; a row whose
spread is too wide to support its ratio is marked "~". results.json is rewritten after
every case; the table, JSON and plot are also written when the run is interrupted
(Ctrl-C, SIGTERM from a time limit).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib
import json
import os
import platform
import signal
import sys
import time
from pathlib import Path

import torch

from .common import NOISY_SPREAD, Case, Skipped, roofline, run_case

# One module per op, in the order the table shows them.
SUITES = ["mean_pool", "attention", "attention_kvcache", "contrastive_loss", "moe", "model", "training"]

# Seconds each suite took on a 2-core CPU machine (python -m bench, default and --full): the
# ETA's prior for suites not started yet; a running suite's ETA uses its own pace.
CPU_SECONDS = {
    "quick": dict(mean_pool=7, attention=14, attention_kvcache=4, contrastive_loss=7, moe=4, model=55, training=4),
    "full": dict(mean_pool=5, attention=20, attention_kvcache=8, contrastive_loss=8, moe=15, model=1400, training=60),
}


def _write(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def _iqr(r, base=False):
    q1, q3 = (r.baseline_q1_ms, r.baseline_q3_ms) if base else (r.q1_ms, r.q3_ms)
    return "-" if q1 is None else f"{q3 - q1:.3g}"


def print_table(results, skipped, roof) -> None:
    head = ["op", "shape", "backend", "thr", "median ms", "IQR", "n", "TFLOP/s", "GB/s", "% roof", "baseline",
            "base ms", "IQR", "n", "ratio"]
    rows = [[r.op, r.shape, r.backend, _fmt(r.threads, "d"), _fmt(r.median_ms, ".4g"), _iqr(r), str(r.reps),
             _fmt(r.tflops, ".1f"), _fmt(r.gbps, ".1f"), _fmt(r.roofline_pct, ".1f"), r.baseline_name or "-",
             _fmt(r.baseline_ms, ".4g"), _iqr(r, base=True), str(r.baseline_reps or "-"),
             "-" if r.speedup is None else f"{'~' if r.noisy else ''}{r.speedup:.2f}x"] for r in results]
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
    print("\nratio = median over rounds of baseline time / our time, one call of each per round, in this run;")
    print("thr = CPU threads;")
    print(f"IQR = interquartile range (ms); n = repeats; ~ = per-round ratios spread (IQR) over {NOISY_SPREAD:.0%} "
          "of their median: the ratio is not reliable.")


def plot(results, path: Path, device_name: str) -> bool:
    """One panel per op: log-scale ratio bars with their values and a line at 1x; a GPU run
    adds a panel of % of the card's roofline. Returns whether a file was written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install '.[bench]'): no plot written")
        return False
    import math
    import textwrap

    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    with_ratio = [r for r in results if r.speedup is not None]
    if not with_ratio:
        print("no result with a baseline: no plot written")
        return False
    groups: dict[str, list] = {}
    for r in with_ratio:
        groups.setdefault(r.op.split()[0], []).append(r)
    roof_rows = [r for r in results if r.roofline_pct is not None]
    panels = list(groups.items()) + ([("% of roofline", roof_rows)] if roof_rows else [])
    # Layout: panels of many rows get a full-width row of their own, the others go two per
    # row; each grid row is as tall as its longest panel (~0.32 in per bar).
    big = [pn for pn in panels if len(pn[1]) > 6]
    small = [pn for pn in panels if len(pn[1]) <= 6]
    grid = [[pn] for pn in big] + [small[i:i + 2] for i in range(0, len(small), 2)]
    heights = [max(len(pn[1]) for pn in row) for row in grid]
    fig_h = min(11.0, 1.0 + sum(0.32 * h + 0.8 for h in heights))
    fig = plt.figure(figsize=(16, fig_h))
    gs = fig.add_gridspec(len(grid), 2, height_ratios=[h + 1.6 for h in heights])
    placed = []
    for gi, row in enumerate(grid):
        if len(row) == 1 and row[0] in big:
            placed.append((fig.add_subplot(gs[gi, :]), row[0], heights[gi]))
        else:
            for ci, pn in enumerate(row):
                placed.append((fig.add_subplot(gs[gi, ci]), pn, heights[gi]))
    for ax, (title, rows), slots in placed:  # slots: same bar thickness across a grid row
        labels = ["\n".join(textwrap.wrap(f"{' '.join(r.op.split()[1:]) or r.op} | {r.shape} | {r.backend}", 60))
                  for r in rows]
        y = range(len(rows))
        if title == "% of roofline":
            vals = [r.roofline_pct for r in rows]
            ax.barh(y, vals, color="tab:green")
            ax.set_xlim(0, 100)
            ax.set_xlabel("% of the card's peak (FLOP/s, or bandwidth for memory-bound ops)")
            texts = [f"{v:.0f}%" for v in vals]
        else:
            vals = [r.speedup for r in rows]
            colors = ["tab:gray" if r.noisy else ("tab:blue" if r.speedup >= 1 else "tab:orange") for r in rows]
            ax.barh(y, vals, color=colors)
            ax.set_xscale("log")
            lo, hi = min(vals + [1.0]), max(vals + [1.0])
            ax.set_xlim(lo / 1.8, hi * 2.2)
            # ticks at powers of two, written as ratios (no 10^x labels that collide)
            ticks = [2.0 ** e for e in range(math.floor(math.log2(lo / 1.8)), math.ceil(math.log2(hi * 2.2)) + 1)]
            ax.xaxis.set_major_locator(FixedLocator(ticks))
            ax.xaxis.set_minor_locator(NullLocator())
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
            ax.axvline(1.0, color="black", linewidth=1)
            ax.set_xlabel("speed-up vs the same-run baseline (log scale)", fontsize=8)
            texts = [f"{'~' if r.noisy else ''}{v:.2f}x" for r, v in zip(rows, vals)]
        for yi, v, t in zip(y, vals, texts):
            ax.text(v, yi, " " + t, va="center", fontsize=8)
        ax.set_yticks(list(y), labels, fontsize=7)
        ax.set_ylim(slots - 0.5, -0.5)  # top to bottom, in table order
        ax.set_title(title, fontsize=10, loc="left")
    fig.suptitle(f"grit-kernels on {device_name}: ratio = baseline time / ours (blue faster, orange slower, "
                 "gray noisy)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


class _Eta:
    """Elapsed time and an estimate of what is left: the running suite at its own pace so
    far, the suites not started at their measured prior."""

    def __init__(self, suites, size: str, device: torch.device):
        self.start = time.perf_counter()
        self.prior = CPU_SECONDS[size] if device.type == "cpu" else {}
        self.remaining = list(suites)

    def line(self, suite: str, done: int, total: int, suite_start: float) -> str:
        now = time.perf_counter()
        spent = now - suite_start
        left = (spent / done) * (total - done) if done else self.prior.get(suite, 0)
        later = sum(self.prior.get(s, 0) for s in self.remaining if s != suite)
        eta = f", ~{_mmss(left + later)} left" if self.prior or done else ""
        return f"{_mmss(now - self.start)} elapsed{eta}"


def _mmss(s: float) -> str:
    s = int(round(s))
    return f"{s // 60}:{s % 60:02d}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    p.add_argument("--suite", action="append", choices=SUITES, help="run only these suites")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="small shapes and short timing")
    size.add_argument("--full", action="store_true", help="the full sweep (the default on a GPU)")
    p.add_argument("--out", default=str(Path(__file__).parent / "out"), help="output folder")
    p.add_argument("--budget", type=float, default=None,
                   help="timing budget per case, seconds (default: 3 on the CPU; on a GPU 0.3 quick, 0.5 full)")
    args = p.parse_args(argv)

    if args.device is not None:
        try:
            device = torch.device(args.device)
        except RuntimeError as e:
            p.error(f"--device {args.device}: {e}")
        if device.type == "cuda" and not torch.cuda.is_available():
            p.error(f"--device {args.device}: no CUDA device is available here (torch {torch.__version__}, "
                    f"torch.cuda.is_available() is False); leave --device out to run the CPU suites")
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # CPU: the representative (quick) shapes unless --full; GPU: full unless --quick.
    quick = args.quick or (device.type == "cpu" and not args.full)
    # CPU timings need more repeats than GPU ones to settle (thread wake-ups, other processes).
    budget = args.budget if args.budget is not None else (3.0 if device.type == "cpu" else (0.3 if quick else 0.5))
    roof = roofline(str(device))
    suites = args.suite or SUITES
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        device=roof["name"], roofline=roof, torch=torch.__version__, python=platform.python_version(),
        triton=_version("triton"), cpu_threads_available=os.cpu_count(), mode="quick" if quick else "full",
        budget_s=budget, command=" ".join(["python -m bench", *(sys.argv[1:] if argv is None else argv)]),
    )
    results, skipped = [], []
    eta = _Eta(suites, "quick" if quick else "full", device)
    if device.type == "cpu":
        total = sum(eta.prior.get(s, 0) for s in suites)
        _write(f"python -m bench on the CPU ({'representative shapes' if quick else 'full sweep'}): about "
               f"{_mmss(total)} on 2 cores; results in {out}")

    def save():
        payload = dict(meta=meta, results=[dataclasses.asdict(r) for r in results],
                       skipped=[dataclasses.asdict(s) for s in skipped])
        tmp = out / "results.json.tmp"
        tmp.write_text(json.dumps(payload, indent=1))
        os.replace(tmp, out / "results.json")

    def on_term(signum, frame):  # a time limit's SIGTERM: finish like Ctrl-C
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term)
    interrupted = False
    try:
        for name in suites:
            suite_start = time.perf_counter()
            _write(f"[{name}] preparing cases ({eta.line(name, 0, 1, suite_start)})")
            try:
                suite = importlib.import_module(f"bench.{name}")
            except ModuleNotFoundError as e:
                if e.name != f"bench.{name}":
                    raise
                skipped.append(Skipped(name, "*", "suite not written yet"))
                continue
            cases = suite.cases(device, quick)
            todo = [c for c in cases if isinstance(c, Case)]
            skipped.extend(c for c in cases if isinstance(c, Skipped))
            for i, case in enumerate(todo, 1):
                r = run_case(case, device, budget)
                results.append(r)
                save()
                ratio = "" if r.speedup is None else \
                    f", {'~' if r.noisy else ''}{r.speedup:.2f}x vs {r.baseline_name}"
                _write(f"[{name} {i}/{len(todo)}] {r.op} | {r.shape} | {r.backend}: {r.median_ms:.4g} ms{ratio} "
                       f"({eta.line(name, i, len(todo), suite_start)})")
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            eta.remaining.remove(name)
    except KeyboardInterrupt:
        interrupted = True
        _write("interrupted: writing what finished")
    finally:
        signal.signal(signal.SIGTERM, previous)
        meta["interrupted"] = interrupted
        print_table(results, skipped, roof)
        save()
        wrote = plot(results, out / "results.png", roof["name"])
        print(f"wrote {out / 'results.json'}" + (f" and {out / 'results.png'}" if wrote else ""))
    return 130 if interrupted else 0


def _version(module: str) -> str | None:
    try:
        return importlib.import_module(module).__version__
    except ImportError:
        return None


if __name__ == "__main__":
    sys.exit(main())

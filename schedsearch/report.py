"""Results -> tables people can read."""
from __future__ import annotations

import base64
import html
import io
import math
import shlex
import statistics
from pathlib import Path

from . import strategies, timing
from .peaks import peak_for, roofline_us
from .rundir import Results
from .validate import verdict


def fmt_us(us: float | None) -> str:
    if us is None:
        return "-"
    return f"{us / 1000:,.2f} ms" if us >= 10_000 else f"{us:,.1f} us"


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()
    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, rows)])


def summary_table(results: Results) -> str:
    """What `tune` prints at the end: per task, then end to end against PyTorch."""
    tasks = table(["task", "weight", "trials", "errors", "best"],
                  [[t["name"], t["weight"], f"{t['trials']} ({'space exhausted' if t.get('space_exhausted') else t['ended']})"
                    if t.get("space_exhausted") or t.get("ended") else t["trials"],
                    t["errors"], fmt_us(t["best_us"])] for t in results.tasks])
    v, tm = results.validation, results.timing
    rows = [["TVM tuned", fmt_us(tm["tvm"]["median_us"]), f"{fmt_us(tm['tvm']['p10_us'])} .. {fmt_us(tm['tvm']['p90_us'])}"]]
    if "torch_eager" in tm:
        e = tm["torch_eager"]
        rows.append(["PyTorch eager", fmt_us(e["median_us"]), f"{fmt_us(e['p10_us'])} .. {fmt_us(e['p90_us'])}"])
    end = table(["end to end", "median", "p10 .. p90"], rows)
    lines = [tasks]
    for t in results.tasks:  # what the errors were, not only how many (the details are in tune.log)
        for cause, n in t.get("error_causes", [])[:3]:
            lines.append(f"  {t['name']}: {n} x {cause}")
    lines += ["", end, BEST_VS_END_TO_END, ""]
    failed_rounds = (results.search or {}).get("failed_rounds")
    if failed_rounds:
        lines.append(f"LLM: {len(failed_rounds)} round(s) got no program back, their requests failed "
                     f"(last: {failed_rounds[-1]['error']}); the requests are in transcript.jsonl")
    if "speedup_vs_eager" in tm:
        lines.append(speedup_text(tm))
    lines.append(f"validation: {verdict(v)}: {v['checks']} checks (seeds {v['seeds']}, {', '.join(v['distributions'])}), "
                 f"max abs {v['max_abs']:.2e}, max rel {v['max_rel']:.2e}, tolerance {v['tolerance']:g}")
    lines.append(f"device: {results.device['name']}; tuning {results.tuning_wall_s:.0f} s")
    return "\n".join(lines)


# Softmax 8x256 on the 2-core CPU box: its best kernel 13.3 us as the tuner times it, the same kernel 139 us
# alone after the 64 MiB flush; the whole module 24 us in a warm loop, 176 us flushed (the end-to-end figure).
BEST_VS_END_TO_END = ("(best: each kernel alone as the tuner times it, 2 back-to-back calls, cache warm; end to end: "
                      "the whole module called on torch tensors, one call after each cache flush, as PyTorch eager "
                      "is timed: cold caches, and on a CPU waking the thread pool, cost more than small kernels)")


def speedup_text(tm: dict) -> str:
    """The speedup over eager, or why none is shown: within the run-to-run spread, it would be noise."""
    t, e = tm["tvm"], tm["torch_eager"]
    noise = timing.ratio_is_noise(t, e, ("TVM", "eager"))
    if noise is None:
        return f"speedup vs PyTorch eager: {e['median_us'] / t['median_us']:.2f}x"
    return (f"speedup vs PyTorch eager: none shown, {noise} (TVM {fmt_us(t['p10_us'])} .. {fmt_us(t['p90_us'])}, "
            f"eager {fmt_us(e['p10_us'])} .. {fmt_us(e['p90_us'])})")


# ---------------------------------------------------------------------------------------------------
# The comparison report (`schedsearch compare` / `report`): data from compare.load(), nothing else.

BASELINES = {"eager": "PyTorch eager", "compile": "torch.compile", "compile-max-autotune": "torch.compile max-autotune"}
ALL_TASKS = "all tasks"


def task_curve(trials: list[dict], task: str) -> list[float | None]:
    """Best latency so far after each of the task's trials (None until one ran)."""
    ys, best = [], None
    for r in trials:
        if r["task"] == task:
            if r["latency_us"] is not None:
                best = r["latency_us"] if best is None else min(best, r["latency_us"])
            ys.append(best)
    return ys


def workload_curve(trials: list[dict], weights: dict[str, int]) -> list[float | None]:
    """After each of the arm's trials: sum over tasks of weight x best kernel so far (None until all tasks ran)."""
    best: dict[str, float] = {}
    ys = []
    for r in trials:
        if r["task"] in weights and r["latency_us"] is not None:
            best[r["task"]] = min(best.get(r["task"], math.inf), r["latency_us"])
        ys.append(sum(w * best[t] for t, w in weights.items()) if len(best) == len(weights) else None)
    return ys


def trials_to_reach(ys: list[float | None], limit: float) -> int | None:
    return next((i + 1 for i, y in enumerate(ys) if y is not None and y <= limit), None)


def band(curves: list[list[float | None]]) -> tuple[list[int], list[float], list[float], list[float]]:
    """Per trial: min, median, max over the seeds that have a value there. A seed whose search stopped
    early keeps its best to the end: it would otherwise drop out of the median and make a step up."""
    xs, lo, med, hi = [], [], [], []
    for t in range(max((len(c) for c in curves), default=0)):
        vals = [c[min(t, len(c) - 1)] for c in curves if c and c[min(t, len(c) - 1)] is not None]
        if vals:
            xs.append(t + 1)
            lo.append(min(vals))
            med.append(statistics.median(vals))
            hi.append(max(vals))
    return xs, lo, med, hi


def convergence_png(title: str, series: dict[str, list[list[float | None]]]) -> bytes | None:
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    fig = Figure(figsize=(8, 3.8), dpi=100)
    ax = fig.subplots()
    drawn, last = [], 0
    for i, (strategy, curves) in enumerate(series.items()):
        xs, lo, med, hi = band(curves)
        if not xs:
            continue
        color = strategies.STRATEGIES[strategy].color if strategy in strategies.STRATEGIES else f"C{i + 3}"
        ax.fill_between(xs, lo, hi, step="post", color=color, alpha=0.18, linewidth=0)
        ax.vlines(xs[-1], lo[-1], hi[-1], color=color, alpha=0.5, linewidth=4)  # the final spread, even for one point
        ax.step(xs, med, where="post", color=color, linewidth=1.8, marker="o" if len(xs) <= 40 else None,
                markersize=4, label=f"{strategy}: median of {len(curves)} seed{'s' * (len(curves) > 1)} "
                                    "(band: min..max)")
        drawn += lo + hi
        last = max(last, xs[-1])
    if not drawn:
        return None
    if max(drawn) / min(drawn) > 10:
        ax.set_yscale("log")
        plain = lambda v, _: f"{v:g}"  # 200, not 2x10^2; minor ticks labelled at 2x and 5x only
        ax.yaxis.set_major_formatter(FuncFormatter(plain))
        ax.yaxis.set_minor_formatter(FuncFormatter(
            lambda v, _: plain(v, _) if v > 0 and round(v / 10 ** math.floor(math.log10(v))) in (2, 5) else ""))
    ax.set_xlim(0, last + max(1, last // 50))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(title=title, xlabel="trials (hardware measurements)", ylabel="best latency so far (us)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})  # no version stamp: rebuilds are identical
    return buf.getvalue()


def _median_range(values: list[float], fmt=fmt_us) -> tuple[str, str]:
    if not values:
        return "-", "-"
    return fmt(statistics.median(values)), f"{fmt(min(values))} .. {fmt(max(values))}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.2g}%" if x < 10 else f"{x:.0f}%"


def _count(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _si(x: float | None, unit: str) -> str:
    if x is None:
        return "-"
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {prefix}{unit}"
    return f"{x:.3g} {unit}"


class _Workload:
    """One workload's stored data, digested once for all sections of the report."""

    def __init__(self, w: dict, exp: dict):
        self.name, self.w, self.exp = w["name"], w, exp
        self.strategies = exp["strategies"]
        self.runs = {s: [a for a in w["arms"] if a["strategy"] == s] for s in self.strategies}
        self.done = {s: [a for a in runs if a["results"]] for s, runs in self.runs.items()}
        self.valid = {s: [a for a in runs if a["results"].validation["passed"]] for s, runs in self.done.items()}
        first = next((a["results"] for runs in self.done.values() for a in runs), None)
        self.tasks = first.tasks if first else []
        self.baselines = (w["baselines"] or {}).get("baselines", {})
        self.device = (first.device if first else (w["baselines"] or {}).get("device", {})).get("name",
                                                                                                 "unknown device")
        self.flops = sum(t["flops"] * t["weight"] for t in self.tasks) if self.tasks else None
        b = (w["baselines"] or {}).get("bytes")
        self.bytes = sum(b.values()) if b else None

    def latencies(self, strategy: str) -> list[float]:
        return [a["results"].timing["tvm"]["median_us"] for a in self.valid[strategy]]

    def noise(self, strategy: str) -> float | None:
        """Median over valid seeds of the relative p10..p90 spread of the end-to-end timing."""
        spreads = [timing.spread(a["results"].timing["tvm"]) for a in self.valid[strategy]]
        return statistics.median(spreads) if spreads else None

    def timed_baselines(self) -> dict[str, dict]:
        return {k: v for k, v in self.baselines.items() if "median_us" in v}

    def curves(self, strategy: str, task: str) -> list[list[float | None]]:
        weights = {t["name"]: t["weight"] for t in self.tasks}
        return [workload_curve(a["trials"], weights) if task == ALL_TASKS else task_curve(a["trials"], task)
                for a in self.runs[strategy] if a["trials"]]

    def curve_names(self) -> list[str]:
        return [ALL_TASKS] + ([t["name"] for t in self.tasks] if len(self.tasks) > 1 else [])


def comparison_blocks(data: dict) -> list[tuple]:
    """The report as blocks: ("h1"|"h2"|"h3"|"p"|"code", text), ("list", [text]), ("table", headers, rows),
    ("img", file name, alt text, png bytes)."""
    exp = data["experiment"]
    wls = [_Workload(w, exp) for w in data["workloads"]]
    devices = sorted({wl.device for wl in wls})
    peak = peak_for(devices[0] if devices else "", exp["peaks"].get("tflops"), exp["peaks"].get("gbs"))
    seeds = len(exp["seeds"])
    blocks = [("h1", "Schedule search comparison: " + ", ".join(exp["strategies"])),
              ("p", f"{_count(len(wls), 'workload')} ({exp['size']} size), strategies {', '.join(exp['strategies'])}, "
                    f"{_count(seeds, 'search seed')} each ({', '.join(map(str, exp['seeds']))}), "
                    f"{exp['trials_per_task']} hardware measurements per task and arm, one database per arm and seed; "
                    f"same target, builder, runner and validation for every arm.")]
    blocks += _convergence(wls)
    blocks += _efficiency(wls)
    blocks += _final(wls, peak, exp)
    blocks += _environment(data, wls, peak)
    blocks += [("h2", "Notes"), ("list", _notes(data, wls, peak))]
    return blocks


def _convergence(wls: list[_Workload]) -> list[tuple]:
    out = [("h2", "Convergence"),
           ("p", "Best kernel latency found so far against trials spent, as MetaSchedule's runner measured it. "
                 "Line: median over seeds; band: min..max over seeds. For a workload of several tasks the "
                 "first plot sums weight x best kernel over its tasks (defined once every task has a "
                 "measurement); one plot per task follows.")]
    for wl in wls:
        out.append(("h3", wl.name))
        for i, task in enumerate(wl.curve_names()):
            title = f"{wl.name}" if task == ALL_TASKS else f"{wl.name}: task {task}"
            png = convergence_png(title, {s: wl.curves(s, task) for s in wl.strategies})
            if png is None:
                out.append(("p", f"{title}: no successful measurement yet."))
            else:
                out.append(("img", f"{wl.name}-{i}.png", f"convergence of {title}", png))
    return out


def _efficiency(wls: list[_Workload]) -> list[tuple]:
    out, arm = [("h2", "Sample efficiency")], strategies.REFERENCE
    if not any(arm in wl.strategies for wl in wls):
        return out + [("p", f"No {arm} arm in this comparison: nothing to measure sample efficiency against.")]
    out.append(("p", f"Trials each arm needed to come within 90% of {arm.capitalize()}'s final best (latency <= best "
                     f"/ 0.9) and to match it (latency <= best). {arm.capitalize()}'s final best: the median over its "
                     "seeds (the upper middle one for an even count). Cells: median over seeds (the lower middle "
                     "one for an even count), 'never' when more than half the seeds never got there; in brackets, "
                     "the seeds that did."))
    rows = []
    for wl in wls:
        for task in wl.curve_names():
            finals = [c[-1] for c in wl.curves(arm, task) if c and c[-1] is not None]
            if not finals:
                continue
            ref = statistics.median_high(finals)
            for s in wl.strategies:
                curves = wl.curves(s, task)
                cells = []
                for limit in (ref / 0.9, ref):
                    hits = [trials_to_reach(c, limit) for c in curves]
                    med = statistics.median_low([h if h is not None else math.inf for h in hits]) if hits else math.inf
                    got = sum(h is not None for h in hits)
                    cells.append(f"{'never' if med == math.inf else f'{med:g}'} ({got}/{len(hits)})")
                rows.append([wl.name, task, s, fmt_us(ref), *cells])
    return out + [("table", ["workload", "task", "arm", f"{arm} final best", "trials to 90%", "trials to 100%"], rows)]


def _final(wls: list[_Workload], peak: dict | None, exp: dict) -> list[tuple]:
    out = [("h2", "Final results")]
    for wl in wls:
        out.append(("h3", wl.name))
        bound = roofline_us(wl.flops, wl.bytes, peak)
        base = wl.timed_baselines()
        rows = []
        for s in wl.strategies:
            lat = wl.latencies(s)
            med, rng = _median_range(lat)
            m = statistics.median(lat) if lat else None
            speedups = [f"{base[k]['median_us'] / m:.2f}x" if m and k in base else "-" for k in BASELINES]
            rows.append([s, f"{len(lat)}/{len(wl.runs[s])}", med, rng, _pct(100 * wl.noise(s) if lat else None),
                         *speedups, _pct(100 * bound / m if bound and m else None)])
        for k, name in BASELINES.items():
            b = wl.baselines.get(k)
            if b is None:
                continue
            if "failed" in b:
                rows.append([name, "-", f"failed: {b['failed']}", "-", "-", "-", "-", "-", "-"])
            else:
                rows.append([name, "-", fmt_us(b["median_us"]), "-", _pct(100 * timing.spread(b)), "-", "-", "-",
                             _pct(100 * bound / b["median_us"] if bound else None)])
        out.append(("p", f"End to end, {exp['repeats']} timed calls per run ({'; '.join(filter(None, [_flop_text(wl), _bound_text(bound, peak)]))})."))
        out.append(("table", ["", "valid seeds", "latency (median over seeds)", "min .. max over seeds",
                              "run spread p10..p90", "vs eager", "vs torch.compile", "vs max-autotune",
                              "% of roofline"], rows))
        out.append(("table", ["arm", "validation", "max abs err", "max rel err", "tolerance",
                              "tuning wall (median, min..max)", "measurements", "LLM requests", "LLM tokens in/out",
                              "LLM cost"], [_quality_row(wl, s) for s in wl.strategies]))
        out.append(("table", *_task_table(wl, peak)))
    return out


def _flop_text(wl: _Workload) -> str:
    parts = []
    if wl.flops is not None:
        parts.append(_si(wl.flops, "FLOP"))
    if wl.bytes is not None:
        parts.append(f"{_si(wl.bytes, 'B')} moved at least once (inputs + outputs + weights)")
    return ", ".join(parts)


def _bound_text(bound: float | None, peak: dict | None) -> str:
    if bound is None:
        return "no roofline: no peak figures for this device" if peak is None else ""
    return f"roofline bound {fmt_us(bound)} at {_peak_text(peak)}"


def _peak_text(peak: dict) -> str:
    parts = [f"{peak['tflops']:g} TFLOP/s fp32"] if peak["tflops"] is not None else []
    return ", ".join(parts + ([f"{peak['gbs']:g} GB/s"] if peak["gbs"] is not None else []))


def _quality_row(wl: _Workload, s: str) -> list[str]:
    done = wl.done[s]
    if not done:
        return [s, "no results", *["-"] * 8]
    vs = [a["results"].validation for a in done]
    checks, failed = sum(v["checks"] for v in vs), sum(v["failed"] for v in vs)
    shape = f"{_count(len(vs[0]['seeds']), 'seed')} x {_count(len(vs[0]['distributions']), 'distribution')} per run"
    wall, wall_rng = _median_range([a["results"].tuning_wall_s for a in done], fmt=lambda x: f"{x:,.0f} s")
    measured = [sum(t["trials"] for t in a["results"].tasks) for a in done]
    errors = [sum(t["errors"] for t in a["results"].tasks) for a in done]
    llm = [(a["results"].search or {}).get("llm") for a in done]
    llm = [u for u in llm if u]
    row = [s, f"{checks - failed}/{checks} checks passed ({shape})",
           f"{max(v['max_abs'] for v in vs):.2e}", f"{max(v['max_rel'] for v in vs):.2e}",
           f"{max(v['tolerance'] for v in vs):g}", f"{wall} ({wall_rng})",
           f"{sum(measured)} in {len(done)} runs, {sum(errors)} failed"]
    if not llm:
        return row + ["-", "-", "-"]
    est = " (estimated)" if any(u["tokens_estimated"] for u in llm) else ""
    return row + [f"{sum(u['requests'] for u in llm)}",
                  f"{sum(u['prompt_tokens'] for u in llm):,} / {sum(u['completion_tokens'] for u in llm):,}{est}",
                  f"${sum(u['cost_usd'] for u in llm):.4f}"]


def _task_table(wl: _Workload, peak: dict | None) -> tuple[list[str], list[list[str]]]:
    headers = ["task", "weight", "FLOPs", "bytes moved", "FLOP/byte", "roofline bound",
               *[f"{s}: best kernel, median (% of bound)" for s in wl.strategies]]
    rows = []
    for t in wl.tasks:
        nbytes = t.get("bytes")  # absent in results written before tune recorded it
        bound = roofline_us(t["flops"], nbytes, peak)
        cells = []
        for s in wl.strategies:
            bests = [b["best_us"] for a in wl.valid[s] for b in a["results"].tasks
                     if b["name"] == t["name"] and b["best_us"] is not None]
            m = statistics.median(bests) if bests else None
            cells.append(f"{fmt_us(m)} ({_pct(100 * bound / m)})" if m and bound else fmt_us(m))
        rows.append([t["name"], str(t["weight"]), _si(t["flops"], "FLOP"), _si(nbytes, "B"),
                     f"{t['flops'] / nbytes:.2f}" if nbytes else "-", fmt_us(bound), *cells])
    return headers, rows


def _environment(data: dict, wls: list[_Workload], peak: dict | None) -> list[tuple]:
    exp = data["experiment"]
    results = [a["results"] for wl in wls for runs in wl.done.values() for a in runs]
    versions: dict[str, set] = {}
    for r in results:
        for k, v in r.versions.items():
            versions.setdefault(k, set()).add(str(v))
    tf32 = [(w["baselines"] or {}).get("tf32") for w in data["workloads"]]
    tf32_on = any(t and any(t.values()) for t in tf32)
    rows = [["device", ", ".join(sorted({f"{r.device['name']} ({r.device['kind']})" for r in results})) or "-"],
            ["target", exp["target"]],
            *[[k, ", ".join(sorted(v))] for k, v in sorted(versions.items())],
            ["timing", results[0].timing["method"] if results else "-"],
            ["numerics", "fp32; TF32 " + ("ON in PyTorch (torch.backends flags were set)" if tf32_on else
                                          "off in PyTorch (torch.backends.cuda.matmul.allow_tf32 = "
                                          "torch.backends.cudnn.allow_tf32 = False), so eager, torch.compile and "
                                          "TVM all compute in true fp32")],
            ["validation", f"{_count(exp['validation_seeds'], 'seed')} x each input distribution per run, against "
                           + (", ".join(sorted({ref for r in results for ref in r.validation.get("reference", [])}))
                              or "PyTorch")],
            ["roofline peaks", f"{_peak_text(peak)}: {peak['source']}"
             if peak else "none known for this device (give --peak-tflops and --peak-gbs)"]]
    commands = exp.get("commands") or [exp["command"]]
    return [("h2", "Environment"), ("table", ["", "value"], rows),
            ("p", "Command:" if len(commands) == 1 else "Commands (the comparison was resumed; in order):"),
            ("code", "\n".join(" ".join(shlex.quote(str(c)) for c in cmd) for cmd in commands))]


def _notes(data: dict, wls: list[_Workload], peak: dict | None) -> list[str]:
    exp = data["experiment"]
    notes = []
    notes += [s.note for s in strategies.STRATEGIES.values() if s.note and s.name in exp["strategies"]]
    for wl in wls:
        notes += _arm_notes(wl, exp)
        notes += _speed_notes(wl)
        for k, b in wl.baselines.items():
            if "failed" in b:
                notes.append(f"{wl.name}: {BASELINES.get(k, k)} baseline failed: {b['failed']}")
            elif b.get("matches_eager") is False:
                notes.append(f"{wl.name}: {BASELINES.get(k, k)} output differs from eager beyond tolerance "
                             f"(max abs {b['max_abs_vs_eager']:.2e})")
        if wl.w["baselines"] is None:
            notes.append(f"{wl.name}: no PyTorch baselines stored: run compare again")
    notes += _llm_notes(wls)
    devices = sorted({a["results"].device["name"] for wl in wls for runs in wl.done.values() for a in runs}
                     | {wl.w["baselines"]["device"]["name"] for wl in wls if wl.w["baselines"]})
    if len(devices) > 1:
        notes.append(f"Runs were measured on different devices ({', '.join(devices)}): compare with care.")
    if peak and "datasheet" in peak["source"]:
        notes.append(f"The roofline uses {peak['source']}, not figures measured on this machine; "
                     "% of roofline is a lower bound on the headroom, with every byte moved exactly once.")
    notes.append("Convergence and sample efficiency use MetaSchedule's runner times of each kernel alone; the final "
                 "tables time the whole compiled module end to end like PyTorch (timing row of Environment): "
                 "the two are not the same measurement.")
    return notes


def _arm_notes(wl: _Workload, exp: dict) -> list[str]:
    notes = []
    for s in wl.strategies:
        for a in wl.runs[s]:
            arm = f"{wl.name}: {s} seed {a['seed']}"
            if a["results"] is None:
                if a["error"]:  # rerunning may not help (a transcript with no answer for this workload)
                    notes.append(f"{arm} failed ({a['error'].strip().splitlines()[-1]}); compare tries it again "
                                 "when run again.")
                else:
                    notes.append(f"{arm} has no results (not run yet, or interrupted); run compare again to resume it.")
                continue
            v = a["results"].validation
            if not v["passed"]:
                problem = v["failures"][0].get("problem") if v["failures"] else None
                notes.append(f"{arm} FAILED validation ({v['failed']} of {v['checks']} checks"
                             f"{': ' + problem if problem else ''}): left out of every latency and speedup above.")
            if a["reused_from"]:
                notes.append(f"{arm} was tuned and timed in an earlier comparison ({a['reused_from']}) and copied "
                             "here; the PyTorch baselines were timed in this one.")
        short = {}  # (task, why) -> [(seed, trials)] where the arm spent less than the budget
        for a in wl.done[s]:
            for t in a["results"].tasks:
                if t["trials"] < a["results"].trials_per_task:
                    why = t.get("ended") or "its search ran out of new candidates"
                    short.setdefault((t["name"], why), []).append(f"seed {a['seed']}: {t['trials']}")
        for (task, why), where in short.items():
            notes.append(f"{wl.name}: {s} measured fewer than {exp['trials_per_task']} candidates for task {task} "
                         f"({', '.join(where)}): {why}, so it spent less than the budget.")
    return notes


def _speed_notes(wl: _Workload) -> list[str]:
    """Speedups inside the run-to-run spread, and where PyTorch was faster."""
    notes = []
    base = wl.timed_baselines()
    arm = strategies.REFERENCE
    reference = wl.latencies(arm) if arm in wl.strategies else []
    for s in wl.strategies:
        lat = wl.latencies(s)
        if not lat:
            continue
        m, noise = statistics.median(lat), wl.noise(s)
        others = [(BASELINES[k], b["median_us"], timing.spread(b)) for k, b in base.items()]
        if s != arm and reference:
            others.append((arm, statistics.median(reference), wl.noise(arm)))
        for name, other, other_noise in others:
            if abs(m - other) <= max(noise * m, other_noise * other):
                notes.append(f"{wl.name}: the difference between {s} and {name} (speedup {other / m:.2f}x) is within "
                             f"run-to-run noise (p10..p90 spread: {s} {100 * noise:.0f}%, "
                             f"{name} {100 * other_noise:.0f}%).")
            elif other < m and name in BASELINES.values():
                notes.append(f"{wl.name}: {name} ({fmt_us(other)}) was faster than {s} ({fmt_us(m)}).")
    return notes


def _llm_notes(wls: list[_Workload]) -> list[str]:
    notes = []
    backends: dict[tuple, list[str]] = {}
    for wl in wls:
        for strategy, a in [(s, a) for s in wl.strategies for a in wl.done.get(s, [])]:
            u = (a["results"].search or {}).get("llm")
            if u is None:  # no LLM in this strategy, or hybrid without a model
                continue
            key = (u.get("backend", "unknown"), u.get("model"), bool(u.get("tokens_estimated")))
            backends.setdefault(key, []).append(f"{wl.name} {strategy} seed {a['seed']}")
    for (backend, model, estimated), where in backends.items():
        text = {"replay": "came from the replay backend: answers were read back from a recorded transcript, "
                          "no model was queried in this run",
                "files": "came from the files backend: answers were supplied as files by someone or something "
                         "outside schedsearch",
                "openai": "came from an OpenAI-compatible endpoint"}.get(backend, f"came from backend {backend}")
        notes.append(f"LLM arm ({'model ' + model if model else 'model unknown'}) {text} ({', '.join(where)})"
                     + ("; token counts partly estimated (4 characters a token)." if estimated else "."))
    return notes


def render_markdown(blocks: list[tuple]) -> str:
    cell = lambda x: str(x).replace("|", "\\|").replace("\n", " ")
    out = []
    for b in blocks:
        kind = b[0]
        if kind in ("h1", "h2", "h3"):
            out.append("#" * int(kind[1]) + " " + b[1])
        elif kind == "p":
            out.append(b[1])
        elif kind == "code":
            out.append(f"```\n{b[1]}\n```")
        elif kind == "list":
            out.append("\n".join(f"- {x}" for x in b[1]))
        elif kind == "table":
            headers, rows = b[1], b[2]
            out.append("\n".join(["| " + " | ".join(map(cell, headers)) + " |",
                                  "|" + "---|" * len(headers), *("| " + " | ".join(map(cell, r)) + " |" for r in rows)]))
        elif kind == "img":
            out.append(f"![{b[2]}](plots/{b[1]})")
    return "\n\n".join(out) + "\n"


CSS = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:13px}th,td{border:1px solid #ccc;padding:3px 8px;text-align:left}
th{background:#f0f0f0}img{display:block;max-width:100%;margin:1em 0}pre{background:#f6f6f6;padding:.6em;white-space:pre-wrap}
li{margin:.3em 0}"""


def render_html(blocks: list[tuple]) -> str:
    e = html.escape
    title = next((b[1] for b in blocks if b[0] == "h1"), "schedsearch report")
    out = [f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title>'
           f"<style>{CSS}</style></head><body>"]
    for b in blocks:
        kind = b[0]
        if kind in ("h1", "h2", "h3", "p"):
            out.append(f"<{kind}>{e(b[1])}</{kind}>")
        elif kind == "code":
            out.append(f"<pre><code>{e(b[1])}</code></pre>")
        elif kind == "list":
            out.append("<ul>" + "".join(f"<li>{e(x)}</li>" for x in b[1]) + "</ul>")
        elif kind == "table":
            head = "".join(f"<th>{e(str(h))}</th>" for h in b[1])
            body = "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in r) + "</tr>" for r in b[2])
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif kind == "img":
            data = base64.b64encode(b[3]).decode()
            out.append(f'<img alt="{e(b[2])}" src="data:image/png;base64,{data}">')
    return "\n".join(out + ["</body></html>"]) + "\n"


def write_comparison_report(data: dict, out: Path) -> list[Path]:
    """report.md with its plots in plots/, and report.html with the same plots embedded."""
    blocks = comparison_blocks(data)
    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    for old in plots.glob("*.png"):  # a rebuild must not leave plots of workloads no longer in the report
        old.unlink()
    for b in blocks:
        if b[0] == "img":
            (plots / b[1]).write_bytes(b[3])
    (out / "report.md").write_text(render_markdown(blocks))
    (out / "report.html").write_text(render_html(blocks))
    return [out / "report.md", out / "report.html"]

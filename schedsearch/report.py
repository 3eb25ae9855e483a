"""Results -> tables people can read."""
from __future__ import annotations


def fmt_us(us: float | None) -> str:
    if us is None:
        return "-"
    return f"{us / 1000:,.2f} ms" if us >= 10_000 else f"{us:,.1f} us"


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()
    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, rows)])


def summary_table(results: dict) -> str:
    """What `tune` prints at the end: per task, then end to end against PyTorch."""
    tasks = table(["task", "weight", "trials", "errors", "best"],
                  [[t["name"], t["weight"], t["trials"], t["errors"], fmt_us(t["best_us"])] for t in results["tasks"]])
    v, tm = results["validation"], results["timing"]
    verdict = "PASSED" if v["passed"] else f"FAILED ({v['failed']} of {v['checks']} checks)"
    rows = [["TVM tuned", fmt_us(tm["tvm"]["median_us"]), f"{fmt_us(tm['tvm']['p10_us'])} .. {fmt_us(tm['tvm']['p90_us'])}"]]
    if "torch_eager" in tm:
        e = tm["torch_eager"]
        rows.append(["PyTorch eager", fmt_us(e["median_us"]), f"{fmt_us(e['p10_us'])} .. {fmt_us(e['p90_us'])}"])
    end = table(["end to end", "median", "p10 .. p90"], rows)
    lines = [tasks, "", end, ""]
    if "speedup_vs_eager" in tm:
        lines.append(f"speedup vs PyTorch eager: {tm['speedup_vs_eager']:.2f}x")
    lines.append(f"validation: {verdict}: {v['checks']} checks (seeds {v['seeds']}, {', '.join(v['distributions'])}), "
                 f"max abs {v['max_abs']:.2e}, max rel {v['max_rel']:.2e}, tolerance {v['tolerance']:g}")
    lines.append(f"device: {results['device']['name']}; tuning {results['tuning_wall_s']:.0f} s")
    return "\n".join(lines)

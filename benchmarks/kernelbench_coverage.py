"""Coverage of KernelBench: every problem file through `schedsearch tune` on LLVM, stage by stage.

    git clone https://github.com/ScalingIntelligence/KernelBench   # not part of this repository
    nice python benchmarks/kernelbench_coverage.py KernelBench/KernelBench --sample 3:10 -o runs/kb

Each file is run as a user runs it: `python -m schedsearch tune FILE --strategy ansor --trials T --target llvm`
in a process of its own, killed after --timeout seconds. What it reached is read from tune's own stage lines:
load (the file imports, the model and inputs build), onnx (torch.onnx export), relax (TVM's ONNX importer)
and tasks (legalize, fuse, extract), tune (the search measured its trials), compile, validate (the README's
criterion at fp32 1e-4) and passed. OUT/coverage.md and OUT/coverage.json hold the table: file, stage
reached, the error's line, seconds.

Sizes are scaled to a CPU budget by rewriting the file's source: every integer literal above --floor (16)
in a module-level assignment (`batch_size = 128`, `N = 2048 * 2`, `layer_sizes = [400, 800]`) or in
get_inputs()/get_init_inputs() is divided by one power-of-two factor F, to no less than --floor; literals
up to the floor (kernel sizes, strides, padding, axes, group counts) are kept. F is the smallest power of
two at which the model, built on the meta device, has at most --max-elements input + parameter + output
elements and its forward at most --max-flops (torch's FlopCounterMode), or the largest at which that forward
still runs (shapes that scale apart, a dilated kernel and its input, break at some F; where a size held at
the floor broke it, the floor is halved, twice at most, first). Names computed from others
(`bias_shape = (out_channels, 1, 1)`) follow, and the model's own literals are not touched. The scaled
file is written to OUT/problems/ with F in its first line, so every row can be rerun by hand.
"""
from __future__ import annotations

import argparse
import ast
import itertools
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
import types
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STAGES = ["scale", "load", "onnx", "relax", "tasks", "tune", "compile", "validate", "passed"]


@dataclass
class Row:
    file: str  # levelN/name.py
    stage: str  # the last stage reached: passed, or the stage that failed
    error: str | None  # the failure in one line
    seconds: float
    factor: int | None = None  # sizes divided by this (module docstring)
    tasks: int | None = None
    exhausted: bool = False  # a task's space had fewer schedules than the trials asked for


def size_literals(source: str, floor: int) -> list[ast.Constant]:
    """The integer literals that set sizes: above `floor`, in module-level assignments or get_inputs/get_init_inputs."""
    spots = []
    for stmt in ast.parse(source).body:
        if isinstance(stmt, (ast.Assign, ast.AnnAssign, ast.AugAssign)) and stmt.value is not None:
            nodes = ast.walk(stmt.value)
        elif isinstance(stmt, ast.FunctionDef) and stmt.name in ("get_inputs", "get_init_inputs"):
            nodes = ast.walk(stmt)
        else:
            continue
        spots += [n for n in nodes if isinstance(n, ast.Constant) and type(n.value) is int and n.value > floor]
    return spots


def scaled_source(source: str, factor: int, floor: int) -> str:
    lines = source.encode().split(b"\n")  # ast's column offsets count UTF-8 bytes
    for n in sorted(size_literals(source, floor), key=lambda n: (n.lineno, n.col_offset), reverse=True):
        line = lines[n.lineno - 1]
        new = str(max(floor, n.value // factor)).encode()
        lines[n.lineno - 1] = line[:n.col_offset] + new + line[n.end_col_offset:]
    return b"\n".join(lines).decode()


def cost_on_meta(source: str) -> tuple[int | None, int | None]:
    """(input + parameter + output elements, forward FLOPs) on the meta device: FLOPs None where the forward
    does not run there, both None where the model or its inputs do not build (a check of the sizes failed)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    module = types.ModuleType("_kernelbench_probe")
    with torch.device("meta"):
        try:
            exec(compile(source, "<problem>", "exec"), module.__dict__)  # a KernelBench file, as the loader runs it
            model = module.Model(*module.get_init_inputs())
            inputs = [t for t in module.get_inputs() if isinstance(t, torch.Tensor)]
        except Exception:
            return None, None
        elements = sum(t.numel() for t in inputs) + sum(t.numel() for t in model.state_dict().values())
        try:
            with FlopCounterMode(display=False) as counter, torch.no_grad():
                out = model(*inputs)
        except Exception:
            return elements, None
    outs = out if isinstance(out, (tuple, list)) else [out]
    return elements + sum(t.numel() for t in outs if isinstance(t, torch.Tensor)), counter.get_total_flops()


def scale_file(src: Path, dst: Path, floor: int, max_elements: int, max_flops: float) -> int:
    source = src.read_text()
    text, f = source, floor
    elements, flops = cost_on_meta(source)
    ran = flops is not None  # whether the unscaled forward runs on meta
    broken = lambda elements, flops: elements is None or (ran and flops is None)
    factor = 1
    while elements is not None:  # else the file as it is does not build: tune says why
        fits = elements <= max_elements and (flops is None or flops <= max_flops)
        if fits or factor >= 1 << 16 or not size_literals(text, f):
            break
        # Sizes held at the floor while others shrink can break a relation between them (a width that
        # ConvTranspose doubles into LayerNorm's channel count): lower floors, then the last factor that ran.
        for lower in (floor, floor // 2, floor // 4):
            scaled = scaled_source(source, factor * 2, lower)
            cost = cost_on_meta(scaled)
            if not broken(*cost):
                break
        if broken(*cost):
            break
        factor, text, f, (elements, flops) = factor * 2, scaled, lower, cost
    floor = f
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text(f"# {src.name} with its sizes divided by {factor} (floor {floor}): "
                   f"{elements} elements, {flops} FLOPs (benchmarks/kernelbench_coverage.py)\n" + text)
    return factor


# tune's stage lines (tune.stage, cli.cmd_tune), in order, and the stage each one shows was passed.
REACHED = [(re.compile(r"^tuning \S+ \("), "load"), (re.compile(r"\] \d+ task\(s\): "), "tasks"),
           (re.compile(r"\] compiling the module"), "tune"), (re.compile(r"\] validating \("), "compile")]


def failed_stage(reached: str, error: str) -> str:
    """The stage that failed after `reached`: the export and the import are one of tune's stages, told
    apart by their errors (frontend.export_onnx, frontend.import_onnx)."""
    if reached == "load":
        if error.startswith("ONNX export of"):
            return "onnx"
        if "frontend ONNX" in error or "TVM's ONNX importer" in error:
            return "relax"
        return "tasks"
    return STAGES[STAGES.index(reached) + 1]


def error_line(output: str) -> str:
    lines = [l.strip() for l in output.splitlines() if l.strip()]
    mine = [l for l in lines if l.startswith("schedsearch: error: ")]
    if mine:
        return mine[0][len("schedsearch: error: "):]
    tb = [l for l in lines if re.match(r"^[\w.]+(Error|Exception|Interrupt)\b", l)]
    return (tb or lines or ["no output"])[-1][:400]


def run_one(path: Path, kb_dir: Path, out: Path, args) -> Row:
    rel = path.relative_to(kb_dir).as_posix()
    t0 = time.time()
    scaled = out / "problems" / rel
    run_dir = out / "runs" / rel.removesuffix(".py")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    scale = [sys.executable, __file__, "--scale-one", str(path), str(scaled),
             json.dumps([args.floor, args.max_elements, args.max_flops])]
    p = _run(scale, env, args.timeout)
    if p.returncode != 0:
        return Row(rel, "scale", error_line(p.stdout), round(time.time() - t0, 1))
    factor = int(p.stdout.split()[-1])
    shutil.rmtree(run_dir, ignore_errors=True)  # a run of the file as scaled now, not a resumed one
    tune = [sys.executable, "-m", "schedsearch", "tune", str(scaled), "--strategy", "ansor", "--trials",
            str(args.trials), "--target", "llvm", "--validation-seeds", str(args.validation_seeds),
            "--repeats", str(args.repeats), "-o", str(run_dir)]
    p = _run(tune, env, max(1.0, args.timeout - (time.time() - t0)))
    seconds = round(time.time() - t0, 1)
    (run_dir.parent).mkdir(parents=True, exist_ok=True)
    Path(f"{run_dir}.console.log").write_text(p.stdout)
    tasks = re.search(r"\] (\d+) task\(s\): ", p.stdout)
    row = Row(rel, "passed", None, seconds, factor, int(tasks.group(1)) if tasks else None,
              "space exhausted" in p.stdout)
    if p.returncode == 0:
        return row
    reached = "scale"
    for line in p.stdout.splitlines():
        for pattern, stage in REACHED:
            if pattern.search(line):
                reached = stage
    if p.returncode == -9:
        row.stage = STAGES[STAGES.index(reached) + 1]
        row.error = timed_out(p.stdout, row.stage, args.timeout)
        return row
    row.error = error_line(p.stdout)
    row.stage = failed_stage(reached, row.error) if reached != "scale" else "load"
    if row.stage == "validate":
        row.error = validation_failure(run_dir) or row.error
    return row


def timed_out(output: str, stage: str, timeout: float) -> str:
    """The timeout, with where it struck: the task in search (after tune's "N task(s): a, b; searching", each
    task's progress line "[i/N name] ... d/t trials" comes once it has measured), compile, or validation."""
    listed = re.search(r"\] \d+ task\(s\): (.*); searching", output)
    if stage != "tune" or not listed:
        where = {"compile": " compiling the module", "validate": " validating and timing the module"}.get(stage, "")
        searched = re.search(r"^\[ *(\d+) s\] compiling", output, re.M)
        bests = [(float(us.replace(",", "")), name) for name, us in
                 re.findall(r"^\[\d+/\d+ ([^\]]+)\][^\n]* best ([\d,.]+) us", output, re.M)]
        if searched and stage == "validate":
            where += f" (the search took {searched.group(1)} s" + (
                f"; slowest kernel {max(bests)[1]}, {max(bests)[0] / 1e3:,.1f} ms a call)" if bests else ")")
        return f"timed out after {timeout:g} s{where}"
    names = listed.group(1).split(", ")
    progress = re.findall(r"^\[(\d+)/\d+ [^\]]+\][^\n]*?(\d+)/(\d+) trials", output, re.M)
    i = 0 if not progress else int(progress[-1][0]) - (progress[-1][1] != progress[-1][2])
    i = min(i, len(names) - 1)
    return f"timed out after {timeout:g} s searching task {names[i]} ({i + 1} of {len(names)})"


def validation_failure(run_dir: Path) -> str | None:
    """The first failed check's problem, with how many failed: results.json has them."""
    try:
        v = json.loads((run_dir / "results.json").read_text())["validation"]
    except (OSError, ValueError, KeyError):
        return None
    if not v["failures"]:
        return "not checkable: the reference is NaN/Inf on every value of every check"
    f = v["failures"][0]
    return f"{v['failed']} of {v['checks']} checks failed, e.g. seed {f['seed']} {f['distribution']}: {f['problem']}"


def _run(cmd: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
    """`cmd` with stderr into stdout, its whole process group killed at the timeout (returncode -9)."""
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    try:
        stdout, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, 9)
        stdout, _ = p.communicate()
        return subprocess.CompletedProcess(cmd, -9, stdout)
    return subprocess.CompletedProcess(cmd, p.returncode, stdout)


def number(name: str) -> int:
    found = re.match(r"\d+", Path(name).name)
    return int(found.group()) if found else 0


def sample_sizes(text: str | None, levels: list[int]) -> dict[int, int]:
    """--sample N (every level) or L:N,L:N (those levels)."""
    if not text:
        return {}
    if ":" not in text:
        return {level: int(text) for level in levels}
    return {int(l): int(n) for l, n in (part.split(":") for part in text.split(","))}


def problem_files(kb_dir: Path, levels: list[int], sample: dict[int, int], seed: int) -> list[Path]:
    """The levels' files in turn (1, 2, 3, 1, 2, ...), each level's in a random order (seeded): a run cut short
    has run a random sample of each level."""
    per_level = []
    for level in levels:
        found = sorted((kb_dir / f"level{level}").glob("*.py"), key=lambda p: number(p.name))
        if not found:
            raise SystemExit(f"kernelbench_coverage: no problem files in {kb_dir / f'level{level}'}")
        if sample.get(level, len(found)) < len(found):
            found = random.Random(seed).sample(found, sample[level])
        per_level.append(random.Random(seed + level).sample(found, len(found)))
    return [f for group in itertools.zip_longest(*per_level) for f in group if f is not None]


def write_tables(rows: list[Row], out: Path, args) -> None:
    out.mkdir(parents=True, exist_ok=True)
    rows = sorted(rows, key=lambda r: (r.file.split("/")[0], number(r.file)))
    (out / "coverage.json").write_text(json.dumps({"settings": settings(args), "rows": [asdict(r) for r in rows]},
                                                  indent=1))
    lines = [f"settings: {settings(args)}", ""]
    by_level: dict[str, list[Row]] = {}
    for r in rows:
        by_level.setdefault(r.file.split("/")[0], []).append(r)
    lines += ["| level | files | passed | " + " | ".join(f"failed at {s}" for s in STAGES[:-1]) + " |",
              "|---" * (len(STAGES) + 2) + "|"]
    for level, rs in by_level.items():
        counts = [sum(r.stage == s for r in rs) for s in STAGES]
        lines.append(f"| {level} | {len(rs)} | {counts[-1]} ({100 * counts[-1] / len(rs):.0f}%) | "
                     + " | ".join(str(c) for c in counts[:-1]) + " |")
    lines += ["", "| file | stage | F | tasks | s | error |", "|---|---|---|---|---|---|"]
    for r in rows:
        note = "space exhausted" if r.exhausted and r.stage == "passed" else ""
        lines.append(f"| {r.file} | {r.stage} | {r.factor or ''} | {r.tasks or ''} | {r.seconds:.0f} | "
                     f"{(r.error or note).replace('|', '/')} |")
    (out / "coverage.md").write_text("\n".join(lines) + "\n")


def settings(args) -> str:
    return (f"--trials {args.trials} --validation-seeds {args.validation_seeds} --repeats {args.repeats} "
            f"--timeout {args.timeout:g} --floor {args.floor} --max-elements {args.max_elements} "
            f"--max-flops {args.max_flops:g}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("kb_dir", type=Path, help="KernelBench's problem directory (holding level1/, level2/, level3/)")
    p.add_argument("--levels", default="1,2,3")
    p.add_argument("--sample", help="N: this many files of each level, drawn at random (seeded); L:N,...: of level L")
    p.add_argument("--only", help="regex on levelN/name.py: run only the files it matches")
    p.add_argument("--rerun", help="regex on levelN/name.py: run these again though OUT has their rows")
    p.add_argument("--seed", type=int, default=0, help="seed of --sample's draw and of the order")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per file (default 600)")
    p.add_argument("--trials", type=int, default=2, help="tune's --trials (default 2)")
    p.add_argument("--validation-seeds", type=int, default=1,
                   help="tune's --validation-seeds (default 1: 4 checks, one per input distribution)")
    p.add_argument("--repeats", type=int, default=3, help="tune's --repeats for the timing (default 3)")
    p.add_argument("--floor", type=int, default=16, help="size literals are not scaled below this (default 16)")
    p.add_argument("--max-elements", type=int, default=1 << 17)
    p.add_argument("--max-flops", type=float, default=5e7)
    p.add_argument("--jobs", type=int, default=1, help="files at once, one process each (default 1)")
    p.add_argument("-o", "--output", type=Path, required=True)
    if sys.argv[1:2] == ["--scale-one"]:  # run_one's first step, in a process of its own
        src, dst, limits = sys.argv[2:]
        print(scale_file(Path(src), Path(dst), *json.loads(limits)))
        return 0
    args = p.parse_args()
    kb_dir = args.kb_dir.resolve()
    levels = [int(l) for l in args.levels.split(",")]
    files = problem_files(kb_dir, levels, sample_sizes(args.sample, levels), args.seed)
    if args.only:
        files = [f for f in files if re.search(args.only, f.relative_to(kb_dir).as_posix())]
    out = args.output.resolve()
    # Rows of an earlier run into OUT with the same settings are kept (the run resumes); --rerun's are run again.
    rows: dict[str, Row] = {}
    if (out / "coverage.json").is_file():
        earlier = json.loads((out / "coverage.json").read_text())
        if earlier["settings"] == settings(args):
            rows = {r["file"]: Row(**r) for r in earlier["rows"]
                    if not (args.rerun and re.search(args.rerun, r["file"]))}
    files = [f for f in files if f.relative_to(kb_dir).as_posix() not in rows]
    with ThreadPoolExecutor(args.jobs) as pool:  # rows written as files finish: a killed run keeps them
        for done in as_completed([pool.submit(run_one, f, kb_dir, out, args) for f in files]):
            row = done.result()
            rows[row.file] = row
            print(f"{row.file:70} {row.stage:9} {row.seconds:5.0f} s  {row.error or ''}", flush=True)
            write_tables(list(rows.values()), out, args)
    rows = list(rows.values())
    write_tables(rows, out, args)
    passed = sum(r.stage == "passed" for r in rows)
    print(f"{passed} of {len(rows)} passed; {out / 'coverage.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

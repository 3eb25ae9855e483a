"""How many of a program library's programs fit each task of some workloads: re-targeted to the task's
extents (schedsearch/library.py) and checked as the proposal loop checks a proposal (parse, apply lifted,
post-processors, feature extraction). Runs without a GPU: all of it is compile-time, also for CUDA.

    python benchmarks/library_retarget.py schedules/library/cuda.json workloads/level*/*.py [--size default]

Every program is tried on every task, of its kernel structure or not, to show what the structure key keeps
out; the library itself proposes only those of the task's structure.
"""
import argparse
import collections
import random
import tempfile
from pathlib import Path

from tvm.s_tir import meta_schedule as ms
from tvm.target import Target

from schedsearch import frontend, library, workload
from schedsearch.schedule_lang import ScheduleLangError
from schedsearch.strategies.proposals import Proposal, ProposalSearch

# The lent H200's limits, as schedsearch.target.resolve read them from the device (its results.json).
H200 = {"kind": "cuda", "arch": "sm_90a", "max_threads_per_block": 1024, "max_num_threads": 1024,
        "max_shared_memory_per_block": 49152, "thread_warp_size": 32, "registers_per_block": 65536,
        "l2_cache_size_bytes": 62914560}


def checker(task, target) -> ProposalSearch:
    """The proposal loop's own check (ProposalSearch.check) for `task`, outside a search."""
    ctx = ms.TuneContext(mod=task.mod, target=target, space_generator="post-order-apply", task_name=task.name)
    search = ProposalSearch(None, {})
    search._initialize_with_tune_context(ctx)
    search.rng, search.seen, search.rejected, search.round = random.Random(0), set(), [], 0  # as pre_tuning sets them
    return search


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("library", type=Path)
    p.add_argument("workloads", nargs="+")
    p.add_argument("--size", default="default")
    p.add_argument("--target", default="cuda", help="cuda (the H200's limits, no GPU needed) | llvm")
    p.add_argument("--draws", type=int, default=library.PER_ENTRY,
                   help=f"re-targetings per program and task, as the library proposes them (default {library.PER_ENTRY})")
    args = p.parse_args()
    target = Target(H200, host={"kind": "llvm"}) if args.target == "cuda" else Target({"kind": "llvm"})
    entries = [e for e in library.read(args.library) if e.target == target.kind.name]
    print(f"{len(entries)} {target.kind.name} programs in {args.library}")
    tmp = Path(tempfile.mkdtemp())
    for path in args.workloads:
        wl = workload.load(path, args.size)
        mod = frontend.import_onnx(frontend.export_onnx(wl, tmp / f"{wl.name}.onnx"), wl.shapes())
        for task in frontend.extract_tasks(mod, target):
            fitting = {id(e): extra for e, extra in library.Library(None, "", entries).for_task(task.mod, target.kind.name)}
            search = checker(task, target)
            rows = collections.defaultdict(lambda: collections.Counter())
            for e in entries:
                match = ("other structure" if id(e) not in fitting else "same structure" if not fitting[id(e)]
                         else f"+{fitting[id(e)]} elementwise")
                row = rows[(e.workload, match)]
                row["programs"] += 1
                valid = 0
                for k in range(args.draws):
                    try:
                        text = library.retarget(e.program, task.mod, seed=k + 1, redraw_tiles=k > 0)
                    except ScheduleLangError as err:
                        row[f"does not apply: {err.message[:60]}"] += 1
                        break
                    if text is None:
                        break
                    outcomes, schedules = search.check([Proposal(text, "library")])
                    row["variants"] += 1
                    valid += bool(schedules)
                    if not schedules:
                        row[f"rejected: {outcomes[0].reason[:60]}"] += 1
                row["variants valid"] += valid
                row["programs with a valid variant"] += valid > 0
            print(f"\n{wl.name} ({wl.size}) {task.name}: {library.shapes(task.mod)}")
            for (source, match), c in sorted(rows.items()):
                why = "; ".join(f"{n} {w}" for w, n in c.most_common()
                                if w.startswith(("does not", "rejected")))
                print(f"  {source:20} {match:16} {c['programs with a valid variant']:2} of {c['programs']:2} programs "
                      f"valid ({c['variants valid']} of {c['variants']} re-targetings)  {why[:200]}")


if __name__ == "__main__":
    main()

"""The program library on LLVM: hand-written programs (test_hybrid's, with literal tile sizes as a model writes
them) are measured here on the small layernorm and matmul (a real build and timed run each, no search), kept
by `schedsearch library build`, and re-targeted by `rules` and `hybrid` to other shapes of the same kernels,
whose results are validated against PyTorch. The committed CUDA library is re-targeted without a GPU."""
import json

import numpy as np
import pytest
import tvm
from tvm.s_tir import meta_schedule as ms
from tvm.target import Target

from conftest import ROOT
from schedsearch import frontend, library, schedule_lang, target as targets, workload
from schedsearch.cli import main
from schedsearch.errors import UserError
from test_hybrid import LAYERNORM, LAYERNORM_PROGRAM, MATMUL, MATMUL_PROGRAM, structure

# The lent H200's limits (its results.json): CUDA post-processing and features need no GPU.
H200 = Target({"kind": "cuda", "arch": "sm_90a", "max_threads_per_block": 1024, "max_num_threads": 1024,
               "max_shared_memory_per_block": 49152, "thread_warp_size": 32, "registers_per_block": 65536,
               "l2_cache_size_bytes": 62914560}, host={"kind": "llvm"})


def reshaped(tmp_path, path: str, sizes: str) -> str:
    """The workload file with its "small" size replaced by `sizes` (a dict literal)."""
    text = open(path).read()
    line = next(l for l in text.splitlines() if l.startswith("SIZES = "))
    out = tmp_path / path.rsplit("/", 1)[1]
    out.write_text(text.replace(line, f'SIZES = {{"small": {sizes}}}'))
    return str(out)


def tasks_of(path: str, tmp_path, target) -> list:
    wl = workload.load(path, "small")
    return frontend.extract_tasks(frontend.import_onnx(frontend.export_onnx(wl, tmp_path / f"{wl.name}.onnx"),
                                                       wl.shapes()), target)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """A database of the two programs, each lifted as the proposal loop lifts it, built and timed on this CPU."""
    tmp = tmp_path_factory.mktemp("recorded")
    target = targets.resolve("llvm")
    (tmp / "database").mkdir()
    db = ms.database.JSONDatabase(work_dir=str(tmp / "database"))
    for path, program in ((LAYERNORM, LAYERNORM_PROGRAM), (MATMUL, MATMUL_PROGRAM)):
        [task] = tasks_of(path, tmp, target)
        sch = schedule_lang.fresh_schedule(task.mod)
        schedule_lang.apply(schedule_lang.parse(program), sch, lift=True)
        args = ms.arg_info.ArgInfo.from_prim_func(sch.mod["main"])
        data = [tvm.runtime.tensor(np.random.rand(*[int(d) for d in a.shape]).astype(str(a.dtype))) for a in args]
        timer = tvm.compile(sch.mod, target=target).mod.time_evaluator("main", tvm.cpu(), number=3, repeat=3)
        secs = list(timer(*data).results)
        db.commit_tuning_record(ms.database.TuningRecord(sch.trace, db.commit_workload(task.mod), secs, target, args))
    lib = tmp / "cpu.json"
    assert main(["library", "build", str(tmp / "database"), "-o", str(lib)]) == 0
    return lib


def test_structure_key_ignores_sizes_and_names_the_kernel(tmp_path):
    llvm = targets.resolve("llvm")
    [small] = tasks_of(LAYERNORM, tmp_path, llvm)
    [other] = tasks_of(reshaped(tmp_path, LAYERNORM, '{"BATCH": 3, "FEATURES": 2, "DIM1": 8, "DIM2": 40}'), tmp_path, llvm)
    [matmul] = tasks_of(MATMUL, tmp_path, llvm)
    assert library.structure_key(small.mod) == library.structure_key(other.mod) != library.structure_key(matmul.mod)
    assert "ln_stats SRRR" in library.structure_key(small.mod)
    # A matmul's program is offered to a matmul + bias + GELU kernel, after the matmuls of its own structure.
    [gelu] = tasks_of(str(ROOT / "workloads/level2/gemm_bias_gelu.py"), tmp_path, llvm)
    entry = library.Entry(library.structure_key(matmul.mod), "llvm", MATMUL_PROGRAM, 1.0, "matmul", "matmul",
                          "", "", "")
    lib = library.Library(None, "", [entry])
    assert lib.for_task(gelu.mod, "llvm") == [(entry, 9)] and lib.for_task(matmul.mod, "llvm") == [(entry, 0)]
    assert lib.for_task(small.mod, "llvm") == [] and lib.for_task(matmul.mod, "cuda") == []


def test_hybrid_tune_starts_from_a_library_program_retargeted_and_valid(recorded, tmp_path):
    """Layernorm recorded on rows of 4x16x16 (its tiles 256x4 and 64x16), tuned on rows of 2x8x40: both trials
    are the library's program with tiles for 640, and the module built from them passes validation."""
    path = reshaped(tmp_path, LAYERNORM, '{"BATCH": 3, "FEATURES": 2, "DIM1": 8, "DIM2": 40}')
    out = tmp_path / "hybrid"
    assert main(["tune", path, "--size", "small", "--strategy", "hybrid", "--library", str(recorded), "--trials", "2",
                 "-o", str(out), "--target", "llvm", "--validation-seeds", "1", "--repeats", "3"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["validation"]["passed"] and res["validation"]["checks"] == 4
    [task] = res["tasks"]
    assert task["origins"] == {"library": {"trials": 2, "best_us": task["best_us"]}}
    assert res["search"]["phases"][task["name"]][0]["source"] == "library"
    assert res["search"]["library"]["path"] == str(recorded)
    assert res["search"]["library"]["programs_per_task"] == {"layer_norm": 1}
    assert [json.loads(l)["origin"] for l in (out / "trials.jsonl").read_text().splitlines()] == ["library"] * 2
    # What was measured: the program's structure, its tiles re-sampled for the new extents.
    [new] = tasks_of(path, tmp_path, targets.resolve("llvm"))
    lifted = schedule_lang.fresh_schedule(new.mod)
    schedule_lang.apply(schedule_lang.parse(LAYERNORM_PROGRAM.replace("[256, 4]", "[160, 4]")
                                            .replace("[64, 16]", "[40, 16]")), lifted, lift=True)
    kinds = structure(lifted.trace)[0]
    measured = [structure(r.trace) for r in ms.database.JSONDatabase(work_dir=str(out / "database"))
                .get_all_tuning_records()]
    assert len(measured) == 2 and all(k == kinds for k, _ in measured)
    assert all(np.prod(d[0]) == 640 and np.prod(d[1]) == 640 for _, d in measured)


def test_rules_first_round_is_the_library_then_rules(recorded, tmp_path):
    """The 128^3 matmul's program for a 96^3 matmul: the rules strategy's first round is the library's (its
    tiles fitted to 96), the next the rules proposer's."""
    import random

    from schedsearch import strategies
    from schedsearch.strategies.proposals import TaskView

    llvm = targets.resolve("llvm")
    [task] = tasks_of(reshaped(tmp_path, MATMUL, '{"N": 96}'), tmp_path, llvm)
    factory = strategies.make("rules", target=llvm, library=str(recorded))
    proposer = factory(task).proposer
    ctx = ms.TuneContext(mod=task.mod, target=llvm, space_generator="post-order-apply", task_name="t")
    sketch = schedule_lang.from_trace(ctx.generate_design_space()[0].trace)

    def view(n):
        return TaskView(task.name, "", {}, [sketch], [], [], n, 8, random.Random(n), task.mod)

    first = proposer.propose(view(1))
    assert proposer.label == "library" and 1 <= len(first) <= library.PER_ENTRY
    assert all(p.source.startswith("library #1 (") and "128x128 128x128 -> 128x128" in p.source for p in first)
    for p in first:
        sch = schedule_lang.fresh_schedule(task.mod)
        schedule_lang.apply(schedule_lang.parse(p.program), sch)
        assert all(np.prod(d) == 96 for d in structure(sch.trace)[1])
    assert proposer.propose(view(2)) and proposer.label == "rules"
    assert factory.stats()["library"]["programs_per_task"] == {"matmul": 1}


def test_committed_cuda_library_retargets_to_other_shapes_without_a_gpu(tmp_path):
    """The H200 programs for the 4096 x 65536 softmax, re-targeted to the small one (rows of 2048), pass the
    CUDA post-processors (VerifyGPUCode included) and the cost model's feature extraction."""
    lib = library.load("auto", "cuda")
    assert lib.path == str(library.ROOT / "cuda.json") and lib.entries
    [task] = tasks_of(str(ROOT / "workloads/level1/softmax.py"), tmp_path, H200)
    entries = lib.for_task(task.mod, "cuda")
    assert entries and all(extra == 0 for _, extra in entries)
    ctx = ms.TuneContext(mod=task.mod, target=H200, space_generator="post-order-apply", task_name="t")
    valid = 0
    for entry, _ in entries:
        sch = schedule_lang.fresh_schedule(task.mod)
        schedule_lang.apply(schedule_lang.parse(library.retarget(entry.program, task.mod, seed=1)), sch, lift=True)
        sch.enter_postproc()
        if all(post.apply(sch) for post in ctx.space_generator.postprocs):
            ms.feature_extractor.PerStoreFeature().extract_from(ctx, [ms.MeasureCandidate(sch, [])])
            valid += 1
    assert valid >= len(entries) // 2, f"{valid} of {len(entries)}"


def test_library_choice(tmp_path):
    assert library.load("none", "cuda").entries == []
    assert library.load("auto", "llvm").path is None  # no committed CPU library
    assert "no library for llvm" in library.load("auto", "llvm").note
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": 99}')
    with pytest.raises(UserError, match="not a program library"):
        library.load(str(bad), "llvm")
    with pytest.raises(UserError, match="not found"):
        library.load(str(tmp_path / "missing.json"), "llvm")

"""The schedule language: untrusted text (an LLM's, or our proposer's) that names a schedule.

A program is what TVM prints for a trace (`sch.trace.as_python()`): one call per statement,

    b0 = sch.get_sblock(name="C", func_name="main")
    l1, l2 = sch.get_loops(block=b0)
    sch.bind(loop=l1, thread_axis="blockIdx.x")

Nothing in the text is ever executed by Python. `parse` walks the `ast` against a whitelist
(allow-listed `sch.<primitive>` calls, literals, names bound earlier, bounded lists) and
refuses everything else before anything runs; `apply` then calls only allow-listed methods
of the given schedule, with names resolved to the random variables returned earlier.
"""

from __future__ import annotations

import ast
import difflib
import inspect
import json
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

from tvm.s_tir import SBlock, Schedule

MAX_SOURCE_CHARS = 64 * 1024
MAX_STATEMENTS = 512  # tuned traces of fused kernels (with post-processing) reach a few hundred
MAX_CALL_ARGS = 64  # positional arguments of reorder/fuse
MAX_LIST_ELEMENTS = 64  # literal leaves in one argument
MAX_LIST_DEPTH = 4
MAX_STRING_CHARS = 256
MAX_INT_MAGNITUDE = 2**31 - 1  # TVM narrows many ints to int32: 2**31 wraps to negative
MAX_TILE_PARTS = 16
MAX_ERROR_CHARS = 300


class ScheduleLangError(Exception):
    """A program that is refused (`parse`) or that fails on a schedule (`apply`).

    `.line` is the 1-based line of the offending statement; str() is one line for the model.
    """

    def __init__(self, line: int, message: str):
        self.line = line
        self.message = " ".join(message.split())
        super().__init__(f"line {line}: {self.message}")


# name -> (what it returns, one-line hint). Returns: None, "block", "loop", "var" (one
# random variable: assign it to one name) or "blocks", "loops", "vars" (a list: unpack it).
# Left out on purpose: primitives taking callables or index maps (transform_layout,
# transform_block_layout, reindex_cache_*, annotate_buffer_access), unsafe_*, methods that do
# not transform the schedule (get, get_sref, copy, show, work_on, seed, remove_rv), and ones
# no MetaSchedule trace uses that segfault TVM 0.27 on some inputs (merge of a loop with
# itself, reorder_block_iter_var on the root block, loop_partition after blockize,
# sample_partitioned_tile with a 0 factor). `_check_arguments` guards the rest we found.
PRIMITIVES: dict[str, tuple[str | None, str]] = {
    "get_sblock": ("block", "the block with this name"),
    "get_loops": ("loops", "loops above a block, outermost first"),
    "get_child_blocks": ("blocks", "blocks directly under a block or loop"),
    "get_producers": ("blocks", "blocks that write what this block reads"),
    "get_consumers": ("blocks", "blocks that read what this block writes"),
    "get_output_blocks": ("blocks", "blocks under a scope block that write its outputs"),
    "split": ("loops", "split a loop; factors are ints or sampled vars, at most one None"),
    "fuse": ("loop", "fuse consecutive loops into one"),
    "reorder": (None, "reorder loops (given outermost first)"),
    "add_unit_loop": ("loop", "add a loop of extent 1 above a block or loop"),
    "parallel": (None, "run a loop in parallel (CPU threads)"),
    "vectorize": (None, "vectorize an innermost loop"),
    "unroll": (None, "unroll a loop"),
    "bind": (None, 'bind a loop to a GPU axis: "blockIdx.x", "threadIdx.x", "vthread.x", ...'),
    "cache_read": ("block", 'stage a read buffer in "shared"/"local"/... memory; '
                   "consumer_blocks: None or [block]"),
    "cache_write": ("block", 'stage a write buffer in "shared"/"local"/"global" memory'),
    "cache_inplace": ("blocks", "cache a buffer that is both read and written"),
    "reindex": ("block", 'copy a buffer into one indexed by the block iters; buffer=("read", 0)'),
    "set_scope": (None, "change the storage scope of a buffer a block writes"),
    "storage_align": (None, "pad a buffer dimension (e.g. to avoid shared-memory bank conflicts)"),
    "compute_at": (None, "move a producer block under a loop of its consumer"),
    "reverse_compute_at": (None, "move a consumer block under a loop of its producer"),
    "compute_inline": (None, "inline an elementwise block into its consumers"),
    "reverse_compute_inline": (None, "inline an elementwise block into its producer"),
    "decompose_reduction": ("block", "split off the init of a reduction, placed above a loop"),
    "decompose_padding": ("block", "split off the padding of a block, placed above a loop"),
    "rfactor": ("block", "factor a reduction over a loop into a new block"),
    "blockize": ("block", "turn the subtree under a loop into a block"),
    "tensorize": (None, "replace a block/loop by a registered tensor intrinsic, by name"),
    "pad_einsum": (None, "pad the iteration domain of an einsum block to multiples"),
    "annotate": (None, "set an annotation (pragma) on a block or loop"),
    "unannotate": (None, "remove an annotation from a block or loop"),
    "sample_perfect_tile": ("vars", "n tile sizes whose product is the loop extent; "
                            "decision=[..] fixes them"),
    "sample_categorical": ("var", "one of candidates; decision=index fixes it"),
    "sample_compute_location": ("loop", "a loop for compute_at/reverse_compute_at only; "
                                "decision=index fixes it"),
    "enter_postproc": (None, "marks the start of post-processing; the IR is unchanged"),
}
_SIGNATURES = {
    name: inspect.signature(getattr(Schedule, name)).replace(
        parameters=list(inspect.signature(getattr(Schedule, name)).parameters.values())[1:],
        return_annotation=inspect.Signature.empty,
    )
    for name in PRIMITIVES
}


# Keywords TVM's trace printer writes that differ from the Python method's parameter names.
_TRACE_KEYWORDS = {"get_output_blocks": {"block": "scope_block"}}


def _python_keyword(primitive: str, keyword: str) -> str:
    return _TRACE_KEYWORDS.get(primitive, {}).get(keyword, keyword)


def _keyword_names(name: str) -> list[str]:
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    names = [p.name for p in _SIGNATURES[name].parameters.values() if p.kind in kinds]
    return names + list(_TRACE_KEYWORDS.get(name, {}))


def _signature_text(name: str) -> str:
    params = []
    for p in _SIGNATURES[name].parameters.values():
        if p.kind == inspect.Parameter.VAR_POSITIONAL:
            params.append(f"*{p.name}")
        elif p.default is inspect.Parameter.empty:
            params.append(p.name)
        else:
            params.append(f"{p.name}={p.default!r}")
    return f"sch.{name}({', '.join(params)})"


def catalogue() -> str:
    """The language and its primitives, compactly, for prompts."""
    lines = [
        "Schedule program: one statement per line, either `sch.<primitive>(...)` or "
        "`name = sch.<primitive>(...)` / `a, b, c = sch.<primitive>(...)` (unpack list results; "
        "one-element lists as `a, = ...`). Arguments: numbers, strings, True/False/None, names "
        "bound on earlier lines, and lists of those. Nothing else is accepted.",
        "Primitives (-> result):",
    ]
    for name, (returns, hint) in PRIMITIVES.items():
        if name == "enter_postproc":  # in TVM's traces only: post-processing runs after every program anyway
            continue
        result = f" -> {returns}" if returns else ""
        lines.append(f"  {_signature_text(name)}{result}  # {hint}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- program


@dataclass(frozen=True)
class Ref:
    """A name bound by an earlier statement."""

    name: str


@dataclass(frozen=True)
class Seq:
    """A literal list (or tuple) of values."""

    items: tuple
    is_tuple: bool = False


@dataclass(frozen=True)
class Statement:
    line: int  # 1-based line in the text given to parse
    targets: tuple[str, ...]  # names assigned; () for a bare call
    unpack: bool  # targets written as a tuple (`a, b = ...`, `a, = ...`)
    primitive: str
    args: tuple
    kwargs: tuple[tuple[str, object], ...]

    def __str__(self) -> str:
        call_args = [_format(a) for a in self.args] + [f"{k}={_format(v)}" for k, v in self.kwargs]
        call = f"sch.{self.primitive}({', '.join(call_args)})"
        if not self.targets:
            return call
        lhs = ", ".join(self.targets) + ("," if self.unpack and len(self.targets) == 1 else "")
        return f"{lhs} = {call}"


def _format(value) -> str:
    if isinstance(value, Ref):
        return value.name
    if isinstance(value, Seq):
        inner = ", ".join(_format(v) for v in value.items)
        if value.is_tuple:
            return f"({inner}{',' if len(value.items) == 1 else ''})"
        return f"[{inner}]"
    if isinstance(value, str):
        return json.dumps(value)  # a valid Python literal, double-quoted like TVM prints
    return repr(value)


@dataclass(frozen=True)
class Program:
    statements: tuple[Statement, ...]

    @property
    def text(self) -> str:
        return "\n".join(str(s) for s in self.statements)

    def __str__(self) -> str:
        return self.text

    def __len__(self) -> int:
        return len(self.statements)


# ----------------------------------------------------------------------------- parse

_ONLY_CALLS = (
    "only statements `sch.<primitive>(...)` or `names = sch.<primitive>(...)` are allowed"
)
_ARG_RULE = (
    "arguments may only be numbers, strings, True/False/None, names bound on earlier lines, "
    "and lists of those"
)


def _allowed_list() -> str:
    return ", ".join(PRIMITIVES)


class _Parser:
    def __init__(self, source: str):
        self.source = source
        self.bound: set[str] = set()
        self.locations: set[str] = set()  # names bound by sample_compute_location

    def snippet(self, node: ast.AST) -> str:
        # from the source text: ast.unparse recurses and overflows on deeply nested input
        text = ast.get_source_segment(self.source, node) or type(node).__name__
        text = " ".join(text.split())
        return text if len(text) <= 60 else text[:57] + "..."

    def statement(self, node: ast.stmt) -> Statement:
        line = node.lineno
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
            return self.call(node.value, line, (), False)
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call):
            if len(node.targets) != 1:
                raise ScheduleLangError(line, "chained assignment (a = b = ...) is not allowed")
            targets, unpack = self.targets(node.targets[0], line)
            stmt = self.call(node.value, line, targets, unpack)
            self.bound.update(targets)  # after the call: `l0 = sch.fuse(l0)` needs l0 bound before
            _track_locations(stmt, self.locations)
            return stmt
        raise ScheduleLangError(line, f"`{self.snippet(node)}` is not allowed: {_ONLY_CALLS}")

    def targets(self, node: ast.expr, line: int) -> tuple[tuple[str, ...], bool]:
        if isinstance(node, ast.Name):
            return (self.new_name(node.id, line),), False
        if isinstance(node, (ast.Tuple, ast.List)) and node.elts:
            names = []
            for elt in node.elts:
                if not isinstance(elt, ast.Name):
                    raise ScheduleLangError(
                        line, f"cannot assign to `{self.snippet(elt)}`: assign to plain names only"
                    )
                names.append(self.new_name(elt.id, line))
            if len(set(names)) != len(names):
                raise ScheduleLangError(line, "the same name appears twice on the left of =")
            return tuple(names), True
        raise ScheduleLangError(
            line, f"cannot assign to `{self.snippet(node)}`: assign to plain names only"
        )

    @staticmethod
    def new_name(name: str, line: int) -> str:
        if name == "sch":
            raise ScheduleLangError(line, "`sch` cannot be assigned")
        if name.startswith("_"):
            raise ScheduleLangError(
                line, f"name {name} is not allowed (names may not start with _)"
            )
        return name

    def call(self, node: ast.Call, line: int, targets: tuple[str, ...], unpack: bool) -> Statement:
        func = node.func
        if not (isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name)
                and func.value.id == "sch"):
            raise ScheduleLangError(
                line, f"`{self.snippet(func)}` is not allowed: {_ONLY_CALLS}; "
                f"allowed primitives: {_allowed_list()}"
            )
        name = func.attr
        if name not in PRIMITIVES:
            close = difflib.get_close_matches(name, PRIMITIVES, n=1)
            hint = f"did you mean sch.{close[0]}? " if close else ""
            raise ScheduleLangError(
                line, f"unknown primitive sch.{name}; {hint}allowed primitives: {_allowed_list()}"
            )
        if len(node.args) > MAX_CALL_ARGS:
            raise ScheduleLangError(line, f"{name} got more than {MAX_CALL_ARGS} arguments")
        args = []
        for arg in node.args:
            if isinstance(arg, ast.Starred):
                raise ScheduleLangError(line, f"`{self.snippet(arg)}`: *args is not allowed")
            args.append(self.value(arg, line, 0, [0]))
        keywords = _keyword_names(name)
        kwargs = []
        for kw in node.keywords:
            if kw.arg is None:
                raise ScheduleLangError(
                    line, f"`{self.snippet(kw.value)}`: **kwargs is not allowed"
                )
            if kw.arg not in keywords:
                raise ScheduleLangError(
                    line, f"{name} got unknown keyword '{kw.arg}'; expected one of: "
                    f"{', '.join(keywords) or '(no keywords)'}"
                )
            kwargs.append((kw.arg, self.value(kw.value, line, 0, [0])))
        stmt = Statement(line, targets, unpack, name, tuple(args), tuple(kwargs))
        _check_arguments(stmt, self.locations)
        self.check_result_form(name, line, targets, unpack)
        return stmt

    @staticmethod
    def check_result_form(name: str, line: int, targets: tuple[str, ...], unpack: bool) -> None:
        returns = PRIMITIVES[name][0]
        if targets and returns is None:
            raise ScheduleLangError(line, f"{name} returns nothing: call it without assigning")
        if targets and not unpack and returns.endswith("s"):
            raise ScheduleLangError(
                line, f"{name} returns a list of {returns}: unpack it "
                f"(`a, b = sch.{name}(...)`, or `a, = ...` for one)"
            )
        if unpack and returns and not returns.endswith("s"):
            raise ScheduleLangError(line, f"{name} returns one {returns}: assign it to one name")

    def value(self, node: ast.expr, line: int, depth: int, leaves: list[int]):
        """A literal, a bound name, or a bounded list of those; `leaves` counts literals."""
        if isinstance(node, (ast.List, ast.Tuple)):
            if depth >= MAX_LIST_DEPTH:
                raise ScheduleLangError(line, f"lists nested deeper than {MAX_LIST_DEPTH} levels")
            items = tuple(self.value(e, line, depth + 1, leaves) for e in node.elts)
            return Seq(items, isinstance(node, ast.Tuple))
        leaves[0] += 1
        if leaves[0] > MAX_LIST_ELEMENTS:
            raise ScheduleLangError(
                line, f"a list argument has more than {MAX_LIST_ELEMENTS} elements"
            )
        if isinstance(node, ast.Name):
            if node.id == "sch":
                raise ScheduleLangError(line, "`sch` can only be used as sch.<primitive>(...)")
            if node.id not in self.bound:
                raise ScheduleLangError(line, f"unknown name {node.id} (bind it earlier)")
            return Ref(node.id)
        if isinstance(node, ast.Constant):
            return self.literal(node.value, line)
        if (isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub)
                and isinstance(node.operand, ast.Constant)
                and type(node.operand.value) in (int, float)):
            return self.literal(-node.operand.value, line)
        raise ScheduleLangError(
            line, f"argument `{self.snippet(node)}` is not allowed: {_ARG_RULE}"
        )

    @staticmethod
    def literal(value, line: int):
        if value is None or isinstance(value, bool):
            return value
        if isinstance(value, int):
            if abs(value) > MAX_INT_MAGNITUDE:
                raise ScheduleLangError(line, f"integer out of range (|x| < 2**31): {value}")
            return value
        if isinstance(value, float):
            if not math.isfinite(value):
                raise ScheduleLangError(line, "floats must be finite")
            return value
        if isinstance(value, str):
            if len(value) > MAX_STRING_CHARS:
                raise ScheduleLangError(line, f"string longer than {MAX_STRING_CHARS} characters")
            return value
        raise ScheduleLangError(line, f"literal {value!r:.40} is not allowed: {_ARG_RULE}")


def _refs(value):
    if isinstance(value, Ref):
        yield value.name
    elif isinstance(value, (Seq, tuple)):  # tuple: the *loops of fuse/reorder
        for item in value.items if isinstance(value, Seq) else value:
            yield from _refs(item)


def _track_locations(st: Statement, locations: set[str]) -> None:
    locations.difference_update(st.targets)
    if st.primitive == "sample_compute_location":
        locations.update(st.targets)


def _check_arguments(st: Statement, locations: set[str]) -> None:
    """Arity, and the argument values that crash or hang TVM 0.27 instead of raising."""
    try:
        bound = _SIGNATURES[st.primitive].bind(
            *st.args, **{_python_keyword(st.primitive, k): v for k, v in st.kwargs}
        )
    except TypeError as err:
        raise ScheduleLangError(
            st.line, f"{st.primitive}: {err}; signature: {_signature_text(st.primitive)}"
        ) from None
    # A sampled location may be the root or "inline" pseudo-loop: anywhere else it segfaults.
    for param, value in bound.arguments.items():
        for name in _refs(value):
            if name in locations and not (
                st.primitive in ("compute_at", "reverse_compute_at") and param == "loop"
            ):
                raise ScheduleLangError(
                    st.line, f"{name} is from sample_compute_location: use it only as the loop "
                    "of compute_at or reverse_compute_at"
                )
    # consumer_blocks naming a block that does not read the buffer segfaults
    if st.primitive in ("cache_read", "cache_write"):
        consumers = bound.arguments.get("consumer_blocks")
        allowed = {bound.arguments["block"]} if st.primitive == "cache_read" else set()
        if consumers is not None and not (
            isinstance(consumers, Seq) and set(consumers.items) <= allowed
        ):
            what = "[block] (the block itself)" if allowed else "[]"
            raise ScheduleLangError(
                st.line, f"{st.primitive}: consumer_blocks may only be None or {what}"
            )
    # blockize of a list of blocks can leave a corrupt schedule behind when it fails
    if st.primitive == "blockize" and not isinstance(bound.arguments["target"], Ref):
        raise ScheduleLangError(st.line, "blockize: target must be a loop")
    if st.primitive != "sample_perfect_tile":
        return
    # TVM 0.27: max_innermost_factor 0 or < -1 loops forever; a 0 in decision is SIGFPE.
    bound.apply_defaults()
    n, max_innermost, decision = (
        bound.arguments[k] for k in ("n", "max_innermost_factor", "decision")
    )
    if type(n) is not int or not 2 <= n <= MAX_TILE_PARTS:
        raise ScheduleLangError(
            st.line, f"sample_perfect_tile: n must be an integer in [2, {MAX_TILE_PARTS}]"
        )
    if type(max_innermost) is not int or not (max_innermost == -1 or max_innermost >= 1):
        raise ScheduleLangError(
            st.line,
            "sample_perfect_tile: max_innermost_factor must be a positive integer "
            "(or -1: no limit)",
        )
    if decision is not None and not (
        isinstance(decision, Seq) and len(decision.items) == n
        and all(type(d) is int and d >= 1 for d in decision.items)
    ):
        raise ScheduleLangError(
            st.line, f"sample_perfect_tile: decision must be a list of n={n} positive integers"
        )


def parse(text: str) -> Program:
    """Check `text` against the language; raise ScheduleLangError on the first violation."""
    if not isinstance(text, str):
        raise TypeError(f"parse expects str, got {type(text).__name__}")
    if len(text) > MAX_SOURCE_CHARS:
        line = text.count("\n", 0, MAX_SOURCE_CHARS) + 1
        raise ScheduleLangError(line, f"program longer than {MAX_SOURCE_CHARS} characters")
    try:
        with warnings.catch_warnings():  # e.g. "invalid escape sequence": the error is ours to give
            warnings.simplefilter("ignore")
            module = ast.parse(text, mode="exec")
    except SyntaxError as err:
        raise ScheduleLangError(err.lineno or 1, f"syntax error: {err.msg}") from None
    except (RecursionError, MemoryError):
        raise ScheduleLangError(1, "cannot parse: expression nested too deeply") from None
    except ValueError as err:
        raise ScheduleLangError(1, f"cannot parse: {err}") from None
    if len(module.body) > MAX_STATEMENTS:
        raise ScheduleLangError(
            module.body[MAX_STATEMENTS].lineno, f"more than {MAX_STATEMENTS} statements"
        )
    parser = _Parser(text)
    return Program(tuple(parser.statement(node) for node in module.body))


# ----------------------------------------------------------------------------- apply


def _short_error(err: Exception) -> str:
    """The useful part of a TVM error: ScheduleError text embeds the whole IR."""
    text = str(err)
    marker = "Error message:"
    if marker in text:
        text = text.rsplit(marker, 1)[1]
    else:
        lines = [ln for ln in text.splitlines() if ln.strip()]
        text = lines[-1] if lines else type(err).__name__
    text = " ".join(text.split())
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 3] + "..."


def _resolve(value, env: dict, line: int):
    if isinstance(value, Ref):
        if value.name not in env:
            raise ScheduleLangError(line, f"unknown name {value.name} (bind it earlier)")
        return env[value.name]
    if isinstance(value, Seq):
        items = [_resolve(v, env, line) for v in value.items]
        return tuple(items) if value.is_tuple else items
    return value


def _check_in_schedule(st: Statement, sch: Schedule, args: list, kwargs: dict) -> None:
    """Preconditions that need the schedule, where TVM 0.27 segfaults instead of raising."""
    if st.primitive == "cache_read":
        bound = _SIGNATURES["cache_read"].bind(*args, **kwargs)
        for block in bound.arguments.get("consumer_blocks") or ():
            if isinstance(block, str):
                block = sch.get_sblock(block)
            scope, depth = sch.get_sref(block).parent, 0
            while scope is not None:
                depth += isinstance(scope.stmt, SBlock)
                scope = scope.parent
            if depth != 1:
                raise ScheduleLangError(
                    st.line, "cache_read: consumer_blocks must be blocks directly under the root "
                    "block (not inside a blockized block); omit consumer_blocks"
                )


def fresh_schedule(mod, **kwargs) -> Schedule:
    """A schedule on a copy of `mod`: in TVM 0.27, after `annotate` on the root block of a
    multi-block function, later primitives also write into the IRModule a schedule was made from."""
    import tvm

    return Schedule(tvm.ir.load_json(tvm.ir.save_json(mod)), **kwargs)


# MetaSchedule's unroll steps for CUDA (ParallelizeVectorizeUnroll in its default rules).
UNROLL_STEPS = (0, 16, 64, 512, 1024)
_UNROLL_KEYS = ("meta_schedule.unroll_explicit", "meta_schedule.unroll_implicit")


def vectorized_names(program: Program) -> set[str]:
    """The names of the loops the program vectorizes."""
    return {name for st in program.statements if st.primitive == "vectorize"
            for name in _refs(st.args + tuple(v for _, v in st.kwargs))}


def thread_bound_names(program: Program) -> set[str]:
    """Loops bound to threadIdx, directly or through the loops fused into them, and the sampled tile sizes
    that make them."""
    bound = {name for st in program.statements if st.primitive == "bind"
             and str(dict(st.kwargs).get("thread_axis", st.args[1] if len(st.args) > 1 else "")).startswith("threadIdx")
             for name in _refs(dict(st.kwargs).get("loop", st.args[0] if st.args else None))}
    for st in reversed(program.statements):
        if st.primitive == "fuse" and set(st.targets) & bound:
            bound |= set(_refs(st.args + tuple(v for _, v in st.kwargs)))
        if st.primitive == "split" and set(st.targets) & bound:
            bound |= set(_refs(dict(st.kwargs).get("factors", st.args[1] if len(st.args) > 1 else None)))
    return bound


def _lift(st: Statement, sch: Schedule, args: list, kwargs: dict, vectorized: set[str],
          threaded: set[str]) -> tuple[list, dict]:
    """The same call with its literal choices turned into sampled decisions, so that MetaSchedule's mutators
    can move them: a perfect literal split becomes sample_perfect_tile(decision=factors) + split, a literal
    unroll step a sample_categorical over UNROLL_STEPS. The kernel is the same; only the trace differs.
    A split that makes a threadIdx loop stays literal, and a sampled tile that makes one becomes literal
    (`apply`): a model binds several blocks' loops to threadIdx with one extent, and moving one of them alone
    breaks the kernel. On the H200, mutants of LLM matmul programs failed to lower ("All loops that are bound
    to `threadIdx.x` should have the same extent", which ended the search), and one that did not computed
    half of the output (512 threads of work, its shared-memory fetch split for 256): 2,322 us, invalid."""
    bound = _SIGNATURES[st.primitive].bind(*args, **kwargs)
    a = bound.arguments
    if st.primitive == "split":
        if set(st.targets) & threaded:
            return args, kwargs
        factors = a.get("factors")
        if not (isinstance(factors, list) and 2 <= len(factors) <= MAX_TILE_PARTS
                and all(type(f) is int and f >= 1 for f in factors)):
            return args, kwargs
        extent = sch.get(a["loop"]).extent
        if not hasattr(extent, "value") or math.prod(factors) != int(extent.value):
            return args, kwargs  # not a perfect split: predicated, and not a tile the mutators could move
        # A vectorized innermost part keeps its width as the limit: wider vectors fail to build on CUDA.
        inner = st.targets[-1] if st.targets else None
        limit = factors[-1] if inner in vectorized else max(64, factors[-1])
        a["factors"] = list(sch.sample_perfect_tile(loop=a["loop"], n=len(factors), max_innermost_factor=limit,
                                                    decision=factors))
        return list(bound.args), dict(bound.kwargs)
    if st.primitive == "annotate" and a.get("ann_key") in _UNROLL_KEYS and type(a.get("ann_val")) is int:
        steps = sorted(set(UNROLL_STEPS) | {a["ann_val"]})
        a["ann_val"] = sch.sample_categorical(candidates=steps, probs=[1 / len(steps)] * len(steps),
                                              decision=steps.index(a["ann_val"]))
        return list(bound.args), dict(bound.kwargs)
    return args, kwargs


def root_annotations_last(program: Program) -> Program:
    """The program with its annotations of the root block moved to the end of its scheduling part: the
    same kernel (only post-processors read them), and a trace that TVM 0.27 re-applies safely. Re-applying
    a trace that annotates the root and then splits a loop below a statement sequence rewrites the module
    it is applied to in place (ScheduleState::Replace copies on write only nodes with an sref; measured on
    the H200 LLM layernorm records, whose programs annotate first: a corrupt database, then heap
    corruption in `build`); MetaSchedule's evolution re-applies traces to one module per thread."""
    roots = {st.targets[0] for st in program.statements if st.primitive == "get_sblock" and st.targets
             and dict(st.kwargs).get("name", st.args[0] if st.args else None) == "root"}
    statements = list(program.statements)
    end = next((i for i, st in enumerate(statements) if st.primitive == "enter_postproc"), len(statements))
    moved = [st for st in statements[:end] if st.primitive in ("annotate", "unannotate")
             and set(_refs(st.args + tuple(v for _, v in st.kwargs))) & roots]
    if not moved:
        return program
    kept = [st for st in statements[:end] if not any(st is m for m in moved)]
    return Program(tuple(kept + moved + statements[end:]))


def apply(program: Program, sch: Schedule, lift: bool = False) -> None:
    """Run `program` on `sch` in place; on error `sch` keeps the statements before the failing one.
    `lift`: for a trace MetaSchedule's evolution can replay and mutate, the root's annotations go last
    (`root_annotations_last`) and literal split factors and unroll steps before post-processing become
    sampled decisions (`_lift`). The kernel is the same.

    Make `sch` with `fresh_schedule(mod)`, never `Schedule(mod)` (see there).
    """
    env: dict[str, object] = {}
    locations: set[str] = set()
    if lift:
        program = root_annotations_last(program)
    vectorized, threaded = (vectorized_names(program), thread_bound_names(program)) if lift else (set(), set())
    for st in program.statements:
        if st.primitive not in PRIMITIVES:  # Programs are made by parse; refuse hand-made ones too
            raise ScheduleLangError(st.line, f"unknown primitive sch.{st.primitive}")
        _check_arguments(st, locations)
        _track_locations(st, locations)
        lift = lift and st.primitive != "enter_postproc"
        args = [_resolve(a, env, st.line) for a in st.args]
        kwargs = {_python_keyword(st.primitive, k): _resolve(v, env, st.line) for k, v in st.kwargs}
        if lift and st.primitive == "sample_perfect_tile" and set(st.targets) & threaded \
                and kwargs.get("decision") is not None:
            env.update(zip(st.targets, kwargs["decision"]))  # a thread extent: literal, as the model wrote it
            continue
        try:
            if lift and st.primitive in ("split", "annotate"):
                args, kwargs = _lift(st, sch, args, kwargs, vectorized, threaded)
            _check_in_schedule(st, sch, args, kwargs)
            result = getattr(sch, st.primitive)(*args, **kwargs)
        except ScheduleLangError:
            raise
        except Exception as err:  # ScheduleError, TVMError, TypeError, ValueError, AssertionError
            raise ScheduleLangError(st.line, f"{st.primitive} failed: {_short_error(err)}") from err
        if not st.targets:
            continue
        if st.unpack:
            if not isinstance(result, Sequence):  # list, or tvm_ffi.Array (cache_inplace)
                raise ScheduleLangError(st.line, f"{st.primitive} returned one value, not a list")
            if len(result) != len(st.targets):
                raise ScheduleLangError(
                    st.line, f"{st.primitive} returned {len(result)} values but "
                    f"{len(st.targets)} names are assigned"
                )
            env.update(zip(st.targets, result))
        else:
            env[st.targets[0]] = result


def from_trace(trace, postproc: bool = True) -> str:
    """Program text of a TVM trace (`postproc`: its post-processing too, from `enter_postproc()` on; without,
    the program as proposed, decisions filled in); raises if it leaves the language."""
    text = "\n".join(trace.as_python(remove_postproc=not postproc))
    parse(text)
    return text

"""``make mutation``: how many small faults in the pure-logic modules their own fast tests catch.

Each mutant is one change to one module's AST: an arithmetic or comparison operator (boundaries
included), a boolean operator, a constant, a negated condition, a deleted ``raise``, call, early
``return`` or ``except`` type, ``min``/``max`` swapped. It runs against that module's fast tests in a
child forked from this process, which imports the mutated module from memory: the files on disk are
never changed, so an interrupted run leaves nothing behind. Tests that start subprocesses would see
the code on disk, so only in-process tests belong in :data:`TARGETS`. Docstrings, imports and the
annotations no validator reads (those of dataclass fields, variables and functions, unlike a pydantic
model's) are left alone.

A mutant that only changes message text (an exception's or log line's arguments, prose strings) is
counted apart: the score is the share of the other mutants that some test fails on. A module's
feature-spec hash is read from the file on disk, so a mutant of the feature code is caught by what the
features compute, never by the hash noticing that the code changed.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib
import importlib.abc
import importlib.util
import json
import math
import os
import signal
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import CodeType, ModuleType
from typing import Any, NoReturn

REPO = Path(__file__).resolve().parent.parent

#: Each mutated module and the fast, in-process tests that must catch its mutants: one line a module.
TARGETS: dict[str, tuple[str, ...]] = {
    "appliance/candles.py": ("tests/test_candles.py", "tests/test_series.py"),
    "appliance/features.py": ("tests/test_features.py",),
    "appliance/coinbase/messages.py": ("tests/test_messages.py",),
    "appliance/registry.py": ("tests/test_registry.py",),
    "appliance/products.py": ("tests/test_products.py",),
    "webhook/payload.py": ("tests/test_payload.py", "tests/test_webhook.py"),
    "webhook/clock.py": ("tests/test_webhook.py",),
}
#: Share of the non-message mutants each module's tests must kill.
TARGET_SCORE = 0.90
PROJECT_PACKAGES = ("appliance", "training", "webhook", "tests")
MAX_JOBS = 2
BASELINE_TIMEOUT_S = 600.0

Mutation = Callable[[], ast.AST]

_OPS: dict[type[ast.AST], type[ast.AST]] = {
    ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.FloorDiv: ast.Div,
    ast.Mod: ast.FloorDiv, ast.Pow: ast.Mult, ast.LShift: ast.RShift, ast.RShift: ast.LShift,
    ast.BitOr: ast.BitAnd, ast.BitAnd: ast.BitOr, ast.BitXor: ast.BitAnd,
    ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq,
    ast.NotEq: ast.Eq, ast.In: ast.NotIn, ast.NotIn: ast.In, ast.Is: ast.IsNot, ast.IsNot: ast.Is,
    ast.And: ast.Or, ast.Or: ast.And,
}  # fmt: skip
_SWAPS = {"max": "min", "min": "max", "maximum": "minimum", "minimum": "maximum", "any": "all", "all": "any"}
_LOG_METHODS = {"debug", "info", "warning", "error", "exception", "critical", "log"}
#: Subscripted names that make a type, not a value: only their constants are mutated (Literal values,
#: Field bounds), never their operators.
_TYPE_FORMS = {"Annotated", "Literal", "Optional", "Union", "Callable", "NDArray", "TypeAdapter", "dict",
               "list", "tuple", "set", "type"}  # fmt: skip


@dataclass(frozen=True)
class Mutant:
    module: str
    index: int  # the mutated node's position in ast.walk order: identity within one run
    variant: int
    line: int
    kind: str
    change: str
    message: bool  # only message text changes


@dataclass
class Outcome:
    mutant: Mutant
    status: str  # killed | survived | timeout | error
    seconds: float
    killed_by: str | None = None
    detail: str | None = None


@dataclass
class ModuleResult:
    module: str
    tests: tuple[str, ...]
    baseline_s: float
    outcomes: list[Outcome] = field(default_factory=list)

    def count(self, status: str, *, message: bool) -> int:
        return sum(o.status == status and o.mutant.message == message for o in self.outcomes)

    @property
    def score(self) -> float:
        caught = self.count("killed", message=False) + self.count("timeout", message=False)
        counted = caught + self.count("survived", message=False)
        return caught / counted if counted else 1.0


class _Sites:
    """The mutation points of one parsed module, in a deterministic order."""

    def __init__(self, source: str) -> None:
        self.tree = ast.parse(source)
        self.nodes = list(ast.walk(self.tree))
        self.parents: dict[ast.AST, ast.AST] = {}
        for node in self.nodes:
            for child in ast.iter_child_nodes(node):
                self.parents[child] = node
        self.skipped: set[ast.AST] = set()  # never mutated (docstrings, imports, type-checker-only code)
        self.types: set[ast.AST] = set()  # type expressions: constants only
        self.messages: set[ast.AST] = set()  # message text
        for node in self.nodes:
            self._classify(node)

    def _classify(self, node: ast.AST) -> None:
        def mark(into: set[ast.AST], *roots: ast.AST | None) -> None:
            for root in roots:
                if root is not None:
                    into.update(ast.walk(root))

        body = getattr(node, "body", None)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and body:
            first = body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                mark(self.skipped, first)
        if isinstance(node, ast.Import | ast.ImportFrom) or (
            isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "TypeVar"
        ):
            mark(self.skipped, node)
        elif isinstance(node, ast.AnnAssign):
            # Only a model's fields (a class with a base, e.g. pydantic's) have annotations read at run
            # time; a dataclass field's or a variable's are for the type checker alone.
            parent = self.parents.get(node)
            model_field = isinstance(parent, ast.ClassDef) and bool(parent.bases)
            mark(self.types if model_field else self.skipped, node.annotation)
        elif isinstance(node, ast.arg):
            mark(self.skipped, node.annotation)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            mark(self.skipped, node.returns)
        elif isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name):
            if node.value.id in _TYPE_FORMS:
                mark(self.types, node)
        elif isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
            mark(self.messages, *node.exc.args, *(k.value for k in node.exc.keywords))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            if node.func.attr in _LOG_METHODS:
                mark(self.messages, *node.args, *(k.value for k in node.keywords))
        elif isinstance(node, ast.keyword) and node.arg in ("description", "title"):
            mark(self.messages, node.value)
        elif _is_prose(node):
            mark(self.messages, node)

    def _replace(self, old: ast.AST, new: ast.AST) -> ast.AST:
        parent = self.parents[old]
        ast.copy_location(new, old)
        for name, value in ast.iter_fields(parent):
            if value is old:
                setattr(parent, name, new)
            elif isinstance(value, list) and old in value:
                value[value.index(old)] = new
        ast.fix_missing_locations(new)
        return new

    def variants(self, node: ast.AST) -> list[tuple[str, Mutation]]:
        """Each mutation of ``node``: its kind, and a function that applies it and returns the new node."""
        if node in self.skipped:
            return []
        if isinstance(node, ast.Constant):
            return self._constant(node)
        if node in self.types:
            return []
        out: list[tuple[str, Mutation]] = []

        def swap_op(holder: ast.AST, attr: str, kind: str, i: int | None = None) -> None:
            op = getattr(holder, attr) if i is None else getattr(holder, attr)[i]
            new_op = _OPS.get(type(op))
            if new_op is None:
                return

            def apply() -> ast.AST:
                if i is None:
                    setattr(holder, attr, new_op())
                else:
                    getattr(holder, attr)[i] = new_op()
                return holder

            out.append((kind, apply))

        if isinstance(node, ast.BinOp | ast.AugAssign):
            swap_op(node, "op", "operator")
        elif isinstance(node, ast.BoolOp):
            swap_op(node, "op", "boolean")
        elif isinstance(node, ast.Compare):
            for i in range(len(node.ops)):
                swap_op(node, "ops", "comparison", i)
        elif isinstance(node, ast.UnaryOp) and not isinstance(node.op, ast.UAdd):
            out.append(("unary", lambda: self._replace(node, node.operand)))
        elif self._deletable(node):
            out.append(("delete", lambda: self._replace(node, ast.Pass())))
        elif isinstance(node, ast.Name) and node.id in _SWAPS and self._is_called(node):
            out.append(("swap", lambda: self._replace(node, ast.Name(_SWAPS[node.id], ast.Load()))))
        elif isinstance(node, ast.Attribute) and node.attr in _SWAPS and self._is_called(node):
            new = ast.Attribute(node.value, _SWAPS[node.attr], ast.Load())
            out.append(("swap", lambda: self._replace(node, new)))
        parent = self.parents.get(node)
        if isinstance(node, ast.Tuple) and isinstance(parent, ast.ExceptHandler) and parent.type is node:
            out.extend(("except", self._drop_handled(node, i)) for i in range(len(node.elts)))
        if (
            isinstance(parent, ast.If | ast.While | ast.IfExp)
            and parent.test is node
            and not isinstance(node, ast.Compare | ast.BoolOp | ast.UnaryOp | ast.Constant)
        ):
            out.append(("negate", lambda: self._replace(node, ast.UnaryOp(ast.Not(), node))))
        return out

    def _deletable(self, node: ast.AST) -> bool:
        """A raise, a call made for its effect, a continue/break, or a return before the function's end."""
        if isinstance(node, ast.Return):
            return not isinstance(self.parents[node], ast.FunctionDef | ast.AsyncFunctionDef)
        return isinstance(node, ast.Raise | ast.Continue | ast.Break) or (
            isinstance(node, ast.Expr) and isinstance(node.value, ast.Call)
        )

    def _is_called(self, node: ast.AST) -> bool:
        parent = self.parents.get(node)
        return isinstance(parent, ast.Call) and parent.func is node

    @staticmethod
    def _drop_handled(handled: ast.Tuple, i: int) -> Mutation:
        def apply() -> ast.AST:
            del handled.elts[i]
            return handled

        return apply

    def _constant(self, node: ast.Constant) -> list[tuple[str, Mutation]]:
        value = node.value
        new: Any
        if isinstance(value, bool):
            new = not value
        elif isinstance(value, int | float):
            new = value + 1
        elif isinstance(value, str):
            new = f"XX{value}XX"
        elif isinstance(value, bytes):
            new = b"XX" + value + b"XX"
        else:
            return []

        def apply() -> ast.AST:
            node.value = new
            return node

        return [("constant", apply)]


def _is_prose(node: ast.AST) -> bool:
    """A string or f-string with a space in its text: words for a person, not a key or a format."""
    parts = node.values if isinstance(node, ast.JoinedStr) else [node]
    return isinstance(node, ast.JoinedStr | ast.Constant) and any(
        isinstance(p, ast.Constant) and isinstance(p.value, str) and " " in p.value for p in parts
    )


def _snippet(node: ast.AST) -> str:
    text = " ".join(ast.unparse(node).split())
    return text if len(text) <= 90 else text[:87] + "..."


def mutants(module: str) -> list[Mutant]:
    source = (REPO / module).read_text()
    sites = _Sites(source)
    found = []
    for index, node in enumerate(sites.nodes):
        for variant, (kind, _) in enumerate(sites.variants(node)):
            _, before, after = mutate(source, index, variant)
            line = getattr(node, "lineno", 0)
            change = (
                f"delete `{before}`" if isinstance(after, ast.Pass) else f"`{before}` -> `{_snippet(after)}`"
            )
            found.append(Mutant(module, index, variant, line, kind, change, node in sites.messages))
    return found


def mutate(source: str, index: int, variant: int) -> tuple[ast.Module, str, ast.AST]:
    """A fresh tree with one mutation applied, the mutated code before, and the node after."""
    sites = _Sites(source)
    node = sites.nodes[index]
    before = _snippet(node)
    _, apply = sites.variants(node)[variant]
    after = apply()
    ast.fix_missing_locations(sites.tree)
    return sites.tree, before, after


def _module_name(module: str) -> str:
    return module.removesuffix(".py").replace("/", ".")


class _MutatedModule(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves one module's (mutated) code from memory, under its real file name."""

    def __init__(self, name: str, path: Path, code: CodeType) -> None:
        self.name, self.path, self.code = name, path, code

    def find_spec(self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None) -> Any:
        if fullname != self.name:
            return None
        return importlib.util.spec_from_loader(fullname, self, origin=str(self.path))

    def create_module(self, spec: Any) -> None:
        return None

    def exec_module(self, module: ModuleType) -> None:
        module.__file__ = str(self.path)
        exec(self.code, module.__dict__)


class _FirstFailure:
    """pytest plugin: the first test (or collection) that failed, and the modules imported at the end."""

    def __init__(self) -> None:
        self.failed: str | None = None

    def pytest_runtest_logreport(self, report: Any) -> None:
        if report.failed and self.failed is None:
            self.failed = report.nodeid

    def pytest_collectreport(self, report: Any) -> None:
        if report.failed and self.failed is None:
            self.failed = f"collecting {report.nodeid}"


def _child(module: str, code: CodeType, tests: Sequence[str], result: Path, timeout_s: float) -> NoReturn:
    """In the forked child: run ``tests`` with ``module`` served from ``code``; never returns."""
    status = 99
    try:
        os.setpgid(0, 0)  # the parent kills the whole group on a timeout
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.alarm(math.ceil(timeout_s) + 5)  # ends a hung mutant even if the parent is gone
        log = os.open(result.with_suffix(".log"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.chdir(REPO)
        sys.meta_path.insert(0, _MutatedModule(_module_name(module), REPO / module, code))
        import pytest

        recorder = _FirstFailure()
        exit_code = int(pytest.main([*tests, "-x", "-q", "-p", "no:cacheprovider"], plugins=[recorder]))
        result.write_text(
            json.dumps({"exit": exit_code, "failed": recorder.failed, "modules": list(sys.modules)})
        )
        status = 0
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(status)


@dataclass
class _Running:
    pid: int
    result: Path
    started: float
    mutant: Mutant | None


class Runner:
    """Forks at most ``jobs`` children at a time, each running one mutant's tests with a timeout."""

    def __init__(self, jobs: int, scratch: Path) -> None:
        self.jobs, self.scratch = jobs, scratch
        self.running: dict[int, _Running] = {}
        self.serial = 0

    def start(
        self, module: str, code: CodeType, tests: Sequence[str], mutant: Mutant | None, timeout_s: float
    ) -> None:
        self.serial += 1
        result = self.scratch / f"{self.serial}.json"
        pid = os.fork()
        if pid == 0:
            _child(module, code, tests, result, timeout_s)
        self.running[pid] = _Running(pid, result, time.monotonic(), mutant)

    def wait(self, timeout_s: float) -> Iterator[tuple[_Running, str, dict[str, Any]]]:
        """Block until a child ends (or overruns ``timeout_s``); yield each finished one with its status."""
        while True:
            for run in list(self.running.values()):
                if time.monotonic() - run.started > timeout_s:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(run.pid, signal.SIGKILL)
                    os.waitpid(run.pid, 0)
                    del self.running[run.pid]
                    yield run, "timeout", {}
                    return
            pid, _ = os.waitpid(-1, os.WNOHANG)
            if pid:
                run = self.running.pop(pid)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)  # anything the tests left running
                try:
                    report = json.loads(run.result.read_text())
                except (OSError, ValueError):
                    yield run, "error", {"detail": self._log_tail(run)}
                    return
                exit_code = report["exit"]
                status = "survived" if exit_code == 0 else "error" if exit_code == 5 else "killed"
                yield run, status, report | {"detail": None if exit_code in (0, 1) else self._log_tail(run)}
                return
            time.sleep(0.02)

    @staticmethod
    def _log_tail(run: _Running) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(run.result.with_suffix(".log").read_text().splitlines()[-15:])
        return ""

    def stop_all(self) -> None:
        for pid in self.running:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        self.running.clear()


def _warm(modules: Sequence[str]) -> None:
    """Import, once in this parent, the third-party modules the tests use, so each child starts fast."""
    for name in modules:
        if name.split(".")[0] in PROJECT_PACKAGES or name in sys.modules or name.startswith("__"):
            continue
        with warnings.catch_warnings(), contextlib.suppress(Exception):
            warnings.simplefilter("ignore")
            importlib.import_module(name)


def _compile(tree: ast.Module, module: str) -> CodeType:
    return compile(tree, str(REPO / module), "exec", dont_inherit=True)


def run_module(module: str, tests: tuple[str, ...], runner: Runner, found: list[Mutant]) -> ModuleResult:
    import tqdm as tqdm_module
    from tqdm import tqdm

    tqdm_module.tqdm.monitor_interval = 0  # no monitor thread: this process forks

    source = (REPO / module).read_text()
    missing = [t for t in tests if not (REPO / t).is_file()]
    if missing:
        raise SystemExit(f"{module}: its tests {missing} do not exist (see TARGETS in tests/mutation.py)")
    runner.start(module, _compile(ast.parse(source), module), tests, None, BASELINE_TIMEOUT_S)
    started = time.monotonic()
    ((_, status, child),) = list(runner.wait(BASELINE_TIMEOUT_S))
    baseline = time.monotonic() - started
    if status != "survived":
        raise SystemExit(
            f"{module}: its tests {list(tests)} do not pass on the unmutated code ({status}, "
            f"{child.get('failed')}): fix them first\n{child.get('detail') or ''}"
        )
    _warm(child["modules"])
    timeout = 3 * baseline + 15
    result = ModuleResult(module, tests, round(baseline, 2))
    queue = list(found)
    with tqdm(
        total=len(queue), desc=module, unit="mutant", file=sys.stderr, leave=False, mininterval=1
    ) as bar:
        while queue or runner.running:
            while queue and len(runner.running) < runner.jobs:
                mutant = queue.pop(0)
                tree, _, _ = mutate(source, mutant.index, mutant.variant)
                runner.start(module, _compile(tree, module), tests, mutant, timeout)
            for run, status, child in runner.wait(timeout):
                assert run.mutant is not None
                result.outcomes.append(Outcome(run.mutant, status, round(time.monotonic() - run.started, 2),
                                               child.get("failed"), child.get("detail")))  # fmt: skip
                bar.update()
                killed = sum(o.status in ("killed", "timeout") for o in result.outcomes)
                bar.set_postfix(killed=killed, survived=sum(o.status == "survived" for o in result.outcomes))
    result.outcomes.sort(key=lambda o: (o.mutant.line, o.mutant.index, o.mutant.variant))
    return result


def table(results: Sequence[ModuleResult]) -> str:
    head = f"{'module':<32} {'mutants':>7} {'killed':>6} {'timeout':>7} {'survived':>8} {'error':>5} " \
           f"{'message-only (killed/all)':>25} {'score':>6}"  # fmt: skip
    lines = [head, "-" * len(head)]
    for r in results:
        logic = [o for o in r.outcomes if not o.mutant.message]
        msgs = [o for o in r.outcomes if o.mutant.message]
        msg_killed = sum(o.status in ("killed", "timeout") for o in msgs)
        lines.append(
            f"{r.module:<32} {len(logic):>7} {r.count('killed', message=False):>6} "
            f"{r.count('timeout', message=False):>7} {r.count('survived', message=False):>8} "
            f"{r.count('error', message=False):>5} {f'{msg_killed}/{len(msgs)}':>25} {r.score:>6.1%}"
        )
    for r in results:
        survivors = [o for o in r.outcomes if o.status in ("survived", "error") and not o.mutant.message]
        if survivors:
            lines.append(f"\n{r.module}: {len(survivors)} surviving non-message mutants")
            lines.extend(f"  {r.module}:{o.mutant.line:<4} {o.mutant.kind:<10} {o.mutant.change}"
                         + (" (error)" if o.status == "error" else "") for o in survivors)  # fmt: skip
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make mutation", description=__doc__.split("\n")[0])
    parser.add_argument("--module", action="append", default=[],
                        help="only modules whose path contains this (repeatable)")  # fmt: skip
    parser.add_argument("--jobs", type=int, default=MAX_JOBS, help=f"children at a time (at most {MAX_JOBS})")
    parser.add_argument("--out", type=Path, default=REPO / "mutation-results")
    parser.add_argument("--list", action="store_true", help="list the mutants, run nothing")
    args = parser.parse_args(argv)
    # Before anything imports numpy: one BLAS thread a child (two children at most).
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")
    chosen = {m: t for m, t in TARGETS.items() if not args.module or any(s in m for s in args.module)}
    if not chosen:
        parser.error(f"no module matches {args.module}; known: {', '.join(TARGETS)}")
    found = {m: mutants(m) for m in chosen}
    if args.list:
        for module, ms in found.items():
            for m in ms:
                print(f"{module}:{m.line:<4} {m.kind:<10} {'message ' if m.message else ''}{m.change}")
        return 0
    args.out.mkdir(exist_ok=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="mutation-") as scratch:
        runner = Runner(max(1, min(args.jobs, MAX_JOBS)), Path(scratch))
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that the children are stopped too
        try:
            for module, tests in chosen.items():
                started = time.monotonic()
                results.append(run_module(module, tests, runner, found[module]))
                r = results[-1]
                print(f"{module}: {len(r.outcomes)} mutants in {time.monotonic() - started:.0f} s, "
                      f"score {r.score:.1%}", file=sys.stderr)  # fmt: skip
        finally:
            runner.stop_all()
    summary = table(results)
    print(summary)
    (args.out / "results.json").write_text(json.dumps(
        {"target_score": TARGET_SCORE, "modules": [
            {"module": r.module, "tests": r.tests, "baseline_s": r.baseline_s, "score": round(r.score, 4),
             "outcomes": [asdict(o) for o in r.outcomes]} for r in results]}, indent=1))  # fmt: skip
    (args.out / "summary.txt").write_text(summary + "\n")
    below = [r.module for r in results if r.score < TARGET_SCORE]
    if below:
        print(f"\nbelow {TARGET_SCORE:.0%} of non-message mutants killed: {', '.join(below)}")
        return 1
    print(f"\nevery module at or above {TARGET_SCORE:.0%} of non-message mutants killed")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

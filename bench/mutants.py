"""Mutation run over the security checks: does the suite notice when a check is removed or
weakened?

For every module in MODULES, the script parses the source (ast), finds the checks and makes
one mutant per weakening:

  guard-removed   `if <cond>: raise/return ...` -> `if False:` (the check is gone); not for
                  `if cmd == X:` sub-operation dispatch, which checks nothing
  or-dropped      one operand of an `or` in such a condition dropped (one clause of the check)
  op-swapped      `<` <-> `<=`, `>` <-> `>=` in such a condition (an off-by-one bound)
  bound-x2        the bound of such a comparison doubled (`x > n` -> `x > (n) * 2`)
  call-deleted    a statement calling a check (name matches CHECK_CALL) -> `pass`
  flag-zeroed     a permission flag named in the module's `zero_names` -> 0 (e.g. FLAG_PRIV)

Each mutant is a text edit of exactly the node's source span (ast positions), checked to
compile, applied to a private copy of the tree under /tmp (never to the working tree); the
module's test files (the table below, globs so that new test files join) then run with
`pytest -x -q` and a timeout. A failing run or a timeout kills the mutant; a passing run means
it survived: a check the tests would not miss. Test files run cheapest first (from the
baseline), so most mutants die in seconds; survivors pay for the whole list.

Before mutating a module its tests run once unmutated in the same copy (the baseline); a module
whose baseline fails is reported and skipped (its mutants would all look killed).

MARKED are the survivors issue 9 names; they are flagged in the output (or reported missing if
the code they point at has changed).

    .venv/bin/python bench/mutants.py                       # everything (~30-40 min, 2 jobs)
    .venv/bin/python bench/mutants.py -m ring -m xenstore   # some modules
    .venv/bin/python bench/mutants.py --list                # only list the mutants
    .venv/bin/python bench/mutants.py --marked              # only the MARKED ones

Output: per module killed/total and its survivors (file:line, function, mutation); the last
line is `killed_pct=<..> survivors=<..>`.
"""
from __future__ import annotations

import argparse
import ast
import concurrent.futures as cf
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Calls whose statement is a check (deleting it is a mutant): validators and reference takers.
CHECK_CALL = re.compile(r"(check|valid|verify|ensure|require|permit|allow|get_type|get_page"
                        r"|get_writable|_get_entry|audit|take_frame|take_type)", re.I)


@dataclass(frozen=True)
class Module:
    files: tuple[str, ...]              # sources to mutate (relative to ROOT)
    tests: tuple[str, ...]              # test files / globs covering them
    funcs: str = ""                     # regex on "Class.func" to restrict; "" = every function
    zero_names: tuple[str, ...] = ()    # names whose uses become 0


HOSTILE = ("tests/test_hostile*.py", "tests/test_*audit*.py", "tests/test_*stateful*.py")
MODULES: dict[str, Module] = {
    "mmu": Module(("aiovmm/mmu.py",),
                  ("tests/test_memory.py", "tests/test_hypercall_errors.py", *HOSTILE,
                   "tests/test_channels.py")),
    "mmu_ops": Module(("aiovmm/mmu_ops.py",),
                      ("tests/test_memory.py", "tests/test_hypercall_errors.py", *HOSTILE)),
    "ptwr": Module(("aiovmm/ptwr.py",), ("tests/test_memory.py", "tests/test_traps.py", *HOSTILE)),
    "grants": Module(("aiovmm/grants.py",),
                     ("tests/test_*grant*.py", "tests/test_channels.py", *HOSTILE,
                      "tests/test_block.py")),
    "events": Module(("aiovmm/events.py",), ("tests/test_events.py", "tests/test_channels.py")),
    "ring": Module(("aiovmm/ring.py",),
                   ("tests/test_ring*.py", "tests/test_block.py", "tests/test_net.py")),
    "hypercall": Module(("aiovmm/hypercall.py",),
                        ("tests/test_hypercall_errors.py", "tests/test_abi.py", *HOSTILE,
                         "tests/test_multicall*.py", "tests/test_console*.py")),
    # The permission checks and quotas of the xenstore daemon, not its plumbing.
    "xenstore": Module(("aiovmm/xenstore/core.py", "aiovmm/xenstore/protocol.py",
                        "aiovmm/xenstore/transaction.py"),
                       ("tests/xenstore/test_*.py",),
                       funcs=r"^(perm_for|_lookup|_missing|get_node|_create|write|mkdir|rm"
                             r"|set_perms|canonical|process|do_transaction_start|do_watch"
                             r"|do_set_perms|do_introduce|do_release|do_set_target|.*commit.*"
                             r"|.*quota.*|.*check.*)$",
                       zero_names=("FLAG_PRIV",)),
    # The backends' request validation (what a frontend writes into its ring and grants).
    "net": Module(("backends/net/device.py",), ("tests/test_net.py", "tests/test_redteam_net_rx_stall.py",
                                                 "tests/test_redteam_net_gso.py",
                                                 "tests/test_redteam_net_early_event.py"),
                  funcs=r"(_process_tx|_process_rx|_on_tap_readable|_tx_|_rx_|_serve|_poll|.*valid.*"
                        r"|.*check.*|.*req.*|.*slot.*|.*extra.*|.*ring.*|_connect)"),
    # What netback learns for the migration announce (only what the guest claims as its own).
    "announce": Module(("backends/net/device.py",),
                       ("tests/test_redteam_announce.py", "tests/test_announce.py"),
                       funcs=r"^(Netback\.)?(learn_ipv4|learn_ipv6|_learn|adopt)$"),
    "block": Module(("backends/block/device.py",), ("tests/test_block.py", "tests/test_redteam_blk.py",
                                                   "tests/test_redteam_blk_code.py",
                                                   "tests/test_redteam_blk_pass.py",
                                                   "tests/test_redteam_blk_held.py"),
                    funcs=r"(_prepare|_drain|_answer|_completed|_disconnect|.*valid.*|.*check.*|.*req.*"
                          r"|.*seg.*|.*sector.*|.*ring.*|_connect|_serve|_process.*)"),
    # The one writable-access function (Xen's PGT_writable_page typing) and frame freeing.
    "memory": Module(("aiovmm/memory.py",),
                     ("tests/test_memory.py", "tests/test_grants_security.py", *HOSTILE),
                     funcs=r"^(MachineMemory\.)?(get_writable|take_type|put_writable|free|alloc)$"),
    # console.py's bounds (LineBuffer, OutputRate) are arithmetic, not refusing `if`s: no
    # mutant kind here applies; tests/test_console_output.py covers them directly.
    # check_descriptor and the GDT/LDT hypercalls that rely on it.
    "descriptors": Module(("aiovmm/descriptors.py",),
                          ("tests/test_hostile.py", "tests/test_linux_privops.py",
                           "tests/test_emulate.py", "tests/test_traps.py"),
                          funcs=r"^(gate_selector_ok|check_descriptor|_validate_page"
                                r"|get_seg_desc|do_set_gdt|do_update_descriptor|set_ldt"
                                r"|ldt_fault)$"),
    # The MSR policy: what a PV guest may read and write (Xen's guest_rdmsr/guest_wrmsr).
    "msr": Module(("aiovmm/emulate.py", "aiovmm/cpuid.py"),
                  ("tests/test_emulate.py", "tests/test_linux_privops.py", "tests/test_hostile.py"),
                  funcs=r"^(read_msr|write_msr|_write_hypercall_page|_refuse_rdmsr|_vmce"
                        r"|fixup_guest_cr4|model_has_msr)$"),
}

# The survivors issue 9 names: (module, file, function regex, mutation kind, text in the
# original source span).
MARKED = [
    ("mmu", "aiovmm/mmu.py", r"_validate_l1$", "call-deleted", "get_writable"),
    ("ring", "aiovmm/ring.py", r"unconsumed$", "bound-x2", "nr_ents"),
    ("xenstore", "aiovmm/xenstore/core.py", r"^rm$", "guard-removed", "PERM_WRITE"),
]


@dataclass
class Mutant:
    module: str
    path: str
    line: int
    func: str
    kind: str
    orig: str
    new: str
    span: tuple[int, int]              # character offsets in the source
    marked: bool = False
    status: str = ""                   # killed / survived / timeout / error
    seconds: float = 0.0
    killer: str = ""

    def where(self) -> str:
        return f"{self.path}:{self.line}"

    def describe(self) -> str:
        mark = " [issue 9]" if self.marked else ""
        return f"{self.where()} {self.func}: {self.kind}: {short(self.orig)} -> {short(self.new)}{mark}"


def short(s: str, n: int = 90) -> str:
    s = " ".join(s.split())
    return s if len(s) <= n else s[:n - 3] + "..."


# --------------------------------------------------------------------------------------------
# Generation

def _offsets(src: str) -> list[int]:
    """Character offset of the start of each line (1-based line numbers index it)."""
    out, pos = [0, 0], 0
    for line in src.splitlines(keepends=True):
        pos += len(line)
        out.append(pos)
    return out


# A call that answers "no": reporting a bad frontend, an error response, a crash.
ERRORISH = re.compile(r"(bad|error|fail|reject|refuse|disconnect|crash)", re.I)


def _refuses(stmt: ast.stmt) -> bool:
    """Does this statement (at the top of an `if` body) make the `if` a check? Leaving
    (raise/return/continue/break), calling an error path, or setting a flag to False."""
    if isinstance(stmt, (ast.Raise, ast.Return, ast.Continue, ast.Break)):
        return True
    if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Call):
        f = stmt.value.func
        return bool(ERRORISH.search(f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")))
    if isinstance(stmt, ast.Assign) and isinstance(stmt.value, ast.Constant):
        return stmt.value.value is False
    return False


DISPATCH_NAMES = {"cmd", "op", "kind", "type_", "typ", "subop"}


def _dispatch(test: ast.expr) -> bool:
    """`if cmd == X:` selects a sub-operation; it checks nothing. Removing it only sends
    the call to the next branch (or ENOSYS), which is not a weakened check."""
    return (isinstance(test, ast.Compare) and len(test.ops) == 1
            and isinstance(test.ops[0], ast.Eq) and isinstance(test.left, ast.Name)
            and test.left.id in DISPATCH_NAMES)


class _Gen(ast.NodeVisitor):
    def __init__(self, module: str, path: str, src: str, spec: Module) -> None:
        self.module, self.path, self.src, self.spec = module, path, src, spec
        self.lines = src.splitlines(keepends=True)
        self.line_start = _offsets(src)
        self.funcs = re.compile(spec.funcs) if spec.funcs else None
        self.stack: list[str] = []
        self.out: list[Mutant] = []
        self.seen: set[tuple[tuple[int, int], str]] = set()

    # positions: ast columns are UTF-8 byte offsets
    def _char(self, lineno: int, col: int) -> int:
        line = self.lines[lineno - 1]
        return self.line_start[lineno] + len(line.encode()[:col].decode(errors="ignore"))

    def span(self, node: ast.AST) -> tuple[int, int]:
        return (self._char(node.lineno, node.col_offset),
                self._char(node.end_lineno, node.end_col_offset))

    def active(self) -> bool:
        if not self.stack:
            return False
        return self.funcs is None or any(self.funcs.search(q) for q in
                                         (".".join(self.stack), self.stack[-1]))

    def add(self, node: ast.AST, kind: str, new: str) -> None:
        a, b = self.span(node)
        if ((a, b), new) in self.seen:
            return
        orig = self.src[a:b]
        if "\n" in new or isinstance(node, ast.expr):
            new = f"({new})" if isinstance(node, ast.expr) else new
        mutated = self.src[:a] + new + self.src[b:]
        try:
            compile(mutated, self.path, "exec")
        except SyntaxError:
            return
        self.seen.add(((a, b), new))
        self.out.append(Mutant(self.module, self.path, node.lineno, ".".join(self.stack), kind,
                               orig, new, (a, b)))

    # traversal
    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        self.stack.append(node.name)
        self.generic_visit(node)
        self.stack.pop()

    def visit_FunctionDef(self, node) -> None:
        self.stack.append(node.name)
        self.generic_visit(node)
        self.stack.pop()

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_If(self, node: ast.If) -> None:
        if self.active() and any(_refuses(s) for s in node.body) and not _dispatch(node.test):
            self.guard(node.test)
        self.generic_visit(node)

    def visit_Expr(self, node: ast.Expr) -> None:
        if self.active() and isinstance(node.value, ast.Call):
            f = node.value.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            if CHECK_CALL.search(name):
                self.add(node, "call-deleted", "pass")
        self.generic_visit(node)

    def visit_Name(self, node: ast.Name) -> None:
        if (node.id in self.spec.zero_names and isinstance(node.ctx, ast.Load)):
            self.add(node, "flag-zeroed", "0")

    def guard(self, test: ast.expr) -> None:
        self.add(test, "guard-removed", "False")
        if isinstance(test, ast.BoolOp) and isinstance(test.op, ast.Or):
            for i in range(len(test.values)):
                rest = test.values[:i] + test.values[i + 1:]
                new = ast.unparse(rest[0] if len(rest) == 1 else ast.BoolOp(ast.Or(), rest))
                self.add(test, "or-dropped", new)
        for cmp in (n for n in ast.walk(test) if isinstance(n, ast.Compare)):
            self.compare(cmp)

    SWAP = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt}

    def compare(self, cmp: ast.Compare) -> None:
        for i, op in enumerate(cmp.ops):
            if type(op) in self.SWAP:
                ops = list(cmp.ops)
                ops[i] = self.SWAP[type(op)]()
                self.add(cmp, "op-swapped", ast.unparse(ast.Compare(cmp.left, ops, cmp.comparators)))
        if not any(type(op) in self.SWAP for op in cmp.ops):
            return
        # The bound is the right-hand side; against a literal 0 or 1 doubling is (nearly)
        # always equivalent, so no mutant.
        right = cmp.comparators[-1]
        if isinstance(right, ast.Constant) and right.value in (0, 1, None, True, False):
            return
        comps = list(cmp.comparators)
        comps[-1] = ast.BinOp(right, ast.Mult(), ast.Constant(2))
        self.add(cmp, "bound-x2", ast.unparse(ast.Compare(cmp.left, cmp.ops, comps)))


def generate(module: str, spec: Module, root: str = ROOT) -> list[Mutant]:
    out: list[Mutant] = []
    for path in spec.files:
        if not os.path.exists(os.path.join(root, path)):
            print(f"MODULE FILE MISSING (moved? update MODULES): {path}")
            continue
        src = open(os.path.join(root, path), encoding="utf-8").read()
        g = _Gen(module, path, src, spec)
        g.visit(ast.parse(src, path))
        out.extend(g.out)
    for mod, path, func, kind, text in MARKED:
        if mod != module:
            continue
        for m in out:
            if m.path == path and re.search(func, m.func) and m.kind == kind and text in m.orig:
                m.marked = True
    return out


def missing_marked(mutants: list[Mutant], modules: list[str]) -> list[str]:
    found = {(m.module, m.path, m.kind) for m in mutants if m.marked}
    return [f"{path} {func} {kind} ({text})" for mod, path, func, kind, text in MARKED
            if mod in modules and (mod, path, kind) not in found]


# --------------------------------------------------------------------------------------------
# Running

_IGNORE = shutil.ignore_patterns(".git", ".venv", "__pycache__", ".pytest_cache", "*.egg-info",
                                 ".hypothesis")


class Workspace:
    """A private copy of the tree. aiovmm.backends is mapped to backends/ by the editable
    install's finder, which would import the working tree's backends: a symlink inside the
    copy makes the copy's backends/ win (checked in verify())."""

    def __init__(self, base: str, i: int) -> None:
        self.dir = os.path.join(base, f"w{i}")
        shutil.copytree(ROOT, self.dir, ignore=_IGNORE, symlinks=True)
        link = os.path.join(self.dir, "aiovmm", "backends")
        if not os.path.exists(link):
            os.symlink(os.path.join("..", "backends"), link)
        # Only the pytest plugins the module tests use (not schemathesis/anyio, which only
        # tests/control needs): their imports cost ~3 s of CPU per run, paid by every mutant.
        self.env = dict(os.environ, PYTHONPATH=self.dir, PYTHONDONTWRITEBYTECODE="1",
                        HYPOTHESIS_STORAGE_DIRECTORY=os.path.join(self.dir, ".hypothesis"),
                        PYTEST_DISABLE_PLUGIN_AUTOLOAD="1")
        self.lock = threading.Lock()

    def verify(self) -> None:
        code = ("import aiovmm, aiovmm.backends.net.device as n, aiovmm.ring as r, os; "
                "print(os.path.realpath(aiovmm.__file__)); print(os.path.realpath(n.__file__)); "
                "print(os.path.realpath(r.__file__))")
        out = subprocess.run([sys.executable, "-c", code], cwd=self.dir, env=self.env,
                             capture_output=True, text=True, check=True).stdout.split()
        real = os.path.realpath(self.dir)
        bad = [p for p in out if not p.startswith(real + os.sep)]
        if bad:
            raise SystemExit(f"mutants: the copy imports modules from outside itself: {bad}")

    kexpr = ""                          # pytest -k expression for every run (--select)

    def pytest(self, tests: list[str], timeout: float) -> tuple[str, str]:
        """('pass'|'fail'|'timeout', the first failing test or the tail of the output)."""
        cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
               "-p", "asyncio", "-p", "aiovmm.testing", "-p", "_hypothesis_pytestplugin",
               "--no-header", "-W", "ignore", *(["-k", self.kexpr] if self.kexpr else []),
               *tests]
        p = subprocess.Popen(cmd, cwd=self.dir, env=self.env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            out, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, 9)
            p.communicate()
            return "timeout", ""
        if p.returncode == 0:
            return "pass", ""
        m = re.search(r"^(FAILED|ERROR) (\S+)", out, re.M)
        return "fail", m.group(2) if m else short(out.strip().splitlines()[-1] if out.strip() else "")


def test_files(spec: Module, name: str = "", override: list[str] | None = None) -> list[str]:
    """The module's test files; its kill tests (tests/**/test_mutation_kills_<name>*.py,
    written against survivors of this script) always join. `override` (--tests) replaces
    the table's list, for a quick screen whose survivors are then re-run with the full one."""
    out: list[str] = []
    pats = list(override) if override else list(spec.tests)
    if name:
        pats += [f"tests/test_mutation_kills_{name}*.py", f"tests/*/test_*mutation_kills_{name}*.py"]
    for pat in pats:
        for p in sorted(glob.glob(os.path.join(ROOT, pat))):
            rel = os.path.relpath(p, ROOT)
            if rel not in out:
                out.append(rel)
    return out


@dataclass
class ModuleRun:
    name: str
    tests: list[str]
    baseline: dict[str, float] = field(default_factory=dict)
    baseline_error: str = ""
    flaky: list[str] = field(default_factory=list)      # passed only on the retry
    mutants: list[Mutant] = field(default_factory=list)


def run_baseline(ws: Workspace, mr: ModuleRun) -> None:
    """Each test file once, unmutated: its time orders the files (cheapest first) and sets
    the timeout; a failure here disqualifies the module."""
    for t in mr.tests:
        for attempt in (1, 2):            # one retry: a timing test may fail on a busy machine
            t0 = time.perf_counter()
            status, info = ws.pytest([t], timeout=900)
            mr.baseline[t] = time.perf_counter() - t0
            if status == "pass":
                if attempt == 2:
                    mr.flaky.append(t)
                break
        else:
            mr.baseline_error = f"{t}: {status} {info}"
            return
    mr.tests.sort(key=lambda t: mr.baseline[t])


def run_mutant(ws: Workspace, mr: ModuleRun, m: Mutant, factor: float) -> None:
    path = os.path.join(ws.dir, m.path)
    with ws.lock:
        orig = open(path, encoding="utf-8").read()
        a, b = m.span
        with open(path, "w", encoding="utf-8") as f:
            f.write(orig[:a] + m.new + orig[b:])
        try:
            timeout = max(60.0, factor * sum(mr.baseline.values()))
            t0 = time.perf_counter()
            status, info = ws.pytest(mr.tests, timeout)
            m.seconds = time.perf_counter() - t0
        finally:
            with open(path, "w", encoding="utf-8") as f:
                f.write(orig)
    m.status = {"pass": "survived", "fail": "killed", "timeout": "killed"}[status]
    m.killer = "timeout" if status == "timeout" else info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--module", action="append", choices=list(MODULES),
                    help="module(s) to mutate (default: all)")
    ap.add_argument("-j", "--jobs", type=int, default=2, help="mutants run in parallel")
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    ap.add_argument("--marked", action="store_true", help="only the mutants issue 9 names")
    ap.add_argument("--limit", type=int, default=0, help="at most N mutants per module")
    ap.add_argument("--timeout-factor", type=float, default=3.0,
                    help="a mutant's timeout = factor x its module's baseline time (min 60 s)")
    ap.add_argument("--tests", action="append", metavar="GLOB",
                    help="run only these test files (globs; the module's kill tests join) "
                         "instead of the module's list: a quick screen, not the figure")
    ap.add_argument("--only", default="", metavar="REGEX",
                    help="only mutants whose description (file:line func: kind: ...) matches")
    ap.add_argument("--select", default="", metavar="EXPR",
                    help="pytest -k expression for baseline and mutants, e.g. 'not kvm' (the "
                         "engine-independent handlers on one engine; a broken engine variant "
                         "would fail every baseline)")
    args = ap.parse_args()
    names = args.module or list(MODULES)
    Workspace.kexpr = args.select

    runs: list[ModuleRun] = []
    generated: list[Mutant] = []        # before --only/--marked/--limit: what MARKED must find
    for n in names:
        mr = ModuleRun(n, test_files(MODULES[n], n, args.tests))
        mr.mutants = generate(n, MODULES[n])
        generated.extend(mr.mutants)
        if args.only:
            mr.mutants = [m for m in mr.mutants if re.search(args.only, m.describe())]
        if args.marked:
            mr.mutants = [m for m in mr.mutants if m.marked]
        if args.limit:
            marked = [m for m in mr.mutants if m.marked]
            rest = [m for m in mr.mutants if not m.marked]
            step = max(1, len(rest) // args.limit)
            mr.mutants = marked + rest[::step][:max(0, args.limit - len(marked))]
        if mr.mutants:
            runs.append(mr)
    # Against the unfiltered list: a marked mutant that --only filtered out is not missing.
    for miss in missing_marked(generated, names):
        print(f"MARKED MUTANT NOT FOUND (code changed?): {miss}")
    if args.list:
        for mr in runs:
            print(f"== {mr.name}: {len(mr.mutants)} mutants; tests: {' '.join(mr.tests)}")
            for m in mr.mutants:
                print(f"   {m.describe()}")
        return

    t_start = time.perf_counter()
    base = tempfile.mkdtemp(prefix="aiovmm-mutants-")
    try:
        workspaces = [Workspace(base, i) for i in range(max(1, args.jobs))]
        for ws in workspaces:
            ws.verify()
        # Baselines (in parallel across modules), then every mutant on any free workspace.
        pool_ws: list[Workspace] = list(workspaces)
        cond = threading.Condition()

        def with_ws(fn, *a):
            with cond:
                cond.wait_for(lambda: pool_ws)
                ws = pool_ws.pop()
            try:
                return fn(ws, *a)
            finally:
                with cond:
                    pool_ws.append(ws)
                    cond.notify()

        with cf.ThreadPoolExecutor(len(workspaces)) as ex:
            list(ex.map(lambda mr: with_ws(run_baseline, mr), runs))
            for mr in runs:
                b = " ".join(f"{os.path.basename(t)}={s:.0f}s" for t, s in mr.baseline.items())
                print(f"baseline {mr.name}: {b}" + (f"  FAILED {mr.baseline_error}"
                                                    if mr.baseline_error else "")
                      + (f"  FLAKY (kills by these may be false): {' '.join(mr.flaky)}"
                         if mr.flaky else ""), flush=True)
            jobs = [(mr, m) for mr in runs if not mr.baseline_error for m in mr.mutants]
            done = 0

            def one(job):
                mr, m = job
                with_ws(run_mutant, mr, m, args.timeout_factor)
                return m

            for m in ex.map(one, jobs):
                done += 1
                print(f"[{done}/{len(jobs)}] {m.status:<8} {m.seconds:5.1f}s {m.describe()}"
                      + (f"  <- {m.killer}" if m.status == "killed" and m.killer else ""),
                      flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)

    print()
    total = killed = 0
    survivors: list[Mutant] = []
    for mr in runs:
        if mr.baseline_error:
            print(f"{mr.name:<10} SKIPPED: baseline failed: {mr.baseline_error}")
            continue
        k = sum(1 for m in mr.mutants if m.status == "killed")
        total += len(mr.mutants)
        killed += k
        secs = sum(m.seconds for m in mr.mutants)
        print(f"{mr.name:<10} killed {k}/{len(mr.mutants)}  ({secs:.0f} s of test runs)")
        for m in mr.mutants:
            if m.status == "survived":
                survivors.append(m)
                print(f"    SURVIVED {m.describe()}")
    for m in (m for r in runs for m in r.mutants if m.marked):
        print(f"issue 9 mutant: {m.status or 'not run'}: {m.describe()}")
    print(f"run took {time.perf_counter() - t_start:.0f} s with {args.jobs} jobs")
    pct = 100.0 * killed / total if total else 0.0
    print(f"killed_pct={pct:.1f} survivors={len(survivors)}")


if __name__ == "__main__":
    main()

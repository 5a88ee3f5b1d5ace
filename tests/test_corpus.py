"""Bad-input corpus: every case of tests/corpus.py through the CLI, in its own directory.

ERROR     exit 2; stderr is exactly one line, "error: …", naming the file or layer and saying why; no Traceback;
          nothing in the directory created, removed or changed (hidden temporary files included).
OK        exit 0; the output exists, is the only new file, and `verify OUT --reference IN` exits 0.
FALLBACK  as OK, and stdout names the layer and why it was handled differently.

By default every case runs in this process through the CLI's own entry point (`quant_core.cli.main(argv)`, its
stdout/stderr captured, warnings shown as a fresh interpreter would show them, an escaping exception printed as a
Traceback): a child per case costs a torch import each (minutes for the whole corpus on two cores). A few cases
(CHILD_CASES) also run as real `python -m quant_core` children, so what the process itself writes at start-up and
exit is checked too. QUANT_CORE_CORPUS_CLI=subprocess runs every case as a child (in parallel, one per core), and
QUANT_CORE_CORPUS_VERIFY=subprocess runs `verify` as `python -m quant_core verify` as well.
With QUANT_CORE_CORPUS_TABLE=FILE.md the outcome of every case is written there as a markdown table.
"""
import contextlib
import io
import os
import re
import subprocess
import sys
import time
import traceback
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from corpus import CASES, ERROR, FALLBACK, OK, Built, Case

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLI = [sys.executable, "-m", "quant_core"]
TIMEOUT_S = 120
RESULTS: dict[str, dict] = {}  # case name → row of the table


@dataclass
class Run:
    built: Built
    directory: Path
    before: dict
    after: dict
    code: int
    out: str
    err: str
    seconds: float


def snapshot(directory: Path) -> dict[str, tuple]:
    """Every path under `directory` (hidden ones too) → (kind, size, mtime_ns); directories as ('dir',)."""
    state = {}
    for root, dirs, files in os.walk(directory):
        for name in dirs:
            state[os.path.relpath(os.path.join(root, name), directory)] = ("dir",)
        for name in files:
            path = os.path.join(root, name)
            st = os.lstat(path)
            state[os.path.relpath(path, directory)] = ("file", st.st_size, st.st_mtime_ns)
    return state


# run as real child processes in the default run too: an ERROR (one stderr line from the process as a whole) and a
# FALLBACK (exit 0, stdout notes, then verify)
CHILD_CASES = ["truncated mid-tensor", "NaN weights with --allow-nonfinite"]


def _run_child(case: Case, directory: Path, built: Built) -> Run:
    before = snapshot(directory)
    start = time.perf_counter()
    try:
        proc = subprocess.run(CLI + built.argv + ["--no-progress"], cwd=ROOT, capture_output=True, text=True,
                              timeout=TIMEOUT_S, stdin=subprocess.DEVNULL)
        code, out, err = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as e:
        code, out, err = "timeout", str(e.stdout or ""), str(e.stderr or "") + f"\n(timed out after {TIMEOUT_S} s)"
    return Run(built, directory, before, snapshot(directory), code, out, err, time.perf_counter() - start)


def _show_warning(message, category, filename, lineno, file=None, line=None):
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def _run_in_process(case: Case, directory: Path, built: Built) -> Run:
    """`python -m quant_core ARGV` without the child: the same entry point, its output captured, warnings filtered
    and shown on stderr as by a fresh interpreter (pytest would otherwise collect them), and an exception that
    escapes `main` printed as the interpreter would print it (a Traceback, which fails the case)."""
    from quant_core.cli import main
    before = snapshot(directory)
    out, err = io.StringIO(), io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
        warnings.resetwarnings()  # Python's default filters
        for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
            warnings.filterwarnings("ignore", category=category)
        warnings.showwarning = _show_warning
        try:
            code = main(built.argv + ["--no-progress"])
        except SystemExit as e:  # argparse: usage and message already on stderr
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            if isinstance(e.code, str):
                print(e.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc(file=sys.stderr)
            code = 1
    return Run(built, directory, before, snapshot(directory), code, out.getvalue(), err.getvalue(),
               time.perf_counter() - start)


def _build(cases: list[Case], tmp_path_factory, prefix: str) -> dict[str, tuple[Path, Built]]:
    built = {}
    for i, c in enumerate(cases):
        directory = tmp_path_factory.mktemp(f"{prefix}{i:02d}_", numbered=True)
        built[c.name] = (directory, c.build(directory))
    return built


def _run_children(cases: list[Case], built: dict) -> dict[str, Run]:
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        futures = {c.name: pool.submit(_run_child, c, *built[c.name]) for c in cases}
        return {name: f.result() for name, f in futures.items()}


@pytest.fixture(scope="module")
def corpus_runs(request, tmp_path_factory):
    """Build every selected case (in this process, in order) and run them all through the CLI: in this process one
    after another, or (QUANT_CORE_CORPUS_CLI=subprocess) as children in parallel."""
    selected = [item.callspec.params["case"].name for item in request.session.items
                if item.module is request.module and hasattr(item, "callspec") and "case" in item.callspec.params
                and item.originalname == "test_corpus"]
    cases = [c for c in CASES if c.name in set(selected)]
    built = _build(cases, tmp_path_factory, "case")
    if os.environ.get("QUANT_CORE_CORPUS_CLI") == "subprocess":
        return _run_children(cases, built)
    return {c.name: _run_in_process(c, *built[c.name]) for c in cases}


@pytest.fixture(scope="module")
def child_runs(tmp_path_factory):
    """CHILD_CASES built afresh and run as `python -m quant_core` children, in parallel."""
    cases = [c for c in CASES if c.name in CHILD_CASES]
    return _run_children(cases, _build(cases, tmp_path_factory, "child"))


@pytest.fixture(scope="module", autouse=True)
def corpus_table():
    yield
    path = os.environ.get("QUANT_CORE_CORPUS_TABLE")
    if path and RESULTS:
        write_table(path)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("`", "'").strip()


def write_table(path: str) -> None:
    rows = [RESULTS[c.name] for c in CASES if c.name in RESULTS]
    passed = sum(r["verdict"] == "pass" for r in rows)
    lines = [f"Bad-input corpus (tests/test_corpus.py): {len(rows)} cases, {passed} pass, {len(rows) - passed} fail.",
             "",
             "| # | case | expected | exit | first line of stderr (stdout if none) | detail | verdict |",
             "|---:|---|---|---:|---|---|---|"]
    for i, r in enumerate(rows, 1):
        lines.append(f"| {i} | {_cell(r['case'])} | {r['expected']} | {r['code']} | {_cell(r['first'])} | "
                     f"{_cell(r['detail'])} | {r['verdict']} |")
    Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")


def _shorten(text: str, run: Run) -> str:
    return text.replace(str(run.directory) + os.sep, "").replace(str(run.directory), ".")


def _first_line(run: Run) -> str:
    text = run.err if run.err.strip() else run.out
    return _shorten(next((l for l in text.splitlines() if l.strip()), ""), run)


def _verify(output: str, reference: str, capsys) -> tuple[int, str]:
    argv = ["verify", output, "--reference", reference]
    if os.environ.get("QUANT_CORE_CORPUS_VERIFY") == "subprocess":
        proc = subprocess.run(CLI + argv, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT_S)
        return proc.returncode, proc.stdout + proc.stderr
    from quant_core.cli import main
    capsys.readouterr()
    try:
        code = main(argv)
    except BaseException as e:  # a crash of verify is a failure of the case, reported like one
        out, err = capsys.readouterr()
        return -1, f"{out}{err}verify crashed: {type(e).__name__}: {e}"
    out, err = capsys.readouterr()
    return code, out + err


def check(case: Case, run: Run, capsys) -> tuple[list[str], str]:
    """(problems, detail) of one run against its expectation; no problems = pass."""
    problems = []
    added = sorted(set(run.after) - set(run.before))
    removed = sorted(set(run.before) - set(run.after))
    changed = sorted(p for p in set(run.before) & set(run.after) if run.before[p] != run.after[p])
    if "Traceback" in run.err or "Traceback" in run.out:
        problems.append("Traceback in the output")
    detail = ""
    if case.expect == ERROR:
        lines = run.err.splitlines()
        if run.code != 2:
            problems.append(f"exit code {run.code}, expected 2")
        if len(lines) != 1 or not run.err.startswith("error:"):
            problems.append(f"stderr is {len(lines)} line(s), expected one 'error:' line")
        message = lines[0] if lines else ""
        if not run.built.mentions:
            problems.append("the case declares no file or layer name the error must hold")
        for name in run.built.mentions:
            if name not in message:
                problems.append(f"the error does not name {name!r}")
        if case.why and not re.search(case.why, message):
            problems.append(f"the error does not say why (expected /{case.why}/)")
        if added or removed or changed:
            problems.append(f"directory changed: added {added}, removed {removed}, changed {changed}")
        return problems, ""
    # OK / FALLBACK
    if run.code != 0:
        problems.append(f"exit code {run.code}, expected 0")
    output = run.built.output
    expected_new = {os.path.relpath(p, run.directory) for p in [output, *run.built.extra_outputs] if p}
    if set(added) - expected_new:
        problems.append(f"unexpected new files: {sorted(set(added) - expected_new)}")
    if removed or changed:
        problems.append(f"directory changed: removed {removed}, changed {changed}")
    if case.expect == FALLBACK:
        notes = [l.strip() for l in run.out.splitlines()
                 if any(name in l for name in run.built.mentions) and re.search(case.why, l)]
        if not notes:
            problems.append(f"stdout does not name {run.built.mentions} with /{case.why}/")
        detail = _shorten(notes[0], run) if notes else ""
    if output is None or not os.path.exists(output):
        problems.append("no output file")
        return problems, detail
    code, text = _verify(output, run.built.input, capsys)
    verdict_line = next((l for l in reversed(text.splitlines()) if l.strip()), "")
    if code != 0:
        problems.append(f"verify exit code {code}: {verdict_line}")
    if not detail:
        detail = _shorten(verdict_line, run)
    return problems, detail


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_corpus(case, corpus_runs, capsys):
    run = corpus_runs[case.name]
    problems, detail = check(case, run, capsys)
    RESULTS[case.name] = {"case": case.name, "expected": case.expect, "code": run.code, "first": _first_line(run),
                          "detail": detail if not problems else "; ".join(problems),
                          "verdict": "pass" if not problems else "FAIL"}
    assert not problems, (f"{case.name}: " + "; ".join(problems) + f"\n--- argv: {run.built.argv}"
                          f"\n--- exit {run.code}\n--- stderr:\n{run.err}\n--- stdout:\n{run.out}")


@pytest.mark.parametrize("name", CHILD_CASES)
def test_corpus_case_as_a_child_process(name, child_runs, capsys):
    case = next(c for c in CASES if c.name == name)
    run = child_runs[name]
    problems, _ = check(case, run, capsys)
    assert not problems, (f"{name} (child process): " + "; ".join(problems) + f"\n--- argv: {run.built.argv}"
                          f"\n--- exit {run.code}\n--- stderr:\n{run.err}\n--- stdout:\n{run.out}")


def test_corpus_is_large_enough():
    assert set(CHILD_CASES) <= {c.name for c in CASES}
    assert len(CASES) >= 32 and len({c.name for c in CASES}) == len(CASES)
    assert {ERROR, OK, FALLBACK} == {c.expect for c in CASES}

"""Mutation testing of the modules where a silent bug costs most (issue 18): `make mutate`, or
`python tools/mutate.py fileio metrics` for some of them. Prints the score per module and lists the survivors.

Each module is mutated by mutmut 3 in its own temporary copy of the project (src/, tests/, pyproject.toml with a
[tool.mutmut] section naming that module and the tests that cover it), so the working tree is never touched. mutmut
runs, for each mutant, only the selected tests that reach the mutated function. Equivalent mutants are listed, with
the reason, in docs/mutation-equivalents.md; the score here counts them as survivors (nothing is excluded silently).
The score is caught / checked; with --budget, mutants not reached in time are counted apart as not checked.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# module (under src/facevae) -> the tests that cover it, run in-process (mutants do not reach subprocesses)
MODULES: dict[str, list[str]] = {
    "fileio": ["tests/test_planted.py", "tests/test_safety.py",
               "tests/test_faults.py::test_full_disk_keeps_the_previous_checkpoint"],
    "metrics": ["tests/test_evaluate.py", "tests/test_objectives.py", "tests/test_planted.py"],
    "checkpoint": ["tests/test_faults.py", "tests/test_model.py", "tests/test_planted.py"],
    "distributions": ["tests/test_distributions.py", "tests/test_likelihoods.py", "tests/test_objectives.py",
                      "tests/test_new_likelihood.py", "tests/test_planted.py"],
    "data/cache": ["tests/test_folder.py", "tests/test_celeba.py", "tests/test_planted.py"],
    "train": ["tests/test_faults.py", "tests/test_planted.py", "tests/test_precision.py"],
    "evaluate": ["tests/test_evaluate.py", "tests/test_planted.py"],
}
# What mutmut's `results` calls each outcome; killed (and timed out: an infinite loop is caught) count as caught.
CAUGHT = {"killed", "timeout"}


def _config(module: str, tests: list[str]) -> str:
    """The [tool.mutmut] section for one module: mutate it alone, select its tests, skip the slow ones."""
    quoted = ", ".join(json.dumps(t) for t in tests)
    return ("\n[tool.mutmut]\n"
            'source_paths = ["src"]\n'
            f'only_mutate = ["src/facevae/{module}.py"]\n'
            f"pytest_add_cli_args_test_selection = [{quoted}]\n"
            'pytest_add_cli_args = ["-m", "not slow", "-p", "no:cacheprovider", "-x", "-q"]\n'
            'also_copy = ["configs", "docs", "benchmarks"]\n'
            'process_isolation = "forkserver"\n'
            "use_git_change_detection = false\n")


def _copy(module: str, dest: Path) -> None:
    """The project's files (no venv, runs or caches) into dest, pyproject.toml with the module's mutmut section."""
    ignore = shutil.ignore_patterns(".git", ".venv", "runs", "mutants", "__pycache__", "*.egg-info", ".pytest_cache")
    shutil.copytree(ROOT, dest, ignore=ignore, dirs_exist_ok=True)
    (dest / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text() + _config(module, MODULES[module]))


def _results(work: Path) -> dict[str, list[str]]:
    """mutmut's outcome per mutant, grouped: {status: [mutant names]}."""
    out = subprocess.run([sys.executable, "-m", "mutmut", "results", "--all", "true"], cwd=work,
                         capture_output=True, text=True).stdout
    groups: dict[str, list[str]] = {}
    for line in out.splitlines():
        m = re.match(r"\s*(\S+): (\w[\w ]*)$", line)
        if m:
            groups.setdefault(m.group(2).strip(), []).append(m.group(1))
    return groups


def _run_mutmut(work: Path, children: int, budget: float | None) -> subprocess.CompletedProcess:
    """`mutmut run` in work, stopped (its whole process group) after `budget` seconds: the rest stay not checked."""
    proc = subprocess.Popen([sys.executable, "-m", "mutmut", "run", "--max-children", str(children)], cwd=work,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=budget)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        out, err = proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def mutate(module: str, *, children: int, keep: bool, budget: float | None = None) -> dict[str, object]:
    """Run mutmut on one module in a temporary copy; its score and survivors."""
    work = Path(tempfile.mkdtemp(prefix=f"facevae-mutate-{module.replace('/', '-')}-"))
    try:
        _copy(module, work)
        start = time.perf_counter()
        proc = _run_mutmut(work, children, budget)
        groups = _results(work)
        survivors = sorted(groups.get("survived", []) + groups.get("no tests", []))
        diffs = {m: _show(work, m) for m in survivors}
        total = sum(len(v) for v in groups.values())
        checked = total - len(groups.get("not checked", []))
        caught = sum(len(v) for k, v in groups.items() if k in CAUGHT)
        return {"module": module, "mutants": total, "checked": checked, "caught": caught,
                "score": caught / checked if checked else None,
                "outcomes": {k: len(v) for k, v in groups.items()}, "survivors": diffs,
                "seconds": round(time.perf_counter() - start), "returncode": proc.returncode,
                "log": proc.stdout[-3000:] + proc.stderr[-3000:] if not caught else ""}
    finally:
        if keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


def _show(work: Path, mutant: str) -> str:
    """The diff of one mutant, its changed lines only."""
    out = subprocess.run([sys.executable, "-m", "mutmut", "show", mutant], cwd=work, capture_output=True,
                         text=True).stdout
    return "\n".join(line for line in out.splitlines()
                     if line.startswith(("+", "-")) and not line.startswith(("+++", "---")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("modules", nargs="*", default=list(MODULES), help=f"some of {', '.join(MODULES)}")
    parser.add_argument("--children", type=int, default=2, help="mutants tested at once")
    parser.add_argument("--keep", action="store_true", help="keep the temporary copies (for mutmut browse)")
    parser.add_argument("--budget", type=float, help="seconds per module; mutants not reached are reported as such")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    unknown = [m for m in args.modules if m not in MODULES]
    if unknown:
        parser.error(f"unknown module(s) {unknown}; choose from {list(MODULES)}")
    results = []
    for module in args.modules:
        r = mutate(module, children=args.children, keep=args.keep, budget=args.budget)
        results.append(r)
        score = "n/a" if r["score"] is None else f"{100 * r['score']:.1f}%"
        print(f"{module:14s} {r['caught']:4d} / {r['checked']:4d} checked caught ({r['mutants']} mutants)  "
              f"score {score}  {r['seconds']} s  "
              f"{r['outcomes']}", flush=True)
        for name, diff in r["survivors"].items():
            print(f"  survived {name}\n    " + diff.replace("\n", "\n    "), flush=True)
        if r["log"]:
            print(r["log"], file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()

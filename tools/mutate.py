"""Mutation testing of the modules where a silent bug costs most (issue 18): `make mutate`, or
`python tools/mutate.py fileio metrics` for some of them. Prints the score per module and lists the survivors.

The modules are mutated by one mutmut 3 run per group (GROUPS) in a temporary copy of the project (src/, tests/,
pyproject.toml with a [tool.mutmut] section naming the modules and the tests that cover them), so the working tree
is never touched, and the stats run and the fork server's warm-up are paid once a group. Only the functions in scope
(SCOPES) are mutated; the others' mutants are counted and reported as out of scope, with the reason in
docs/mutation-equivalents.md. mutmut runs, for each mutant, the selected tests that reach the mutated function, in a
pytest forked from its fork server. What makes that fast enough here (each measured): the copy's
conftest runs them cheapest first (set-up included, from mutmut's stats run), so that -x stops at the cheapest
failing test; it warms torch, matplotlib and the lazy imports with one tiny training run in the fork server, which
every forked test process inherits (one thread: a larger OpenMP pool does not survive a fork); pytest's
unraisableexception plugin, whose gc at exit took 0.8 s a mutant, is off; only in-process tests are selected.
Equivalent mutants are listed, with the reason, in docs/mutation-equivalents.md; the score counts them as survivors
(nothing is excluded silently) and a second score sets them aside.
The score is caught / checked; with --budget, mutants not reached in time are counted apart as not checked.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Scope:
    """What `make mutate` mutates in one module, and the in-process tests that cover it."""

    tests: tuple[str, ...]  # pytest selections (files or node ids); mutants never reach a subprocess
    functions: tuple[str, ...] = ()  # "name" or "Class.method" (fnmatch patterns); empty: every function


# The tests of tests/test_faults.py that train in-process (the others run the CLI in a subprocess: no mutant there).
FAULTS = tuple(f"tests/test_faults.py::{name}" for name in (
    "test_damaged_checkpoint_is_refused", "test_pickle_in_place_of_the_model_is_never_unpickled",
    "test_weights_that_do_not_match_the_config_are_refused", "test_non_finite_loss_skips_the_batch",
    "test_too_many_non_finite_steps_stop_with_the_last_good_checkpoint", "test_full_disk_keeps_the_previous_checkpoint",
    "test_unwritable_run_directory", "test_training_steps_do_not_read_the_device",
    "test_a_non_finite_input_leaves_no_trace_in_batchnorm"))

MINE = "tests/test_mutation.py"  # the small tests written against the survivors, first in every selection
SCOPES: dict[str, Scope] = {
    # atomic writes, and the removal of what they made (the output-directory checks, lock and PNG sniffing: see
    # docs/mutation-equivalents.md)
    "fileio": Scope((MINE, "tests/test_planted.py", "tests/test_safety.py",
                     "tests/test_faults.py::test_full_disk_keeps_the_previous_checkpoint"),
                    ("fsync_path", "fsync_tree", "atomic_write", "_new_temp", "_own_name", "remove_own_dir")),
    # the bounds and units (SSIM, an image-quality figure, is left out)
    "metrics": Scope((MINE, "tests/test_evaluate.py", "tests/test_objectives.py", "tests/test_planted.py"),
                     ("importance_samples", "iw_bound", "bits_per_dim", "mse", "psnr")),
    # the likelihoods and the posterior: all of it
    "distributions": Scope((MINE, "tests/test_distributions.py", "tests/test_likelihoods.py",
                            "tests/test_objectives.py", "tests/test_new_likelihood.py", "tests/test_exact8bit.py",
                            "tests/test_planted.py")),
    # the training checkpoint: weights, optimiser, RNG and training state, written atomically and read back
    "checkpoint": Scope((MINE, *FAULTS, "tests/test_model.py", "tests/test_planted.py", "tests/test_safety.py"),
                        ("model_bytes", "read_training", "save_model", "save_checkpoint", "has_checkpoint",
                         "load_checkpoint", "_read_state", "_check_optimizer_header", "_file_sha256",
                         "_match_parameter_layout", "_cpu_state", "_optimizer_to_flat", "_optimizer_from_flat",
                         "_rng_state", "_set_rng_state")),
    # the training state and the data order
    "train": Scope((MINE, *FAULTS, "tests/test_planted.py", "tests/test_precision.py", "tests/test_safety.py"),
                   ("TrainState.*", "Meter.*", "seed_everything", "epoch_order", "batches_per_epoch",
                    "MetricsLog.truncate_after", "Trainer._resume", "Trainer._epoch", "Trainer._batch",
                    "Trainer.guarded_step", "Trainer._sync", "Trainer._save_checkpoint", "Trainer._end_epoch",
                    "_finite", "_step", "_warmup")),
    # the splits
    "data/cache": Scope((MINE, "tests/test_folder.py", "tests/test_celeba.py", "tests/test_planted.py"),
                        ("seeded_split", "Cache.split_indices")),
    # the evaluation's bounds and units: the likelihood terms, the standard errors, the active units
    "evaluate": Scope((MINE, "tests/test_evaluate.py", "tests/test_exact8bit.py", "tests/test_planted.py"),
                      ("_likelihood_terms", "_report", "_likelihood_figures")),
}
MODULES = list(SCOPES)
# One mutmut run per group: its stats run and fork server are shared, but its test selection is the union of its
# modules', and every surviving mutant runs each selected test that reaches its function. The maths modules' tests
# stay apart from the training state's (in-process training runs, which reach nearly every likelihood function).
GROUPS = (("distributions", "metrics", "evaluate", "data/cache"), ("train", "checkpoint", "fileio"))
EQUIVALENTS_DOC = ROOT / "docs" / "mutation-equivalents.md"
# What mutmut's `results` calls each outcome; killed (and timed out: an infinite loop is caught) count as caught.
CAUGHT = {"killed", "timeout"}

# Appended to the copy's tests/conftest.py. mutmut times only a test's call phase, and runs a mutant's tests in the
# order of a set. In its stats run, add the set-up and tear-down (fixtures that train a model cost more than the test
# itself); in a mutant's run, sort the tests cheapest first (the forked pytest inherits mutmut's recorded times), so
# that -x stops a killed mutant at its cheapest failing test.
ORDER_HOOK = '''


def _warm_up() -> None:
    """tools/mutate.py: one tiny training run in mutmut's fork server, so that every forked test process inherits
    torch's kernels, matplotlib and the lazily imported modules warm (about a second a mutant). The random generators
    are left as they were. Only where MUTANT_UNDER_TEST is empty: not in the stats run (what it calls would be counted
    to the first test), not in a mutant's run."""
    import random
    import tempfile

    import numpy as np

    from facevae.train import train

    states = torch.get_rng_state(), np.random.get_state(), random.getstate()
    with tempfile.TemporaryDirectory() as tmp:
        previous = os.environ.get("FACEVAE_CACHE")
        os.environ["FACEVAE_CACHE"] = tmp
        train(tiny_config(batch_size=40, epochs=1, image_every=1), Path(tmp) / "run", progress=False)
        os.environ.pop("FACEVAE_CACHE") if previous is None else os.environ.update(FACEVAE_CACHE=previous)
    torch.set_rng_state(states[0]), np.random.set_state(states[1]), random.setstate(states[2])


import sys  # noqa: E402

if not os.environ.get("MUTANT_UNDER_TEST") and not getattr(sys, "facevae_warm", False):  # once, in the fork server
    from pathlib import Path

    sys.facevae_warm = True
    torch.set_num_threads(int(os.environ.get("FACEVAE_TEST_THREADS", "2")))  # no larger thread pool to fork
    _warm_up()


def pytest_runtest_makereport(item, call):
    """tools/mutate.py: a test's cost is its set-up, call and tear-down."""
    if call.when != "call" and os.environ.get("MUTANT_UNDER_TEST") == "stats":
        from mutmut.state import state
        state().duration_by_test[item.nodeid] += call.duration


def pytest_collection_modifyitems(items):
    """tools/mutate.py: the cheapest tests first, so that -x stops early."""
    if not os.environ.get("MUTANT_UNDER_TEST", "").startswith("facevae."):
        return
    from mutmut.state import state
    took = state().duration_by_test
    items.sort(key=lambda item: took.get(item.nodeid, float("inf")))
'''


def mutant_patterns(module: str) -> list[str]:
    """mutmut's names of the mutants in scope, e.g. facevae.train.x_epoch_order__mutmut_*; every function of a
    module without a list."""
    dotted = "facevae." + module.replace("/", ".")
    patterns = []
    for f in SCOPES[module].functions:
        cls, _, name = f.rpartition(".")
        mangled = f"x\u01c1{cls}\u01c1{name}" if cls else f"x_{name}"
        patterns.append(f"{dotted}.{mangled}__mutmut_*")
    return patterns or [f"{dotted}.x*__mutmut_*"]


def listed_equivalents() -> set[str]:
    """The mutants docs/mutation-equivalents.md lists as equivalent (its "## Equivalent mutants" section)."""
    text = EQUIVALENTS_DOC.read_text() if EQUIVALENTS_DOC.is_file() else ""
    section = text.split("## Equivalent mutants", 1)[-1].split("\n## ", 1)[0] if "## Equivalent mutants" in text else ""
    return set(re.findall(r"`(facevae\.[\w.\u01c1]+__mutmut_\d+)`", section))


def _config(modules: list[str], timeout_multiplier: float) -> str:
    """The [tool.mutmut] section: mutate these modules, select their tests (mutmut then runs, for each mutant, those
    that reach its function), skip the slow ones."""
    tests = list(dict.fromkeys(t for m in modules for t in SCOPES[m].tests))  # the union, in order, once each
    quoted = ", ".join(json.dumps(t) for t in tests)
    files = ", ".join(json.dumps(f"src/facevae/{m}.py") for m in modules)
    return ("\n[tool.mutmut]\n"
            'source_paths = ["src"]\n'
            f"only_mutate = [{files}]\n"
            f"pytest_add_cli_args_test_selection = [{quoted}]\n"
            # no:unraisableexception: its two gc.collect() at exit took 0.8 s of each mutant's run
            'pytest_add_cli_args = ["-m", "not slow", "-x", "-q", "-p", "no:cacheprovider", '
            '"-p", "no:unraisableexception"]\n'
            'also_copy = ["configs", "docs", "benchmarks"]\n'
            'process_isolation = "forkserver"\n'
            f"timeout_multiplier = {timeout_multiplier}\n"
            "use_git_change_detection = false\n")


def _copy(modules: list[str], dest: Path, timeout_multiplier: float) -> None:
    """The project's files (no venv, runs or caches) into dest: pyproject.toml with the modules' mutmut section, the
    conftest with the fastest-first hook."""
    ignore = shutil.ignore_patterns(".git", ".venv", "runs", "mutants", "__pycache__", "*.egg-info", ".pytest_cache",
                                    ".old", ".whl", ".gl")
    shutil.copytree(ROOT, dest, ignore=ignore, dirs_exist_ok=True)
    (dest / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text() + _config(modules, timeout_multiplier))
    conftest = dest / "tests" / "conftest.py"
    conftest.write_text(conftest.read_text() + ORDER_HOOK)


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


def _run_mutmut(work: Path, args: list[str], budget: float | None) -> subprocess.CompletedProcess:
    """`mutmut run` in work, stopped (its whole process group) after `budget` seconds: the rest stay not checked.
    One torch thread per test process: mutmut runs --children of them at once."""
    env = {**os.environ, "FACEVAE_TEST_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "mutmut", "run", *args], cwd=work, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=budget)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        out, err = proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def mutate_all(modules: list[str], *, budget: float | None = None, **kwargs) -> tuple[list[dict[str, object]], float]:
    """mutate() each group's modules among `modules` (GROUPS), one group after the other; the results in the order
    of `modules`, and the seconds it all took. `budget` is shared: each group gets what the ones before it left."""
    start, results = time.perf_counter(), {}
    for group in GROUPS:
        chosen = [m for m in modules if m in group]
        if chosen:
            left = None if budget is None else max(1.0, budget - (time.perf_counter() - start))
            for r in mutate(chosen, budget=left, **kwargs)[0]:
                results[r["module"]] = r
    return [results[m] for m in modules], time.perf_counter() - start


def mutate(modules: list[str], *, children: int, keep: bool, budget: float | None = None,
           timeout_multiplier: float = 2.0) -> tuple[list[dict[str, object]], float]:
    """Run mutmut once on the modules' functions in scope, in a temporary copy (one stats run, one fork server);
    each module's score and survivors, and the seconds it took."""
    work = Path(tempfile.mkdtemp(prefix="facevae-mutate-"))
    try:
        _copy(modules, work, timeout_multiplier)
        start = time.perf_counter()
        patterns = [p for m in modules for p in mutant_patterns(m)]
        proc = _run_mutmut(work, ["--max-children", str(children), *patterns], budget)
        seconds = time.perf_counter() - start
        groups = _results(work)
        return [_module_result(work, m, groups, proc) for m in modules], seconds
    finally:
        if keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


def _module_result(work: Path, module: str, all_groups: dict[str, list[str]],
                   proc: subprocess.CompletedProcess) -> dict[str, object]:
    """One module's outcome: its mutants in scope grouped by outcome, the score, the survivors with their diffs."""
    prefix = "facevae." + module.replace("/", ".") + ".x"
    patterns = mutant_patterns(module)
    mine = {k: [m for m in v if m.startswith(prefix)] for k, v in all_groups.items()}
    out_of_scope = {m for v in mine.values() for m in v if not any(fnmatch.fnmatchcase(m, p) for p in patterns)}
    groups = {k: [m for m in v if m not in out_of_scope] for k, v in mine.items()}
    groups = {k: v for k, v in groups.items() if v}
    survivors = sorted(groups.get("survived", []) + groups.get("no tests", []))
    total = sum(len(v) for v in groups.values())
    checked = total - len(groups.get("not checked", []))
    caught = sum(len(v) for k, v in groups.items() if k in CAUGHT)
    equivalent = sorted(set(survivors) & listed_equivalents())
    real = checked - len(equivalent)
    return {"module": module, "mutants": total, "checked": checked, "caught": caught,
            "score": caught / checked if checked else None, "out_of_scope": len(out_of_scope),
            "equivalent": equivalent, "score_without_equivalents": caught / real if real else None,
            "outcomes": {k: len(v) for k, v in groups.items()}, "survivors": {m: _show(work, m) for m in survivors},
            "returncode": proc.returncode, "log": proc.stdout[-3000:] + proc.stderr[-3000:] if not caught else ""}


def _stale_equivalents(results: list[dict[str, object]]) -> list[str]:
    """Equivalents the docs list for the modules run, in scope, that did not survive (all of them were checked)."""
    survived = {m for r in results for m in r["survivors"]}
    run = [r["module"] for r in results if r["checked"] == r["mutants"]]
    in_scope = [p for m in run for p in mutant_patterns(m)]
    return sorted(m for m in listed_equivalents() - survived if any(fnmatch.fnmatchcase(m, p) for p in in_scope))


def _show(work: Path, mutant: str) -> str:
    """The diff of one mutant, its changed lines only."""
    out = subprocess.run([sys.executable, "-m", "mutmut", "show", mutant], cwd=work, capture_output=True,
                         text=True).stdout
    return "\n".join(line for line in out.splitlines()
                     if line.startswith(("+", "-")) and not line.startswith(("+++", "---")))


def _print(r: dict[str, object]) -> None:
    """One module's line, then its survivors with their diffs."""
    def pct(x: float | None) -> str:
        return "n/a" if x is None else f"{100 * x:.1f}%"

    scope = f", {r['out_of_scope']} out of scope" if r["out_of_scope"] else ""
    print(f"{r['module']:14s} {r['caught']:4d} / {r['checked']:4d} checked caught ({r['mutants']} mutants in scope"
          f"{scope})  score {pct(r['score'])} ({pct(r['score_without_equivalents'])} without the "
          f"{len(r['equivalent'])} listed equivalents)  {r['outcomes']}", flush=True)
    for name, diff in r["survivors"].items():
        listed = " (listed as equivalent)" if name in r["equivalent"] else ""
        print(f"  survived {name}{listed}\n    " + diff.replace("\n", "\n    "), flush=True)
    if r["log"]:
        print(r["log"], file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("modules", nargs="*", default=MODULES, help=f"some of {', '.join(MODULES)}")
    parser.add_argument("--children", type=int, default=os.cpu_count() or 2, help="mutants tested at once")
    parser.add_argument("--keep", action="store_true", help="keep the temporary copies (for mutmut browse)")
    parser.add_argument("--budget", type=float, help="seconds in all; mutants not reached are reported as such")
    parser.add_argument("--timeout-multiplier", type=float, default=2.0,
                        help="a mutant times out (caught) after this many times (its tests' clean time + 1 s) of "
                             "wall time (twice that of CPU time)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    unknown = [m for m in args.modules if m not in SCOPES]
    if unknown:
        parser.error(f"unknown module(s) {unknown}; choose from {MODULES}")
    try:
        import mutmut  # noqa: F401 - only whether it is there: it runs in a subprocess
    except ImportError:
        sys.exit("tools/mutate.py: mutmut is not installed in this Python: `make mutate` installs it, or "
                 "pip install -e '.[mutate]'")
    results, seconds = mutate_all(args.modules, children=args.children, keep=args.keep, budget=args.budget,
                                  timeout_multiplier=args.timeout_multiplier)
    for r in results:
        _print(r)
    stale = _stale_equivalents(results)
    if stale:
        print(f"listed as equivalent but not among the survivors (killed now, or renumbered by a code change: "
              f"update docs/mutation-equivalents.md): {', '.join(stale)}", flush=True)
    print(f"total {seconds:.0f} s for {', '.join(args.modules)} (one mutmut run per group of {GROUPS})", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"seconds": round(seconds), "modules": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()

"""Mutation testing of the core modules with cosmic-ray (issue #20): do the tests fail when the code is wrong?

    python tools/mutation.py densenet/io/checkpoint.py      # one module (or several)
    python tools/mutation.py --all                          # every core module (about 3 hours on 2 CPU cores)

For each module: copy densenet/ and tests/ to a scratch folder (your working tree is never touched), list
cosmic-ray's mutants of the module (those inside type annotations excluded: with ``from __future__
import annotations`` they are never evaluated), draw a seeded sample (all of them when fewer), run the
module's own tests on each mutant (``pytest -x -m "not slow"``, a timeout per mutant counts as killed)
and print every survivor and the score. Equivalent mutants (no behaviour change) are listed with their
reason in tools/mutation_equivalent.tsv and left out of the score. Results go to .mutation/<module>.sqlite
(cosmic-ray's session format: ``cr-report .mutation/<name>.sqlite`` shows them); ``--resume`` continues
an interrupted run; ``--rerun survivors`` runs the last survivors again (after adding tests), ``--rerun
timeouts`` the mutants that ran out of time (on a busy machine a slow run is not a kill); ``--report``
prints the last figures. Not part of CI (``bash .ci/run`` does not run it). docs/mutation.md has the figures.
"""
from __future__ import annotations

import argparse
import ast
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cosmic_ray.commands.init import init
from cosmic_ray.mutating import mutate_and_test
from cosmic_ray.work_db import WorkDB, use_db
from cosmic_ray.work_item import TestOutcome, WorkerOutcome, WorkResult

ROOT = Path(__file__).resolve().parent.parent
EQUIVALENT = ROOT / "tools" / "mutation_equivalent.tsv"

_CHECKPOINT_TESTS = ["tests/test_checkpoint.py", "tests/test_reliability.py", "-k",  # sigkill: timing-dependent under load
                     "not memory and not lock and not run_folder and not estimate and not sigkill"]
#: each core module and the pytest arguments that select its own tests (fast ones first: -x stops at the first failure)
MODULES: dict[str, list[str]] = {
    # test_volumes.py: the 1-D and 3-D forms of the kernels (transitions' pooling backward among them)
    "densenet/models/efficient.py": ["tests/test_efficient.py", "tests/test_sync_bn.py", "tests/test_volumes.py",
                                     "tests/test_fused.py"],
    "densenet/models/sync_bn.py": ["tests/test_sync_bn.py"],
    "densenet/models/fused.py": ["tests/test_fused.py", "tests/test_efficient.py"],
    "densenet/io/checkpoint.py": [*_CHECKPOINT_TESTS],
    "densenet/io/atomic.py": [*_CHECKPOINT_TESTS],
    "densenet/models/weights.py": ["tests/test_weights.py", "tests/test_hostile.py", "-k",
                                   "not round_trip and not image and not pillow"],
    "densenet/data/safe_pickle.py": ["tests/test_data.py", "tests/test_fuzz.py", "-k", "pickle or safe_loads or cifar"],
    "densenet/data/archive.py": ["tests/test_hostile.py", "tests/test_data.py", "tests/test_fuzz.py", "-k",
                                 "zip or tar or escapes or member or links or extract or truncated_archive or official "
                                 "or cifar_archive or bomb"],
    "densenet/data/matfile.py": ["tests/test_matfile.py", "tests/test_data.py", "tests/test_fuzz.py", "-k", "mat or svhn"],
}


def annotation_spans(source: str) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """(start, end) positions (line, column) of every type annotation in ``source``."""
    spans = []
    for node in ast.walk(ast.parse(source)):
        notes = []
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args
            notes = [a.annotation for a in [*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg]
                     if a is not None] + [node.returns]
        elif isinstance(node, ast.AnnAssign):
            notes = [node.annotation]
        spans += [((n.lineno, n.col_offset), (n.end_lineno, n.end_col_offset)) for n in notes if n is not None]
    return spans


def in_annotation(mutation, spans) -> bool:
    return any(start <= tuple(mutation.start_pos) and tuple(mutation.end_pos) <= end for start, end in spans)


def diff_lines(diff: str) -> tuple[str, str]:
    """(original line, mutated line) of a one-line mutation's unified diff."""
    old = [line[1:].strip() for line in diff.splitlines() if line.startswith("-") and not line.startswith("---")]
    new = [line[1:].strip() for line in diff.splitlines() if line.startswith("+") and not line.startswith("+++")]
    return " / ".join(old), " / ".join(new)


def equivalents() -> dict[tuple[str, str, str], str]:
    """{(module, original line, mutated line): reason} from tools/mutation_equivalent.tsv."""
    out = {}
    for line in EQUIVALENT.read_text().splitlines() if EQUIVALENT.exists() else []:
        if line.strip() and not line.startswith("#"):
            module, old, new, reason = line.split("\t")
            out[(module, old, new)] = reason
    return out


def scratch_copy() -> Path:
    scratch = Path(tempfile.mkdtemp(prefix="densenet-mutation-"))
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", ".hypothesis")
    for name in ("densenet", "tests"):
        shutil.copytree(ROOT / name, scratch / name, ignore=skip)
    shutil.copy2(ROOT / "pyproject.toml", scratch / "pyproject.toml")
    return scratch


def db_path(module: str) -> Path:
    return ROOT / ".mutation" / (module.replace("/", "-").removesuffix(".py") + ".sqlite")


def run_module(module: str, sample: int, seed: int, again: str, timeout: float | None, tests: str = "") -> dict[str, int]:
    """Run (``again`` "": a fresh sample; "resume": the mutants not yet run; "survivors" or "timeouts": those of the
    last run that survived or ran out of time)."""
    db_path(module).parent.mkdir(exist_ok=True)
    command = shlex.join([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-m", "not slow",
                         *(shlex.split(tests) if tests else MODULES[module])])
    scratch = scratch_copy()
    os.chdir(scratch)
    os.environ["PYTHONPATH"] = str(scratch)
    try:
        start = time.monotonic()
        baseline = subprocess.run(shlex.split(command), capture_output=True, text=True)
        took = time.monotonic() - start
        if baseline.returncode != 0:
            print(f"{module}: its tests fail without any mutation; fix them first (skipped):\n{baseline.stdout[-3000:]}")
            return {}
        limit = timeout or 5 * took + 120
        print(f"{module}: tests pass unmutated in {took:.0f} s; timeout per mutant {limit:.0f} s\n  {command}", flush=True)
        with use_db(str(db_path(module)), WorkDB.Mode.create) as db:
            if not (again and db.num_work_items):
                init([Path(module)], db, {})
                spans = annotation_spans(Path(module).read_text())
                items = sorted(db.work_items, key=lambda w: (w.mutations[0].operator_name, w.mutations[0].occurrence))
                eligible = [w for w in items if not in_annotation(w.mutations[0], spans)]
                chosen = {w.job_id for w in random.Random(seed).sample(eligible, min(sample, len(eligible)))}
                skipped = [w.job_id for w in items if w.job_id not in chosen]
                db.set_multiple_results(skipped, WorkResult(worker_outcome=WorkerOutcome.SKIPPED))
                print(f"  {len(items)} mutants, {len(eligible)} outside annotations, {len(chosen)} sampled (seed {seed})")
            pending = list(db.pending_work_items)
            if again == "survivors":
                known = equivalents()
                pending = [w for w, r in db.completed_work_items if r.test_outcome == TestOutcome.SURVIVED
                           and (module, *diff_lines(r.diff or "")) not in known]
            elif again == "timeouts":
                pending = [w for w, r in db.completed_work_items if r.output == "timeout"]
            pending.sort(key=lambda w: (w.mutations[0].start_pos, w.mutations[0].operator_name))
            for i, item in enumerate(pending, 1):
                result = mutate_and_test(item.mutations, command, limit)
                db.set_result(item.job_id, result)
                m = item.mutations[0]
                old, new = diff_lines(result.diff or "")
                what = "timeout" if result.output == "timeout" else (result.test_outcome or result.worker_outcome).value
                print(f"  [{i}/{len(pending)}] {what}: line {m.start_pos[0]} {m.operator_name}: {old}  ->  {new}", flush=True)
            return summarise(module, db)
    finally:
        os.chdir(ROOT)
        shutil.rmtree(scratch, ignore_errors=True)


def summarise(module: str, db: WorkDB) -> dict[str, int]:
    known = equivalents()
    counts = {"sampled": 0, "killed": 0, "killed by timeout": 0, "equivalent": 0, "survived": 0, "not run": 0}
    survivors = []
    for item, result in sorted(db.completed_work_items, key=lambda wr: wr[0].mutations[0].start_pos):
        if result.worker_outcome == WorkerOutcome.SKIPPED:
            continue
        counts["sampled"] += 1
        old, new = diff_lines(result.diff or "")
        if result.worker_outcome != WorkerOutcome.NORMAL:
            counts["not run"] += 1
        elif result.test_outcome == TestOutcome.KILLED:
            counts["killed"] += 1
            counts["killed by timeout"] += result.output == "timeout"
        elif (module, old, new) in known:
            counts["equivalent"] += 1
        else:
            counts["survived"] += 1
            survivors.append(f"{module}\t{old}\t{new}\t(line {item.mutations[0].start_pos[0]}) REASON")
    scored = counts["killed"] + counts["survived"]
    score = 100 * counts["killed"] / scored if scored else 100.0
    print(f"{module}: " + ", ".join(f"{k} {v}" for k, v in counts.items()) + f"; score {score:.1f}%")
    if survivors:
        print("  survivors (add a test, or a line to tools/mutation_equivalent.tsv with the reason):")
        print("\n".join("  " + s for s in survivors))
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("modules", nargs="*", help="module paths (keys of MODULES)")
    parser.add_argument("--all", action="store_true", help="every core module")
    parser.add_argument("--sample", type=int, default=50, help="mutants per module (all when fewer; default 50)")
    parser.add_argument("--seed", type=int, default=20, help="seed of the sample (default 20)")
    parser.add_argument("--timeout", type=float, help="seconds per mutant (default: 5x the unmutated run + 120)")
    parser.add_argument("--resume", action="store_true", help="continue the last run of each module")
    parser.add_argument("--rerun", choices=["survivors", "timeouts"],
                        help="run the last run's survivors again (after adding tests), or its timeouts (a busy machine)")
    parser.add_argument("--report", action="store_true", help="only summarise the last run of each module")
    parser.add_argument("--tests", default="", help="with --rerun survivors: only these pytest arguments (the tests added "
                        "since; exact, as the survivors passed all the others)")
    args = parser.parse_args()
    modules = list(MODULES) if args.all else args.modules
    unknown = [m for m in modules if m not in MODULES]
    if unknown or not modules:
        parser.error(f"name modules among: {', '.join(MODULES)} (or --all)")
    os.environ.update(OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    os.nice(19)  # share the machine
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("stopped"))  # clean up the scratch copy on kill
    for module in modules:
        if args.report:
            with use_db(str(db_path(module)), WorkDB.Mode.open) as db:
                summarise(module, db)
        else:
            again = args.rerun or ("resume" if args.resume else "")
            if args.tests and args.rerun != "survivors":
                parser.error("--tests goes with --rerun survivors")
            run_module(module, args.sample, args.seed, again, args.timeout, args.tests)


if __name__ == "__main__":
    main()

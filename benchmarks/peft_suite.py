"""Run HF PEFT's own tests against fastpeft: the same test files, once with real peft, once with fastpeft.

What it measures: how many of PEFT's tests (a ``-k`` subset, DoRA by default) pass with real peft and how
many pass when the test files' ``from peft import LoraConfig, get_peft_model, PeftModel, ...`` resolve to
fastpeft's classes and functions of those names. peft's internals (``peft.tuners...``, ``peft.utils...``)
stay peft's, so a test that checks for peft's own layer classes fails on fastpeft and is listed as such.

A test counts as passing on fastpeft only if it built a fastpeft ``PeftModel`` or called fastpeft's
``inject_adapter_in_model``, or (a test of the config alone) built a fastpeft config and no peft model or
tuner; one that passed otherwise is reported as failed ("did not exercise fastpeft"). The report also says
how many passing tests created a fastpeft DoRA magnitude vector.

How to run (nothing is downloaded; tests that need a Hub model fail or skip for both and are "not
runnable here")::

    # from the repo root; PEFT's tests at the installed version's tag (or the newest commit), outside the repo.
    # /tmp/peft-src: a git clone of huggingface/peft
    mkdir -p /tmp/peft-tests && V=$(python -c "import peft; print(peft.__version__)")
    git -C /tmp/peft-src archive v$V tests | tar -x -C /tmp/peft-tests
    pip install --target /tmp/peft-deps --no-deps diffusers scipy   # only imported by PEFT's test files
    PYTHONPATH=/tmp/peft-deps python -m benchmarks.peft_suite /tmp/peft-tests -k "dora or Dora or DoRA" \\
        --out /tmp/peft-suite

It runs pytest twice (``nice``, one process at a time, bounded by ``--timeout``), writes one JSON line per
test for each side under ``--out`` and prints the counts and the tests that pass on peft and fail on
fastpeft, grouped by their one-line reason. This module is also the pytest plugin the fastpeft run loads
(``-p benchmarks.peft_suite``); it does nothing unless ``FASTPEFT_PEFT_SUITE`` is set.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

import pytest

DEFAULT_FILES = (
    "test_custom_models.py",
    "test_decoder_models.py",
    "test_encoder_decoder_models.py",
    "test_lora_variants.py",
    "test_initialization.py",
    "test_torch_compile.py",
)
REPO = Path(__file__).resolve().parents[1]
_HITS = Counter()

# -- pytest plugin (the fastpeft side; FASTPEFT_PEFT_SUITE=fastpeft) and the per-test record (both sides) --


def _substitute() -> list[str]:
    """Point ``peft.<name>`` at fastpeft's object for every public name both provide; count their use."""
    import peft

    import fastpeft.peft as fp
    from fastpeft.nn import lora_dora
    from fastpeft.peft import model as fp_model

    swapped = []
    for name in fp.__all__:
        if hasattr(peft, name):
            setattr(peft, name, getattr(fp, name))
            swapped.append(name)

    init = fp_model.PeftModel.__init__

    def counted_init(self, *args, **kwargs):
        _HITS["peft_model"] += 1
        init(self, *args, **kwargs)

    fp_model.PeftModel.__init__ = counted_init

    inject = fp.inject_adapter_in_model

    def counted_inject(*args, **kwargs):
        _HITS["inject"] += 1
        return inject(*args, **kwargs)

    peft.inject_adapter_in_model = counted_inject

    magnitude_init = lora_dora.DoraMagnitude.__init__

    def counted_magnitude(self, *args, **kwargs):
        _HITS["dora"] += 1
        magnitude_init(self, *args, **kwargs)

    lora_dora.DoraMagnitude.__init__ = counted_magnitude

    from peft.peft_model import PeftModel as RealPeftModel
    from peft.tuners.tuners_utils import BaseTuner

    from fastpeft.peft.config import PeftConfigBase

    # a config's own __post_init__ (dataclasses make their own __init__; a check may raise before super())
    for cls in _subclasses(PeftConfigBase):
        if "__post_init__" in vars(cls):
            _count_call(cls, "__post_init__", "config")
    _count_call(RealPeftModel, "__init__", "real_peft")
    _count_call(BaseTuner, "__init__", "real_peft")
    return swapped


def _subclasses(cls: type) -> list[type]:
    return [cls, *(c for sub in cls.__subclasses__() for c in _subclasses(sub))]


def _count_call(cls: type, method: str, key: str) -> None:
    """Count calls of ``cls.<method>`` (subclasses reaching it through ``super()`` included) in ``_HITS[key]``."""
    original = getattr(cls, method)

    def counted(self, *args, **kwargs):
        _HITS[key] += 1
        return original(self, *args, **kwargs)

    setattr(cls, method, counted)


def pytest_configure(config):
    side = os.environ.get("FASTPEFT_PEFT_SUITE")
    if side == "fastpeft":
        swapped = _substitute()
        print(f"peft_suite: peft.{{{', '.join(swapped)}}} -> fastpeft", file=sys.stderr)


def _reason(report) -> str:
    crash = getattr(report.longrepr, "reprcrash", None)
    if crash is not None:
        return crash.message.strip().splitlines()[0][:200] if crash.message.strip() else "(no message)"
    if isinstance(report.longrepr, tuple):  # a skip: (file, line, reason)
        return str(report.longrepr[2])[:200]
    return str(report.longrepr).strip().splitlines()[-1][:200] if report.longrepr else ""


def _record(item, outcome: str, reason: str) -> None:
    path = os.environ.get("FASTPEFT_PEFT_SUITE_LOG")
    if path:
        row = {"nodeid": item.nodeid, "outcome": outcome, "reason": reason, **dict(_HITS)}
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")


def pytest_runtest_setup(item):
    _HITS.clear()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    side = os.environ.get("FASTPEFT_PEFT_SUITE")
    if not side:
        return
    config_only = _HITS["config"] and not _HITS["real_peft"]
    exercised = _HITS["peft_model"] or _HITS["inject"] or config_only
    if report.when == "call" and report.passed and side == "fastpeft" and not exercised:
        report.outcome = "failed"
        report.longrepr = "peft_suite: did not exercise fastpeft (no fastpeft PeftModel built)"
    if report.when == "call" or (report.when == "setup" and not report.passed):
        _record(item, report.outcome, "" if report.passed else _reason(report))


# -- the CLI: run both sides and compare --


def run_side(side: str, tests: Path, files: list[str], k: str, out: Path, timeout: int) -> Path:
    log = out / f"{side}.jsonl"
    log.unlink(missing_ok=True)
    env = dict(os.environ, FASTPEFT_PEFT_SUITE=side, FASTPEFT_PEFT_SUITE_LOG=str(log), HF_HUB_OFFLINE="1")
    env["CUDA_VISIBLE_DEVICES"] = ""
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    paths = [str(tests / "tests" / f) for f in files if (tests / "tests" / f).exists()]
    cmd = ["nice", "-n", "10", "timeout", str(timeout), sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    cmd += ["-p", "benchmarks.peft_suite", "-k", k, *paths]
    with open(out / f"{side}.log", "w") as f:
        subprocess.run(cmd, cwd=tests, env=env, stdout=f, stderr=subprocess.STDOUT, check=False)
    return log


def load(log: Path) -> dict[str, dict]:
    rows = {}
    if log.exists():
        for line in log.read_text().splitlines():
            row = json.loads(line)
            rows[row["nodeid"]] = row
    return rows


def summarize(peft_rows: dict[str, dict], fast_rows: dict[str, dict]) -> str:
    lines = ["| run | collected | passed | failed | skipped |", "|---|---|---|---|---|"]
    for side, rows in (("peft", peft_rows), ("fastpeft", fast_rows)):
        c = Counter(r["outcome"] for r in rows.values())
        lines.append(f"| {side} | {len(rows)} | {c['passed']} | {c['failed']} | {c['skipped']} |")
    dora = sum(1 for r in fast_rows.values() if r["outcome"] == "passed" and r.get("dora"))
    lines.append(f"\nfastpeft passes that built a fastpeft DoRA magnitude: {dora}")
    groups = defaultdict(list)
    for nodeid, row in peft_rows.items():
        other = fast_rows.get(nodeid)
        if row["outcome"] == "passed" and (other is None or other["outcome"] != "passed"):
            groups[other["reason"] if other else "not run on fastpeft"].append(nodeid)
    lines.append(f"\npass on peft, fail on fastpeft: {sum(len(v) for v in groups.values())}")
    for reason, ids in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        lines.append(f"\n{len(ids)} x {reason}")
        lines += [f"    {i}" for i in ids]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("peft_checkout", type=Path, help="a folder holding PEFT's tests/ (a checkout or archive)")
    parser.add_argument("-k", default="dora or Dora or DoRA", help="pytest -k selection")
    parser.add_argument("--files", nargs="+", default=list(DEFAULT_FILES), help="test files under tests/")
    parser.add_argument("--out", type=Path, default=Path("/tmp/peft-suite"))
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per side")
    parser.add_argument(
        "--side",
        choices=("both", "peft", "fastpeft", "none"),
        default="both",
        help="which runs to do; 'none' only compares the logs already under --out",
    )
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for side in ("peft", "fastpeft"):
        if args.side in ("both", side):
            run_side(side, args.peft_checkout, args.files, args.k, args.out, args.timeout)
    print(summarize(load(args.out / "peft.jsonl"), load(args.out / "fastpeft.jsonl")))


if __name__ == "__main__":
    main()

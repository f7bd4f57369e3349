"""Every GPU-only check and figure in one command: the CUDA tests and issue 7's step benchmarks.

Run on a GPU machine from the repository root: `python benchmarks/gpu_suite.py --out results/`
(within `--budget`, 9 minutes by default; not yet timed on a GPU). It needs torch with CUDA,
numpy, pydantic, einops, PyYAML, pytest and pytest-timeout (checked in a venv of only these),
not Ray or MLflow. Each item runs in its own process under its own time limit, most
important first, so a short lease still brings back the main figures:

1. `step_reference_b8`: issue 7's anchor (2 x 8x224 + 8 x 8x96 views, 8 clips): target at
   least 3x the naive step;
2. `step_paper_b32`: the paper's views at 32 clips, fast path only: target within 80 GB; its
   clips/s feeds `cost_table.md` (benchmarks/cost_table.py);
3. `cuda_tests`: the bf16 fast step against the fp16 naive step, and the compiled blocks
   against eager without recompiling (`tests/test_fast_path.py -k gpu`);
4. `step_paper_b8`: the paper's views at 8 clips, fast against naive.

Writes to --out: `suite.log` (everything printed), one JSON per step benchmark,
`summary.md` (the table for docs/performance.md, with each target's verdict) and
`cost_table.md`. `--smoke` runs the same items on CPU with the tiny preset, so the driver
itself is tested without a GPU.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import cost_table  # noqa: E402

ANCHOR_CLIPS_PER_S = 26.5  # the reference code on one H100, issue 7
# "Fits in 80 GB": an 80 GB H100 shows 81,559 MiB (79.6 GiB), less its CUDA context; the
# peak the allocator reserved (its cache included) must stay under that.
MEMORY_TARGET_GIB = 79.0


def items(smoke: bool) -> list[tuple[str, list[str], int]]:
    """(name, arguments after `python`, time limit in seconds), most important first."""
    if smoke:  # the same items on CPU, tiny preset, one step each
        common = ["--preset", "tiny", "--device", "cpu", "--steps", "1", "--warmup", "1"]
        anchor = paper_b32 = paper_b8 = ["--batch", "2"]
    else:
        common = ["--preset", "paper"]
        anchor = ["--view-set", "reference", "--batch", "8"]
        paper_b32, paper_b8 = ["--batch", "32"], ["--batch", "8"]
    step = ["benchmarks/step.py", *common]
    tests = ["-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_fast_path.py"]
    return [
        ("step_reference_b8", [*step, *anchor], 300),
        ("step_paper_b32", [*step, *paper_b32, "--skip-naive"], 240),
        ("cuda_tests", [*tests, "-k", "gpu"], 180),
        ("step_paper_b8", [*step, *paper_b8], 240),
    ]


def run_item(name: str, arguments: list[str], limit: int, out: Path, log) -> tuple[str, float]:
    """Run one item, its output into the log as it comes; returns (outcome, seconds)."""
    command = [sys.executable, *arguments]
    if name.startswith("step_"):
        command += ["--json", str(out / f"{name}.json")]  # main() removed an earlier run's
    log.write(f"\n== {name}: {' '.join(command[1:])}\n")
    log.flush()
    started = time.perf_counter()
    try:
        done = subprocess.run(
            command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, timeout=limit, check=False
        )
        outcome = "ok" if done.returncode == 0 else f"exit {done.returncode}"
    except subprocess.TimeoutExpired:
        outcome = f"timed out after {limit} s"
    seconds = time.perf_counter() - started
    log.write(f"== {name}: {outcome} in {seconds:.0f} s\n")
    log.flush()
    return outcome, seconds


def summarise(out: Path, outcomes: dict[str, tuple[str, float]]) -> str:
    lines = [
        "| item | outcome | s | device | naive clips/s | fast clips/s | speed-up | MFU (fast) "
        "| peak GiB (naive / fast) | target |",
        "|" + "---|" * 10,
    ]
    for name, (outcome, seconds) in outcomes.items():
        report_path = out / f"{name}.json"
        if not name.startswith("step_") or not report_path.exists():
            lines.append(f"| {name} | {outcome} | {seconds:.0f} |" + " |" * 7)
            continue
        report = json.loads(report_path.read_text())
        paths = {p["path"]: p for p in report["paths"]}
        naive, fast = paths.get("naive", {}), paths.get("fast", {})

        def rate(path: dict) -> str:
            return f"{path['clips_per_s']:.1f}" if "clips_per_s" in path else path.get("error", "-")

        def peak(path: dict) -> str:
            return f"{path['peak_gib']:.1f}" if "peak_gib" in path else "-"

        mfu = fast.get("mfu")
        speedup = report.get("speedup")
        if name == "step_reference_b8":
            met = speedup is not None and speedup >= 3
            target = f"fast >= 3x naive: {'met' if met else 'not met'}"
            if "clips_per_s" in fast:
                target += f"; {fast['clips_per_s'] / ANCHOR_CLIPS_PER_S:.2f}x the reference code's H100 26.5"
        elif name == "step_paper_b32":
            held = fast.get("peak_reserved_gib") or fast.get("peak_gib")  # CPU: the RSS rise
            fits = held is not None and held <= MEMORY_TARGET_GIB
            shown = f"{held:.1f} GiB reserved" if held is not None else "no peak"
            target = (
                f"fits in an 80 GB card ({shown}, <= {MEMORY_TARGET_GIB:g}): "
                f"{'yes' if fits else 'no'}"
            )
        else:
            target = "-"
        lines.append(
            f"| {name} | {outcome} | {seconds:.0f} | {report['device']} | {rate(naive)} "
            f"| {rate(fast)} | {f'{speedup:.2f}x' if speedup else '-'} "
            f"| {f'{100 * mfu:.1f}%' if mfu is not None else 'n/a'} | {peak(naive)} / {peak(fast)} "
            f"| {target} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the results")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny preset: test the driver")
    parser.add_argument("--only", nargs="+", default=None, help="run only these items")
    parser.add_argument(
        "--budget",
        type=float,
        default=540,
        help="seconds for the whole suite: each item's limit is cut to what is left, and items "
        "that would get under 30 s are skipped",
    )
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    plan = [item for item in items(args.smoke) if args.only is None or item[0] in args.only]
    if not plan:
        raise SystemExit(
            f"--only: none of {args.only} is an item; items: "
            f"{', '.join(name for name, _, _ in items(args.smoke))}"
        )
    if not args.smoke:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run this on a GPU machine, or --smoke on CPU")
    outcomes = {}
    for name, _, _ in plan:  # an item this run skips shows no figures of an earlier run
        (args.out / f"{name}.json").unlink(missing_ok=True)
    deadline = time.perf_counter() + args.budget
    with open(args.out / "suite.log", "a") as log:
        for name, arguments, limit in plan:
            left = deadline - time.perf_counter()
            if left < 30:
                outcomes[name] = (f"not run: --budget {args.budget:.0f} s spent", 0.0)
            else:
                print(f"{name} ...", flush=True)
                outcomes[name] = run_item(name, arguments, int(min(limit, left)), args.out, log)
                print(f"{name}: {outcomes[name][0]} in {outcomes[name][1]:.0f} s", flush=True)
            # after every item, so a lease that ends mid-suite still brings back a summary
            summary = summarise(args.out, outcomes)
            (args.out / "summary.md").write_text(summary)
    print("\n" + summary)
    b32 = args.out / "step_paper_b32.json"
    if b32.exists() and "step_paper_b32" in outcomes:
        try:
            rate, description = cost_table.rate_from_step_json(b32)
        except SystemExit as error:  # the fast path failed (e.g. out of memory)
            print(f"no cost table: {error}")
        else:
            table = cost_table.report(rate, description)
            (args.out / "cost_table.md").write_text(table)
            print(table)
    return 0 if all(outcome == "ok" for outcome, _ in outcomes.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""Time and cost of SVT pretraining on a cluster, from measured step and loader throughput.

Run: `python benchmarks/cost_table.py --step-json step_paper_b32.json --usd-per-gpu-hour 4.0`
where the JSON is what `python benchmarks/step.py --preset paper --batch 32 --json FILE` wrote
on the GPU you mean to rent (its fast path's clips/s is the rate per GPU), or
`--clips-per-s 26.5 --device "H100 (reference code)"` for a figure measured elsewhere.

For each dataset and GPU count it prints the wall-clock hours, the GPU-hours, the cost at the
given price and the CPU cores each GPU needs for decoding (the GPU's clips/s over the loader's
clips per CPU-second, `python benchmarks/loader.py`), so the instance type can be chosen:

    hours = clips x epochs / (clips/s per GPU x GPUs x scaling efficiency) / 3600

with the scaling efficiency applied on more than 1 GPU only (1 GPU: clips/s per GPU as it is).
The scaling efficiency is an input, not a measurement: data-parallel SVT all-reduces the
student's 144 M fp32 gradients (0.58 GB) every step, which NVLink inside one 8-GPU node hides
behind the backward pass far better than a network between nodes; measure it with
`svt-ray pretrain --workers N` on your cluster and pass what you get. Evaluation, checkpoints and start-up are
not counted.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

# Training clips of the usual pretraining sets (train split; SVT pretrains on Kinetics-400).
DATASETS = {
    "Kinetics-400": 240_000,
    "Something-Something v2": 168_913,
    "UCF-101 (split 1)": 9_537,
}
# Paper view set from 15 fps shards, one process, `python benchmarks/loader.py` on the 2-core
# development VM: 0.080 CPU s a clip (docs/data.md's loader table).
LOADER_CLIPS_PER_CPU_SECOND = 12.5


@dataclass(frozen=True)
class Estimate:
    dataset: str
    epochs: int
    gpus: int
    wall_hours: float
    gpu_hours: float
    usd: float | None
    decode_cores_per_gpu: float


def estimate(
    clips: int,
    epochs: int,
    gpus: int,
    clips_per_s_per_gpu: float,
    *,
    dataset: str = "",
    efficiency: float = 1.0,
    usd_per_gpu_hour: float | None = None,
    loader_clips_per_cpu_second: float = LOADER_CLIPS_PER_CPU_SECOND,
) -> Estimate:
    """One row of the table: `efficiency` scales the per-GPU rate when gpus > 1."""
    if clips_per_s_per_gpu <= 0 or gpus < 1 or not 0 < efficiency <= 1:
        raise ValueError("need clips/s > 0, gpus >= 1 and 0 < efficiency <= 1")
    rate = clips_per_s_per_gpu * gpus * (efficiency if gpus > 1 else 1.0)
    wall_hours = clips * epochs / rate / 3600
    gpu_hours = wall_hours * gpus
    return Estimate(
        dataset=dataset,
        epochs=epochs,
        gpus=gpus,
        wall_hours=wall_hours,
        gpu_hours=gpu_hours,
        usd=None if usd_per_gpu_hour is None else gpu_hours * usd_per_gpu_hour,
        decode_cores_per_gpu=rate / gpus / loader_clips_per_cpu_second,
    )


def rate_from_step_json(path: Path) -> tuple[float, str]:
    """(fast-path clips/s, description) from a `benchmarks/step.py --json` file."""
    try:
        report = json.loads(path.read_text())
        fast = next(p for p in report["paths"] if p["path"] == "fast")
        rate = float(fast["clips_per_s"])
    except (OSError, ValueError, KeyError, StopIteration) as error:
        raise SystemExit(
            f"{path}: not a benchmarks/step.py --json report with a measured fast path "
            f"({error!r}); "
            "run `python benchmarks/step.py --preset paper --batch 32 --json FILE` on the GPU"
        ) from error
    if not str(report.get("device", "")).lower().startswith(("nvidia", "cuda")):
        print(f"note: {path} was measured on {report.get('device')!r}, not a GPU", file=sys.stderr)
    description = (
        f"{report['device']}, preset {report['preset']}, view set {report['view_set']}, "
        f"batch {report['batch']} per GPU"
    )
    return rate, description


def format_table(rows: list[Estimate]) -> str:
    with_cost = any(row.usd is not None for row in rows)
    header = ["dataset", "epochs", "GPUs", "wall hours", "GPU-hours"]
    header += ["cost (USD)"] if with_cost else []
    header += ["decode CPU cores per GPU"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row.dataset, str(row.epochs), str(row.gpus)]
        cells += [f"{row.wall_hours:.1f}", f"{row.gpu_hours:.0f}"]
        cells += [f"{row.usd:,.0f}"] if with_cost else []
        cells += [f"{row.decode_cores_per_gpu:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(
    rate: float,
    description: str,
    *,
    epochs: Sequence[int] = (20,),
    gpus: Sequence[int] = (1, 8, 32),
    efficiency: float = 0.9,
    usd_per_gpu_hour: float | None = None,
    loader_clips_per_cpu_second: float = LOADER_CLIPS_PER_CPU_SECOND,
) -> str:
    """The printed estimate: what it assumes, then a row per dataset, epoch count and GPU count."""
    rows = [
        estimate(
            clips,
            count,
            gpu_count,
            rate,
            dataset=name,
            efficiency=efficiency,
            usd_per_gpu_hour=usd_per_gpu_hour,
            loader_clips_per_cpu_second=loader_clips_per_cpu_second,
        )
        for name, clips in DATASETS.items()
        for count in epochs
        for gpu_count in gpus
    ]
    return (
        f"{rate:.1f} clips/s per GPU: {description}\n"
        f"scaling efficiency beyond 1 GPU {efficiency:g} (assumed); "
        f"decode {loader_clips_per_cpu_second:g} clips per CPU-second\n\n"
        f"{format_table(rows)}\n"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--step-json", type=Path, help="a benchmarks/step.py --json report")
    source.add_argument("--clips-per-s", type=float, help="clips/s per GPU measured elsewhere")
    parser.add_argument("--device", default="GPU", help="what --clips-per-s was measured on")
    parser.add_argument("--epochs", type=int, nargs="+", default=[20])
    parser.add_argument("--gpus", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument(
        "--efficiency", type=float, default=0.9, help="multi-GPU scaling efficiency (assumed)"
    )
    parser.add_argument(
        "--usd-per-gpu-hour",
        type=float,
        default=None,
        help="your price per GPU-hour (on-demand, spot or reserved); no cost column without it",
    )
    parser.add_argument(
        "--loader-clips-per-cpu-s",
        type=float,
        default=LOADER_CLIPS_PER_CPU_SECOND,
        help="paper views per CPU-second from benchmarks/loader.py on your CPUs",
    )
    args = parser.parse_args(argv)
    if args.step_json:
        rate, description = rate_from_step_json(args.step_json)
    else:
        rate, description = args.clips_per_s, args.device
    print(
        report(
            rate,
            description,
            epochs=args.epochs,
            gpus=args.gpus,
            efficiency=args.efficiency,
            usd_per_gpu_hour=args.usd_per_gpu_hour,
            loader_clips_per_cpu_second=args.loader_clips_per_cpu_s,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

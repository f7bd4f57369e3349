"""Training-step benchmark: SVT clips/s, TFLOP/s, MFU and peak memory, fast path vs naive.

Run: `python benchmarks/step.py --preset tiny` (CPU, about 2 minutes on 2 cores) or
`python benchmarks/step.py --preset paper --view-set reference --batch 8` (GPU; issue 7's
anchor: 2 globals 8x224 + 8 locals 8x96).

Both paths train the same architecture on the same uint8 batch, in the same run:
- naive: the reference code's step (kahnchana/svt `train_ssl.py`, DINO `train_one_epoch`):
  eager, explicit-softmax attention, one backbone call per view, fp16 autocast + GradScaler on
  GPU (fp32 on CPU), DINO's per-parameter gradient clipping loop, for-loop AdamW, a
  per-parameter Python EMA loop, the loss as log-softmax + einsum;
- fast: `svt_ray.engine.train_step` with the fast-path options: SDPA, views batched per frame
  size (`model.view_batching=resolution`), the fused loss, foreach clipping and EMA, bf16
  autocast, fused AdamW and `torch.compile` per block on GPU (off on CPU by default).

Timing: warm-up steps (compilation included) are excluded; each step is timed on its own
with `torch.cuda.synchronize()` around it and the median is reported. On CPU the two paths
alternate in short rounds so that load from other processes hits both alike. FLOPs are
counted once, outside timing, with `torch.utils.flop_counter.FlopCounterMode` on an eager
explicit-attention copy (student forward + backward, teacher forward, loss; the augmentation
is not counted). Peak memory: `torch.cuda.max_memory_allocated` over a path's steps on GPU
(paths run one after the other, the other path's state freed); on CPU the largest rise of the
resident set over the built state during a path's first two steps, each path in a fresh
process (RSS sampled every 2 ms).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from svt_ray.config import ExperimentConfig, load_config  # noqa: E402
from svt_ray.engine import (  # noqa: E402
    TrainState,
    apply_schedule,
    autocast_dtype_for,
    build_state,
    compile_enabled,
    parameter_groups,
    to_device_views,
    train_step,
)
from svt_ray.views import view_slots  # noqa: E402

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity), matched against the device name in order.
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100", 989.4),  # SXM / HBM3
    ("H200", 989.4),
    ("GH200", 989.4),
    ("A100", 312.0),
)

VIEW_SETS = {
    "preset": [],
    # The paper (svt_spec §2.1): globals 8 and 16 frames at 224, locals 2,2,4,4,8,8,16,16 at 96.
    "paper": [
        "views.num_global=2",
        "views.global_frames=[8,16]",
        "views.global_size=224",
        "views.num_local=8",
        "views.local_frames=[2,4,8,16]",
        "views.local_size=96",
        "views.clip_frames=128",
        "data.short_side=256",
    ],
    # The reference code's default (issue 7's anchor): every view 8 frames.
    "reference": [
        "views.num_global=2",
        "views.global_frames=[8]",
        "views.global_size=224",
        "views.num_local=8",
        "views.local_frames=[8]",
        "views.local_size=96",
        "views.clip_frames=128",
        "data.short_side=256",
    ],
}

FAST_OPTIONS = {
    "model": {"attention": "sdpa", "view_batching": "resolution"},
    "train": {"precision": "auto"},  # bf16 autocast on GPU (the tiny preset records fp32)
}
NAIVE_OPTIONS = {
    "model": {"attention": "naive", "view_batching": "view", "activation_checkpointing": False},
    # The naive step sets up its own fp16 autocast + GradScaler on GPU.
    "train": {"compile": False, "precision": "fp32"},
}


# -- the naive path: the reference implementation's step ------------------------------------


@dataclass
class NaivePath:
    state: TrainState
    scaler: torch.amp.GradScaler | None  # fp16 loss scaling on GPU, as the reference


def build_naive(config: ExperimentConfig, device: torch.device) -> NaivePath:
    """The reference-style step's state: `config` with the naive options, for-loop AdamW."""
    naive_config = with_options(config, NAIVE_OPTIONS)
    state = build_state(naive_config, device)
    state.optimizer = torch.optim.AdamW(
        parameter_groups(state.student),
        lr=naive_config.derived.lr,
        betas=naive_config.optim.betas,
        foreach=False,
        fused=False,
    )
    state.loss.fused = False
    scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" else None
    return NaivePath(state, scaler)


def naive_step(
    path: NaivePath, batch: list[torch.Tensor], step: int, generator: torch.Generator
) -> dict[str, float]:
    """One step as the reference code takes it (DINO's `train_one_epoch`), same schedules."""
    state, scaler = path.state, path.scaler
    values = apply_schedule(state, step)
    views = state.augmenter(to_device_views(batch, state.device), generator)
    num_global = state.config.views.num_global
    autocast = (
        torch.autocast("cuda", dtype=torch.float16)
        if scaler is not None
        else contextlib.nullcontext()
    )
    state.student.train()
    with autocast:
        student_out = state.student(views)  # view_batching=view: one backbone call per view
        with torch.no_grad():
            teacher_out = state.teacher(views[:num_global])
        loss = state.loss(
            student_out.logits,
            teacher_out.logits,
            values.teacher_temp,
            student_out.features[:num_global],  # the same terms as the fast path (KoLeo)
        )["loss"]
    if not math.isfinite(loss.item()):
        raise FloatingPointError(f"naive path: loss is {loss.item()} at step {step}")

    state.optimizer.zero_grad(set_to_none=True)
    student = state.student_module
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(state.optimizer)
    else:
        loss.backward()
    clip = state.config.optim.clip_grad
    for parameter in student.parameters():  # DINO's clip_gradients: a tensor at a time
        if parameter.grad is not None and clip > 0:
            clip_coef = clip / (parameter.grad.norm(2) + 1e-6)
            if clip_coef < 1:
                parameter.grad.mul_(clip_coef)
    if values.freeze_last_layer:
        for parameter in student.head.last_layer.parameters():
            parameter.grad = None
    if scaler is not None:
        scaler.step(state.optimizer)
        scaler.update()
    else:
        state.optimizer.step()
    with torch.no_grad():  # the reference's EMA: one parameter at a time
        m = values.momentum
        for param_q, param_k in zip(student.parameters(), state.teacher.parameters(), strict=True):
            param_k.mul_(m).add_((1 - m) * param_q.detach())
    state.loss.update_center(teacher_out.logits)
    return {"loss": loss.item()}


# -- the fast path ---------------------------------------------------------------------------


def build_fast(
    config: ExperimentConfig, device: torch.device, compile_blocks: bool | None, checkpointing: bool
) -> TrainState:
    fast = with_options(config, FAST_OPTIONS)
    fast = with_options(fast, {"model": {"activation_checkpointing": checkpointing}})
    if compile_blocks is not None:
        fast = with_options(fast, {"train": {"compile": compile_blocks}})
    return build_state(fast, device)


# -- measurement helpers ---------------------------------------------------------------------


def with_options(config: ExperimentConfig, options: dict[str, dict]) -> ExperimentConfig:
    """`config` with some fields of some sections replaced, validated again (derived kept)."""
    tree = config.model_dump()
    for section, values in options.items():
        tree[section].update(values)
    return ExperimentConfig.model_validate(tree)


def make_config(preset: str, view_set: str, batch: int | None) -> ExperimentConfig:
    """The preset with a view set and batch, resolved past lr warm-up and the frozen last layer."""
    overrides = [*VIEW_SETS[view_set], "optim.warmup_epochs=0", "optim.freeze_last_layer_epochs=0"]
    if batch is not None:
        overrides.append(f"optim.batch_size={batch}")
    config = load_config(preset, overrides=overrides)
    return config.resolve(config.optim.batch_size * 1000)


def random_batch(config: ExperimentConfig, batch: int, device: torch.device) -> list[torch.Tensor]:
    """uint8 (b, 3, t, s, s) per view slot; pinned on GPU, as a loader with pin_memory delivers."""
    generator = torch.Generator().manual_seed(0)
    views = [
        torch.randint(0, 256, (batch, *slot.shape), dtype=torch.uint8, generator=generator)
        for slot in view_slots(config.views)
    ]
    return [view.pin_memory() for view in views] if device.type == "cuda" else views


def count_flops(config: ExperimentConfig, batch: list[torch.Tensor], device: torch.device) -> int:
    """Model FLOPs of one step: student forward + backward, teacher forward, loss.

    Counted on an eager copy with explicit attention, since FlopCounterMode has no formula for
    CPU flash attention and does not look inside compiled graphs; on one clip, times the
    batch (the count is linear in it, `tests/test_benchmarks.py`): the whole batch of the
    paper preset at 32 clips, eager and in fp32, needs over 200 GiB.
    """
    clips = len(batch[0])
    batch = [view[:1] for view in batch]
    state = build_state(with_options(config, NAIVE_OPTIONS), device)
    views = state.augmenter(to_device_views(batch, device), torch.Generator(), augment=False)
    num_global = config.views.num_global
    with FlopCounterMode(display=False) as counter:
        student_out = state.student(views)
        with torch.no_grad():
            teacher_out = state.teacher(views[:num_global])
        state.loss(student_out.logits, teacher_out.logits, 0.04)["loss"].backward()
    return counter.get_total_flops() * clips


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class RssSampler:
    """Largest resident set seen while active, sampled every 2 ms from /proc/self/statm."""

    def __init__(self) -> None:
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def rss(self) -> int:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * self.page

    def __enter__(self) -> RssSampler:
        self.peak = self.rss()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self.rss())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())


@dataclass
class PathResult:
    name: str
    settings: str
    step_seconds: list[float] = field(default_factory=list)
    peak_bytes: int = 0  # torch.cuda.max_memory_allocated (CPU: the RSS rise)
    peak_reserved_bytes: int = 0  # torch.cuda.max_memory_reserved: the allocator's cache too
    error: str | None = None

    def median(self) -> float:
        return statistics.median(self.step_seconds)


class Runner:
    """Runs one path's steps: timing with device syncs, and peak-memory tracking."""

    def __init__(self, name: str, settings: str, step_fn, batch, device: torch.device):
        self.result = PathResult(name, settings)
        self.step_fn, self.batch, self.device = step_fn, batch, device
        self.step = 0

    def run(self, steps: int, timed: bool) -> None:
        for _ in range(steps):
            generator = torch.Generator().manual_seed(self.step)
            synchronize(self.device)
            started = time.perf_counter()
            self.step_fn(self.batch, self.step, generator)
            synchronize(self.device)
            elapsed = time.perf_counter() - started
            if self.device.type == "cuda":
                self.result.peak_bytes = max(
                    self.result.peak_bytes, torch.cuda.max_memory_allocated(self.device)
                )
                self.result.peak_reserved_bytes = max(  # what the card must hold: + the cache
                    self.result.peak_reserved_bytes, torch.cuda.max_memory_reserved(self.device)
                )
            if timed:
                self.result.step_seconds.append(elapsed)
            self.step += 1


def probe_cpu_memory(argv: list[str], name: str) -> int:
    """Peak RSS rise of `name`'s first two steps over its built state, in a fresh process.

    A fresh process per path: freed memory stays in the allocator's arenas, so a path measured
    after another in one process would reuse that path's pages and look smaller.
    """
    command = [sys.executable, str(Path(__file__).resolve()), *argv, "--memory-probe", name]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return int(output.strip().splitlines()[-1])


def run_memory_probe(runner: Runner) -> None:
    with RssSampler() as sampler:
        before = sampler.rss()
        runner.run(2, timed=False)
    print(sampler.peak - before)


def device_description(device: torch.device) -> tuple[str, float | None]:
    """(name, dense bf16 peak TFLOP/s or None)."""
    if device.type != "cuda":
        return (
            f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
            None,
        )
    name = torch.cuda.get_device_name(device)
    peak = next((value for key, value in PEAK_BF16_TFLOPS if key in name), None)
    return name, peak


def describe_views(config: ExperimentConfig) -> str:
    v = config.views
    return (
        f"{v.num_global} global {'/'.join(map(str, v.global_frame_counts()))} frames x "
        f"{v.global_size}px + {v.num_local} local "
        f"{'/'.join(map(str, v.local_frame_counts())) or '-'} frames x {v.local_size}px"
    )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="tiny", choices=["tiny", "paper", "reference_code"])
    parser.add_argument(
        "--view-set",
        default="preset",
        choices=sorted(VIEW_SETS),
        help="preset = the preset's own views; paper = 8/16x224 + 2..16x96; "
        "reference = all views 8 frames (2 x 224 + 8 x 96)",
    )
    parser.add_argument("--batch", type=int, default=None, help="clips per step (default: preset)")
    parser.add_argument(
        "--steps", type=int, default=None, help="timed steps per path (default 8 on CPU, 20 on GPU)"
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="untimed steps per path (default 1 on CPU, 5 on GPU)",
    )
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile the fast path's blocks (default: on for GPU only)",
    )
    parser.add_argument(
        "--checkpointing", action="store_true", help="activation checkpointing in the fast path"
    )
    parser.add_argument(
        "--skip-naive",
        action="store_true",
        help="measure only the fast path (e.g. a batch the baseline cannot fit)",
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--memory-probe", choices=["naive", "fast"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv

    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    steps = args.steps or (20 if on_gpu else 8)
    warmup = args.warmup if args.warmup is not None else (5 if on_gpu else 1)

    config = make_config(args.preset, args.view_set, args.batch)
    batch_size = config.optim.batch_size
    batch = random_batch(config, batch_size, device)
    device_name, peak_tflops = device_description(device)

    compiled = compile_enabled(config, device) if args.compile is None else args.compile
    dtype = autocast_dtype_for(with_options(config, FAST_OPTIONS), device)
    precision = f"{str(dtype).removeprefix('torch.')} autocast" if dtype else "fp32"
    fast_settings = (
        f"SDPA, views batched per frame size, fused loss, foreach clip+EMA, {precision}"
        + (", fused AdamW" if on_gpu else "")
        + (", torch.compile per block" if compiled else ", eager")
        + (", activation checkpointing" if args.checkpointing else "")
    )
    naive_settings = (
        "eager, explicit softmax, one call per view, "
        + ("fp16 autocast + GradScaler" if on_gpu else "fp32")
        + ", per-parameter clip/EMA loops, for-loop AdamW, log-softmax loss"
    )

    def make_naive() -> Runner:
        path = build_naive(config, device)
        return Runner(
            "naive", naive_settings, lambda b, s, g: naive_step(path, b, s, g), batch, device
        )

    def make_fast() -> Runner:
        state = build_fast(config, device, args.compile, args.checkpointing)
        return Runner(
            "fast", fast_settings, lambda b, s, g: train_step(state, b, s, g), batch, device
        )

    if args.memory_probe:
        run_memory_probe(make_naive() if args.memory_probe == "naive" else make_fast())
        return {}
    flops = count_flops(config, batch, device)
    factories = ([] if args.skip_naive else [("naive", naive_settings, make_naive)]) + [
        ("fast", fast_settings, make_fast)
    ]
    results: list[PathResult] = []
    if on_gpu:  # one path at a time, so each peak holds only its own state
        for name, settings, factory in factories:
            runner = None
            try:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
                runner = factory()
                runner.run(warmup, timed=False)
                runner.run(steps, timed=True)
                results.append(runner.result)
            except torch.OutOfMemoryError as error:
                results.append(PathResult(name, settings, error=f"out of memory ({error})"[:80]))
            finally:  # an out-of-memory path's state too: the next path's peak is its own
                runner = None
                gc.collect()
                torch.cuda.empty_cache()
    else:  # alternate in short rounds: other processes' load hits both paths alike
        runners = [factory() for _, _, factory in factories]
        for runner in runners:
            runner.run(warmup, timed=False)
        done = 0
        while done < steps:  # rounds of 2 steps, the last one shorter for an odd --steps
            for runner in runners:
                runner.run(min(2, steps - done), timed=True)
            done += min(2, steps - done)
        results = [runner.result for runner in runners]
        del runners
        for result in results:
            result.peak_bytes = probe_cpu_memory(argv, result.name)

    report = print_report(args, config, device_name, peak_tflops, flops, results, compiled)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return report


def print_report(args, config, device_name, peak_tflops, flops, results, compiled) -> dict:
    batch = config.optim.batch_size
    m = config.model
    print(
        f"SVT training step | preset {args.preset} (depth {m.depth}, width {m.embed_dim}, "
        f"head {m.head_out_dim}) | {describe_views(config)} | batch {batch} | {device_name}"
    )
    print(
        f"model FLOPs per step {flops / 1e12:.3f} TFLOP = {flops / batch / 1e12:.4f} TFLOP per "
        "clip (FlopCounterMode: student fwd+bwd, teacher fwd, loss)"
    )
    header = f"{'path':<6} {'clips/s':>9} {'step ms (median, min)':>22} {'TFLOP/s':>8} {'MFU':>6} {'peak mem':>10}  settings"
    print(header)
    print("-" * len(header))
    rows = []
    for result in results:
        if result.error or not result.step_seconds:
            print(f"{result.name:<6} {result.error or 'no steps'}")
            rows.append({"path": result.name, "error": result.error})
            continue
        median = result.median()
        tflops = flops / median / 1e12
        mfu = f"{100 * tflops / peak_tflops:.1f}%" if peak_tflops else "n/a"
        memory = "RSS+" if not device_name or device_name.startswith("CPU") else ""
        print(
            f"{result.name:<6} {batch / median:>9.2f} "
            f"{1e3 * median:>12.0f}, {1e3 * min(result.step_seconds):>7.0f} "
            f"{tflops:>8.3f} {mfu:>6} {memory}{result.peak_bytes / 2**30:>6.2f} GiB  {result.settings}"
        )
        rows.append(
            {
                "path": result.name,
                "clips_per_s": batch / median,
                "step_ms_median": 1e3 * median,
                "step_ms_min": 1e3 * min(result.step_seconds),
                "tflops": tflops,
                "mfu": None if peak_tflops is None else tflops / peak_tflops,
                "peak_gib": result.peak_bytes / 2**30,
                "peak_reserved_gib": result.peak_reserved_bytes / 2**30,
                "steps": len(result.step_seconds),
                "settings": result.settings,
            }
        )
    by_name = {row["path"]: row for row in rows if "clips_per_s" in row}
    speedup = None
    if "naive" in by_name and "fast" in by_name:
        speedup = by_name["fast"]["clips_per_s"] / by_name["naive"]["clips_per_s"]
        print(f"speed-up fast / naive: {speedup:.2f}x")
    return {
        "preset": args.preset,
        "view_set": args.view_set,
        "views": describe_views(config),
        "batch": batch,
        "device": device_name,
        "peak_bf16_tflops": peak_tflops,
        "flops_per_step": flops,
        "compiled": compiled,
        "checkpointing": args.checkpointing,
        "paths": rows,
        "speedup": speedup,
    }


if __name__ == "__main__":
    main()

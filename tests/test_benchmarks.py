"""The benchmarks run end to end in their smallest form.

They are not timed here (speed targets live in the benchmarks' own printed ratios); these tests
only keep them runnable, so a session that is lent a GPU for fifteen minutes does not spend
them on a benchmark that broke on CPU long ago. The loader benchmark once died at its last
stage because an earlier stage left a Ray instance running.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # benchmarks/ is not installed
from benchmarks import cost_table  # noqa: E402


def test_gpu_suite_runs_its_items_in_smoke_mode(tmp_path):
    """The GPU suite's driver on CPU (tiny preset): the chosen items run, the step reports hold
    both paths, the summary judges the targets and the cost table uses the batch-32 rate."""
    command = [sys.executable, "benchmarks/gpu_suite.py", "--smoke", "--out", str(tmp_path)]
    command += ["--only", "step_reference_b8", "step_paper_b32", "cuda_tests"]  # b8: the same path
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "step_reference_b8.json").read_text())
    assert report["batch"] == 2 and report["flops_per_step"] > 0
    paths = {path["path"]: path for path in report["paths"]}
    naive, fast = (paths[name]["clips_per_s"] for name in ("naive", "fast"))
    assert naive > 0 and fast > 0
    assert all(path["peak_gib"] > 0 and path["steps"] == 1 for path in paths.values())
    assert report["speedup"] == pytest.approx(fast / naive, rel=1e-6)
    b32 = json.loads((tmp_path / "step_paper_b32.json").read_text())
    assert [path["path"] for path in b32["paths"]] == ["fast"]  # --skip-naive

    summary = (tmp_path / "summary.md").read_text()
    for name in ("step_reference_b8", "step_paper_b32", "cuda_tests"):
        assert f"| {name} | ok |" in summary
    assert "step_paper_b8" not in summary
    assert f"{report['speedup']:.2f}x" in summary and "fast >= 3x naive: not met" in summary
    assert "fits in an 80 GB card (" in summary and "<= 79): yes" in summary
    rate = b32["paths"][0]["clips_per_s"]
    hours = 240_000 * 20 / rate / 3600
    assert f"| Kinetics-400 | 20 | 1 | {hours:.1f} |" in (tmp_path / "cost_table.md").read_text()
    assert "== cuda_tests: ok" in (tmp_path / "suite.log").read_text()


def test_gpu_suite_skips_what_its_budget_cannot_hold(tmp_path, capsys):
    """An item it skips shows no figures, not an earlier run's left in the folder."""
    from benchmarks import gpu_suite

    earlier = {"device": "H200", "paths": [{"path": "fast", "clips_per_s": 123.0}]}
    (tmp_path / "step_paper_b32.json").write_text(json.dumps(earlier))
    argv = ["--smoke", "--out", str(tmp_path), "--budget", "10", "--only", "step_paper_b32"]
    assert gpu_suite.main(argv) == 1
    out = capsys.readouterr().out
    assert "| step_paper_b32 | not run: --budget 10 s spent |" in out
    assert "123.0" not in out and not (tmp_path / "cost_table.md").exists()
    with pytest.raises(SystemExit, match=r"none of .*nope.* is an item"):
        gpu_suite.main(["--smoke", "--out", str(tmp_path), "--only", "nope"])


def test_the_step_flops_are_counted_on_one_clip_times_the_batch_exactly():
    """A whole batch of the paper preset at 32 clips, eager in fp32, needs over 200 GiB to be
    counted: step.py counts one clip and scales. The count of the whole batch, written out
    here, is the same number."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from benchmarks.step import NAIVE_OPTIONS, count_flops, make_config, random_batch, with_options
    from svt_ray.engine import build_state, to_device_views

    cpu = torch.device("cpu")
    config = make_config("tiny", "preset", 3)
    batch = random_batch(config, 3, cpu)
    state = build_state(with_options(config, NAIVE_OPTIONS), cpu)
    views = state.augmenter(to_device_views(batch, cpu), torch.Generator(), augment=False)
    with FlopCounterMode(display=False) as whole:
        student = state.student(views)
        with torch.no_grad():
            teacher = state.teacher(views[: config.views.num_global])
        state.loss(student.logits, teacher.logits, 0.04)["loss"].backward()
    assert count_flops(config, batch, cpu) == whole.get_total_flops() > 0


@pytest.mark.extended  # a benchmark: run before measuring with it
@pytest.mark.slow
def test_loader_benchmark_quick_run_prints_every_figure(tmp_path):
    env = {**os.environ, "RAY_ADDRESS": "local"}  # its own Ray, not the test session's
    command = [sys.executable, "benchmarks/loader.py", "--quick", "--workdir", str(tmp_path)]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {}
    for line in done.stdout.splitlines():
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if len(cells) == 6 and re.fullmatch(r"[\d.]+", cells[1]):
            rows[cells[0]] = [float(cell.rstrip("x")) for cell in cells[1:]]
    assert len(rows) == 4, done.stdout  # reference, reference with PyAV's default, ours x 2
    reference_cpu = next(iter(rows.values()))[1]
    for name, (wall, cpu, per_cpu_second, ratio, decode) in rows.items():
        assert wall > 0 and cpu > 0 and decode > 0, name
        assert per_cpu_second == pytest.approx(1 / cpu, rel=0.05), name
        assert ratio == pytest.approx(reference_cpu / cpu, rel=0.03, abs=0.06), name  # rounded
    pipeline = re.search(
        r"single-core rate \(([\d.]+) clips/s\) \|$.*^\| 1 \| ([\d.]+) \| 1\.00 \| ([\d.]+) \|$",
        done.stdout,
        re.MULTILINE | re.DOTALL,
    )
    assert pipeline, done.stdout
    single_core, rate, versus_single_core = map(float, pipeline.groups())
    assert single_core == pytest.approx(rows["ours, 15 fps shards (default cap)"][2], abs=0.01)
    assert versus_single_core == pytest.approx(rate / single_core, rel=0.03, abs=0.01)
    assert re.search(r"bytes per clip .*kB at 30 fps, .*kB at 15 fps", done.stdout)


@pytest.mark.extended  # a benchmark: run before measuring with it
@pytest.mark.slow
def test_ordering_benchmark_quick_run_streams_in_order_only_when_asked():
    env = {**os.environ, "RAY_ADDRESS": "local"}
    command = [sys.executable, "benchmarks/ordering.py", "--quick", "--workers", "2"]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    row = r"^\| 2 \| (on|off) \| ([\d.]+) \| ([\d.]+)% \| ([\d.]+) \| (yes|no) \|$"
    rows = {m[0]: m[1:] for m in re.findall(row, done.stdout, re.MULTILINE)}
    assert set(rows) == {"on", "off"}, done.stdout
    assert rows["on"][3] == "yes"  # preserve_order: the stream in the order of its rows
    for step_s, waited, longest, _ in rows.values():
        assert float(step_s) > 0 and 0 <= float(waited) < 100 and float(longest) >= 0


@pytest.mark.extended  # a benchmark: run before measuring with it
@pytest.mark.slow
def test_online_knn_benchmark_quick_run_prints_each_way_against_the_sequential_decode(tmp_path):
    """The benchmark checks itself that every way gives the sequential decode's clips (it
    exits non-zero otherwise); the test checks its table: four rows, each ratio the
    baseline's seconds over the row's."""
    env = {**os.environ, "RAY_ADDRESS": "local"}  # its own Ray, not the test session's
    command = [sys.executable, "benchmarks/online_knn.py", "--quick", "--workdir", str(tmp_path)]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = re.findall(
        r"^\| (.+?) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+)x \|$", done.stdout, re.MULTILINE
    )
    assert len(rows) == 4 and rows[0][0].startswith("rank 0 decodes them"), done.stdout
    baseline = float(rows[0][1])
    for _, seconds, clips_per_s, ratio in rows:
        assert float(clips_per_s) > 0 and float(ratio) > 0
        if float(seconds) >= 0.1:  # printed to 3 decimals
            assert float(ratio) == pytest.approx(baseline / float(seconds), rel=0.03, abs=0.02)
    assert re.search(r"8 clips of 8 x 64 px from 8 videos", done.stdout)


@pytest.mark.extended  # a benchmark: run before measuring with it
@pytest.mark.slow
def test_tracking_benchmark_times_both_paths_with_the_server_up_and_down():
    command = [sys.executable, "benchmarks/tracking.py", "--steps", "4", "--down-steps", "1"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    paths = r"(synchronous log_batch|tracker\.log_metrics)"
    row = rf"^\| (server|SQLite file) \| (up|down) \| {paths} \| (\d+) \|"
    rows = re.findall(row, done.stdout, re.MULTILINE)
    assert sorted(rows) == sorted([
        (store, state, path, steps)
        for store, state, steps in [("server", "up", "4"), ("SQLite file", "up", "4"),
                                    ("server", "down", "1")]
        for path in ("synchronous log_batch", "tracker.log_metrics")
    ]), done.stdout  # fmt: skip
    assert "tracker, server: flush() after the 4 steps took" in done.stdout


def test_cost_estimate_follows_the_written_out_formula():
    row = cost_table.estimate(
        240_000, 20, 8, 80.0, efficiency=0.9, usd_per_gpu_hour=4.0, loader_clips_per_cpu_second=12
    )
    wall = 240_000 * 20 / (80.0 * 8 * 0.9) / 3600  # 2.31 h
    assert row.wall_hours == pytest.approx(wall)
    assert row.gpu_hours == pytest.approx(8 * wall) and row.usd == pytest.approx(32 * wall)
    assert row.decode_cores_per_gpu == pytest.approx(80.0 * 0.9 / 12)
    alone = cost_table.estimate(240_000, 20, 1, 80.0, efficiency=0.5)  # no loss on one GPU
    assert alone.wall_hours == pytest.approx(240_000 * 20 / 80.0 / 3600) and alone.usd is None
    with pytest.raises(ValueError, match="efficiency"):
        cost_table.estimate(1, 1, 2, 80.0, efficiency=1.5)


def test_cost_table_reads_the_step_benchmark_report(tmp_path, capsys):
    report = {
        "device": "NVIDIA H100 80GB HBM3",
        "preset": "paper",
        "view_set": "paper",
        "batch": 32,
        "paths": [{"path": "fast", "clips_per_s": 100.0}],
    }
    (tmp_path / "step.json").write_text(json.dumps(report))
    argv = ["--step-json", str(tmp_path / "step.json"), "--gpus", "1", "--usd-per-gpu-hour", "3"]
    assert cost_table.main(argv) == 0
    printed = capsys.readouterr().out
    assert "100.0 clips/s per GPU: NVIDIA H100 80GB HBM3, preset paper" in printed
    # Kinetics-400, 20 epochs, 1 GPU: 240,000 x 20 / 100 / 3600 = 13.3 h, $40; decoding
    # 100 clips/s at 12.5 clips per CPU-second takes 8 cores
    assert "| Kinetics-400 | 20 | 1 | 13.3 | 13 | 40 | 8.0 |" in printed

    (tmp_path / "other.json").write_text(json.dumps({"paths": []}))
    with pytest.raises(SystemExit, match=r"other\.json: not a benchmarks/step\.py --json report"):
        cost_table.main(["--step-json", str(tmp_path / "other.json")])

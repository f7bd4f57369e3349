"""A study's report from MLflow alone: verdicts against written-out data, training hours
without the pauses, the parent run a report reads, and `compare` over runs of any experiment.
No Ray: the runs are made with MlflowClient."""

from __future__ import annotations

import itertools

import pytest

from svt_ray.config import ConfigError
from svt_ray.study_report import (
    METRIC,
    StudyReport,
    TrialRecord,
    batch_size_verdict,
    best_vs_worst_verdict,
    collect_study,
    curve_auc,
    frame_rate_verdict,
    qualified_verdict,
    scaling_table,
    scaling_verdict,
)


def test_curve_auc_against_an_explicit_integral():
    curve = [(0, 10.0), (100, 30.0), (300, 50.0)]
    # Trapezoids: 100 * 20 + 200 * 40 = 10000 over 300 clips; then hold 50 to a 400 budget.
    assert curve_auc(curve, 300) == pytest.approx(10000 / 300)
    assert curve_auc(curve, 400) == pytest.approx((10000 + 100 * 50) / 400)
    assert curve_auc([], 100) is None


def _trial(sweep, seed, curve, status="FINISHED", clips_per_s=None, hours_per_point=0.01):
    wall = [(hours_per_point * i, v) for i, (_, v) in enumerate(curve)]
    return TrialRecord(
        run_id=f"r{seed}{sweep}", trial_id="t", status=status, seed=seed, sweep=sweep,
        final=curve[-1][1] if curve else None, best=max(v for _, v in curve) if curve else None,
        clips_seen=curve[-1][0] if curve else None, hours=0.1, curve=curve, wall_curve=wall,
        clips_per_s=clips_per_s,
    )  # fmt: skip


def _report(trials, swept):
    return StudyReport("s", "q?", "", "sqlite://", swept, trials, budget_clips=200)


def test_batch_size_verdict_reads_the_curves():
    bs = "optim.batch_size"
    fast = [(0, 10.0), (100, 40.0), (200, 50.0)]
    slow = [(0, 10.0), (100, 20.0), (200, 50.0)]
    seeds = [(0, 0.0), (1, 1.0), (2, -1.0)]

    def shifted(curve, d):
        return [(x, y + d) for x, y in curve]

    yes = _report(
        [_trial({bs: 8}, s, shifted(fast, d)) for s, d in seeds]
        + [_trial({bs: 64}, s, shifted(slow, d)) for s, d in seeds],
        [bs],
    )
    assert batch_size_verdict(yes).startswith("yes")
    assert "(per batch size: 8: " in batch_size_verdict(yes)  # two sizes: no order to name
    middle = [_trial({bs: 16}, s, shifted(fast, d - 5)) for s, d in seeds]
    three = _report(yes.trials + middle, [bs])
    assert "; the mean rises with each smaller batch); batch 8 vs 64" in batch_size_verdict(three)
    tied = _report([_trial({bs: b}, 0, fast) for b in (8, 16, 64)], [bs])
    assert "; the mean never falls with each smaller batch)" in batch_size_verdict(tied)
    assert batch_size_verdict(tied).startswith("a tie: ")  # one seed each, the same curve
    no = _report(
        [_trial({bs: 8}, s, shifted(slow, d)) for s, d in seeds]
        + [_trial({bs: 64}, s, shifted(fast, d)) for s, d in seeds],
        [bs],
    )
    assert batch_size_verdict(no).startswith("no")
    single = _report([_trial({bs: 8}, 0, slow), _trial({bs: 64}, 0, fast)], [bs])
    assert batch_size_verdict(single).startswith("leans no")
    assert "one seed per setting" in batch_size_verdict(single)
    noisy = _report(
        [_trial({bs: 8}, s, shifted(slow, d * 20 + 1)) for s, d in seeds]
        + [_trial({bs: 64}, s, shifted(slow, d * 20)) for s, d in seeds],
        [bs],
    )
    assert batch_size_verdict(noisy).startswith("inconclusive")
    middle = _report(
        [_trial({bs: 8}, 0, slow), _trial({bs: 16}, 0, fast), _trial({bs: 64}, 0, slow)], [bs]
    )
    assert "not monotone, best batch 16" in batch_size_verdict(middle)
    one = _report([_trial({bs: 8}, 0, fast)], [bs])
    assert "fewer than two" in batch_size_verdict(one)
    # Batch 64 saw 180 of the 200 clips (it does not divide the split): both are judged over
    # the 180 clips both saw, not with batch 64's last value held to 200.
    short = [(0, 10.0), (100, 20.0), (180, 60.0)]
    uneven = _report([_trial({bs: 8}, 0, fast), _trial({bs: 64}, 0, short)], [bs])
    area_8 = curve_auc(fast, 180)
    area_64 = curve_auc(short, 180)
    assert f"8: {area_8:.1f}, 64: {area_64:.1f}" in batch_size_verdict(uneven)


def test_best_vs_worst_and_scaling_tables():
    views = "views.num_local"
    report = _report(
        [_trial({views: 0}, s, [(0, 10.0), (200, 20.0 + s)]) for s in (0, 1)]
        + [_trial({views: 4}, s, [(0, 10.0), (200, 40.0 + s)]) for s in (0, 1)],
        [views],
    )
    verdict = best_vs_worst_verdict(report)
    assert verdict.startswith("best views.num_local=4 (40.5)") and "beyond the noise" in verdict
    rows = report.aggregate()
    assert [r["knn_top1_mean"] for r in rows] == [20.5, 40.5] and rows[0]["knn_top1_sem"] == 0.5
    assert "| views.num_local | trials |" in report.markdown()
    assert report.csv().splitlines()[0].startswith("views.num_local,seed,status")

    # ASHA stopped all but one setting: they are compared where all of them were measured.
    asha = _report(
        [_trial({views: 0}, 0, [(0, 10.0), (100, 12.0), (200, 15.0)]),
         _trial({views: 4}, 0, [(0, 10.0), (100, 20.0)], status="KILLED"),
         _trial({views: 8}, 0, [(0, 10.0), (50, 11.0), (150, 30.0)], status="KILLED")],
        [views],
    )  # fmt: skip
    assert best_vs_worst_verdict(asha).startswith(
        "at 100 clips seen (the furthest every setting got before ASHA stopped it): best "
        "views.num_local=4 (20.0); over worst views.num_local=8: +9.0 points"
    )

    # Two settings finished with the same accuracy and ASHA stopped a third: a tie, then the
    # comparison at the clip count every setting reached.
    tie = _report(
        [_trial({views: 0}, 0, [(0, 10.0), (100, 30.0), (200, 50.0)]),
         _trial({views: 4}, 0, [(0, 10.0), (100, 20.0), (200, 50.0)]),
         _trial({views: 8}, 0, [(0, 10.0), (100, 12.0)], status="KILLED")],
        [views],
    )  # fmt: skip
    assert best_vs_worst_verdict(tie) == (
        "finished: the finished settings tie at 50.0 (views.num_local=0; views.num_local=4); "
        "at 100 clips seen (the furthest every setting got before ASHA stopped it): best "
        "views.num_local=0 (30.0); over worst views.num_local=8: +18.0 points (one seed per "
        "setting: no error bars, indicative only)"
    )
    assert "best: a tie at online kNN top-1 50.0 (views.num_local=0; views.num_local=4)" in (
        tie.summary()
    )
    assert "never rose" not in tie.summary()
    # Trials whose best is the untrained model's kNN: the budget is too small to read.
    flat = _report(
        [_trial({views: 0}, 0, [(0, 40.0), (100, 30.0), (200, 40.0)]),
         _trial({views: 4}, 0, [(0, 10.0), (100, 20.0)]),
         _trial({views: 8}, 0, [(100, 40.0), (200, 30.0)])],  # restored: no start to read
        [views],
    )  # fmt: skip
    assert "note: 1 of the 2 trials measured from 0 clips never rose above the untrained " in (
        flat.summary()
    )
    assert qualified_verdict(flat, "best x") == "best x"  # one of them learned
    # None learned: the verdict named a best setting and a gain that are noise.
    none = _report(
        [_trial({views: 0}, 0, [(0, 40.0), (100, 30.0)]),
         _trial({views: 4}, 0, [(0, 40.0), (100, 35.0)])],
        [views],
    )  # fmt: skip
    qualified = qualified_verdict(none, best_vs_worst_verdict(none))
    assert qualified.startswith(
        "none: no trial rose above the untrained model's online kNN, so nothing here tells the "
        "settings apart (raise optim.epochs or the clips); for the record: best views.num_local=4"
    )
    assert qualified_verdict(none, qualified) == qualified  # not twice
    later = _report([*none.trials, _trial({views: 8}, 0, [(400, 20.0), (800, 50.0)])], [views])
    assert qualified_verdict(later, "best x") == "best x"  # one not measured from 0 may have
    workers = _report([_trial({"scaling.num_workers": n}, 0, [(0, 40.0), (100, 30.0)])
                       for n in (1, 2)], ["scaling.num_workers"])  # fmt: skip
    assert qualified_verdict(workers, "2 workers: 16 clips/s") == "2 workers: 16 clips/s"

    workers = "scaling.num_workers"
    scaling = _report(
        [_trial({workers: 1}, 0, [(0, 10.0), (200, 30.0)], clips_per_s=10.0, hours_per_point=1),
         _trial({workers: 2}, 0, [(0, 10.0), (200, 30.0)], clips_per_s=16.0,
                hours_per_point=0.5)],
        [workers],
    )  # fmt: skip
    table = scaling_table(scaling, threshold=30.0)
    assert [(r["workers"], r["efficiency"], r["hours_to_threshold"]) for r in table] == [
        (1, 1.0, 1.0),
        (2, 0.8, 0.5),
    ]
    # Default threshold: 90% of the way from the start (10) to the lowest final (30) = 28.
    assert [(r["threshold_knn_top1"], r["hours_to_threshold"]) for r in scaling_table(scaling)] == [
        (28.0, 1.0),
        (28.0, 0.5),
    ]
    flat = _report(
        [_trial({workers: n}, 0, [(0, 10.0), (200, 9.0)], clips_per_s=10.0 * n) for n in (1, 2)],
        [workers],
    )
    assert [r["hours_to_threshold"] for r in scaling_table(flat)] == [None, None]
    # The verdict answers both halves of the question: throughput and time to accuracy.
    assert scaling_verdict(scaling) == (
        "2 workers: 16.0 clips/s, scaling efficiency 0.80 against 1 worker(s) (at or above the "
        "0.8 mark); 1: 1.00; 2: 0.80; time to 28.0 kNN 2.00x shorter with 2 than 1 (1: 1 h; "
        "2: 0.5 h)"
    )
    assert scaling_verdict(flat).endswith(
        "; time to accuracy: no threshold (a run ended no better than it began)"
    )
    at_once = _report(  # 2 workers start above the threshold: 0 h, no ratio to divide by
        [_trial({workers: 1}, 0, [(0, 10.0), (200, 30.0)], clips_per_s=10.0, hours_per_point=1),
         _trial({workers: 2}, 0, [(0, 40.0), (200, 30.0)], clips_per_s=16.0)],
        [workers],
    )  # fmt: skip
    assert scaling_verdict(at_once).endswith("; time to 29.5 kNN: 1: 1 h; 2: 0 h")


def _finished_run(client, experiment_id: str, knn: float, **tags: str) -> str:
    """A FINISHED run whose online kNN goes from 30 at 0 clips seen to `knn` at 100."""
    from mlflow.entities import Metric

    run = client.create_run(experiment_id, tags=tags)
    points = [(0, 30.0), (100, knn)]
    client.log_batch(
        run.info.run_id,
        metrics=[Metric(METRIC, value, 1_000 + step, step) for step, value in points],
    )
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def test_a_verdict_names_every_setting_of_a_tie():
    """max() named the first of the tied best settings while the summary said it was a tie;
    the tie was said only when every setting tied."""
    views = "views.num_local"
    report = _report(
        [_trial({views: v}, 0, [(0, 10.0), (400, final)]) for v, final in
         ((0, 50.0), (4, 50.0), (8, 40.0))],
        [views],
    )  # fmt: skip
    assert best_vs_worst_verdict(report) == (
        "best views.num_local=0 and views.num_local=4 (tied at 50.0); over worst "
        "views.num_local=8: +10.0 points (one seed per setting: no error bars, indicative only)"
    )
    assert "best: a tie at online kNN top-1 50.0 (views.num_local=0; views.num_local=4)" in (
        report.summary()
    )
    # At the common rung: three settings tie at the worst, named in order.
    asha = _report(
        [_trial({views: 8}, 0, [(0, 10.0), (100, 10.0)], status="KILLED"),
         _trial({views: 0}, 0, [(0, 10.0), (200, 50.0)]),
         _trial({views: 16}, 0, [(0, 10.0), (100, 12.0)], status="KILLED"),
         _trial({views: 4}, 0, [(0, 10.0), (200, 30.0)])],
        [views],
    )  # fmt: skip
    assert best_vs_worst_verdict(asha).endswith(
        "before ASHA stopped it): best views.num_local=16 (12.0); over worst views.num_local=0 "
        "and views.num_local=4 and views.num_local=8 (tied at 10.0): +2.0 points (one seed per "
        "setting: no error bars, indicative only)"
    )
    level = _report(asha.trials[1:2] + asha.trials[:1], [views])  # 50 finished, 10 at 100
    assert best_vs_worst_verdict(level).endswith(": every setting at 10.0 (a tie)")


def test_compare_says_a_study_is_unfinished(tmp_path, mlflow_db):
    """`svt-ray compare` on an interrupted or running study gave its verdict as if the grid
    were complete, and called the trials Ctrl-C stopped ASHA's."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("svt-ray-studies")
    parent = client.create_run(experiment, tags={
        "svt.study": "s", "svt.study_role": "parent",
        "svt.verdict_fn": "svt_ray.study_report:best_vs_worst_verdict",
    }).info.run_id  # fmt: skip
    client.log_param(parent, "sweep.views.num_local", "[0, 4, 8, 16, 32]")

    def child(views: int, points, status: str) -> None:
        run = client.create_run(experiment, tags={
            "mlflow.parentRunId": parent, "svt.seed": "0",
            "svt.sweep.views.num_local": str(views),
        }).info.run_id  # fmt: skip
        client.log_batch(run, metrics=[Metric(METRIC, y, 1000 + x, x) for x, y in points])
        if status != "RUNNING":
            client.set_terminated(run, status)

    child(0, [(0, 10.0), (400, 50.0)], "FINISHED")
    child(8, [(0, 10.0), (400, 40.0)], "FINISHED")
    client.set_terminated(parent, "FINISHED")
    done = collect_study(uri, "svt-ray-studies", "s")
    assert done.verdict.startswith("best views.num_local=0 (50.0); over worst")
    assert "unfinished" not in done.summary()

    client.update_run(parent, "RUNNING")  # the study continued, then Ctrl-C
    child(16, [(0, 10.0), (100, 12.0)], "KILLED")
    # Its own driver reports a sweep it ended with the parent RUNNING still: not unfinished.
    driver = collect_study(uri, "svt-ray-studies", "s", recompute_verdict=False, sweep_ended=True)
    assert "unfinished" not in driver.summary()
    child(32, [(0, 10.0)], "RUNNING")
    client.set_terminated(parent, "KILLED")
    report = collect_study(uri, "svt-ray-studies", "s")
    assert report.verdict.startswith(
        "study unfinished (parent KILLED, 1 trial running): finished: best views.num_local=0 "
        "(50.0); over worst views.num_local=8: +10.0 points"
    )
    assert "at 100 clips seen (the furthest every setting got so far): best" in report.verdict
    assert "ASHA" not in report.verdict
    lines = report.summary().splitlines()
    assert lines[1].startswith("study unfinished (parent KILLED, 1 trial running): what follows")
    assert "4 trials (0 failed, 1 stopped early, 1 running)" in lines[2]
    assert lines[-1] == f"verdict: {report.verdict}"
    assert report.verdict in report.markdown()


def test_a_trials_hours_are_its_training_loops_without_start_ups_or_pauses(tmp_path, mlflow_db):
    """Hours count from each session's first step, not from the run's start (Ray Train's
    start-up: 41 s of a 16 s trial on 2 cores), and leave out the pauses between a stop and the
    restore, also one whose wall time did not fall back (a short first session, a long redo of
    the steps after its checkpoint) and one of a session stopped before it logged a step."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    from svt_ray.study_report import _trial_record

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    hour, day, t0 = 3_600_000, 24 * 3_600_000, 1_000_000
    run = client.create_run(client.create_experiment("x"), start_time=t0).info.run_id
    loop1 = t0 + 40_000  # Ray Train started in 40 s; the untrained model's kNN came before
    loop2 = loop1 + int(0.2 * hour) + day + 2 * hour  # after a session that logged nothing
    # (clips seen, wall_time_s in hours, the loop's start, kNN or None)
    points = [(100, 0.2, loop1, 40.0), (150, 0.5, loop2, None), (200, 0.8, loop2, 50.0)]
    metrics = [Metric(METRIC, 30.0, t0 + 30_000, 0)]
    for clips, hours, loop, knn in points:
        timestamp = loop + int(hours * hour)
        metrics.append(Metric("wall_time_s", hours * 3600, timestamp, clips))
        if knn is not None:
            metrics.append(Metric(METRIC, knn, timestamp, clips))
    client.log_batch(run, metrics=metrics)
    client.set_terminated(run, "FINISHED", end_time=loop2 + int(0.8 * hour) + 5_000)
    record = _trial_record(client, client.get_run(run), [])
    assert record.hours == pytest.approx(1.0, abs=1e-4)  # 0.2 + 0.8, not 27.2
    assert [round(h, 4) for h, _ in record.wall_curve] == [0.0, 0.2, 1.0]
    # A second session whose wall time falls back is one too, whenever it began.
    again = client.create_run(client.get_run(run).info.experiment_id, start_time=t0).info.run_id
    client.log_batch(again, metrics=[
        Metric("wall_time_s", 3600.0, loop1 + hour, 100),
        Metric("wall_time_s", 60.0, loop1 + hour + 30_000, 150),  # began 30 s before the last
    ])  # fmt: skip
    client.set_terminated(again, "KILLED", end_time=loop1 + hour + 30_000)
    assert _trial_record(client, client.get_run(again), []).hours == pytest.approx(61 / 60)


def test_compare_recomputes_the_verdict_with_the_current_rules(tmp_path, mlflow_db, caplog):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment_id = client.create_experiment("x")

    def parent(name: str, verdict_fn: str) -> str:
        run = client.create_run(
            experiment_id,
            tags={"svt.study": name, "svt.study_role": "parent", "svt.x_label": "local views",
                  "svt.verdict": "stale words", "svt.verdict_fn": verdict_fn},
        )  # fmt: skip
        client.log_param(run.info.run_id, "sweep.views.num_local", "0,4")
        for locals_, knn in ((0, 40.0), (4, 70.0)):
            _finished_run(client, experiment_id, knn, **{
                "mlflow.parentRunId": run.info.run_id, "svt.seed": "0",
                "svt.sweep.views.num_local": str(locals_),
            })  # fmt: skip
        client.set_terminated(run.info.run_id, "FINISHED")  # a study that ran to its end
        return run.info.run_id

    parent("current", "svt_ray.study_report:best_vs_worst_verdict")
    report = collect_study(uri, "x", "current")
    assert report.verdict.startswith("best views.num_local=4 (70")
    assert report.verdict == best_vs_worst_verdict(report)
    assert report.x_label == "local views"
    # Studies run before the report moved out of svt_ray.studies recorded the old module.
    parent("older", "svt_ray.studies:best_vs_worst_verdict")
    assert collect_study(uri, "x", "older").verdict == report.verdict
    # A verdict function that is gone, or not this package's, leaves the stored words.
    parent("gone", "svt_ray.studies:no_such_verdict")
    parent("foreign", "my_script:verdict")
    assert collect_study(uri, "x", "gone").verdict == "stale words"
    with caplog.at_level("INFO", logger="svt_ray.study_report"):
        assert collect_study(uri, "x", "foreign").verdict == "stale words"
    assert "verdict: as the study's script (my_script:verdict) stored it" in caplog.text


def test_a_report_reads_its_own_parent_run_and_compare_takes_runs_of_any_experiment(
    tmp_path, mlflow_db, caplog
):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)

    studies = client.create_experiment("svt-ray-studies")
    parents = []
    for start, knn in ((1_000, 40.0), (2_000, 90.0)):  # the same study under two --storage
        parent = client.create_run(
            studies, start_time=start, tags={"svt.study": "s", "svt.study_role": "parent"}
        ).info.run_id
        client.log_param(parent, "sweep.optim.batch_size", "8")
        _finished_run(client, studies, knn, **{"mlflow.parentRunId": parent,
                                      "svt.sweep.optim.batch_size": "8"})  # fmt: skip
        parents.append(parent)
    assert (
        collect_study(uri, "svt-ray-studies", "s", parent_run_id=parents[0]).trials[0].final == 40
    )
    newest = collect_study(uri, "svt-ray-studies", "s")
    assert newest.parent_run_id == parents[1] and newest.trials[0].final == 90
    assert f"others: {parents[0]}; pick one with --parent-run" in caplog.text
    # Another study's parent run would be reported (and written) as study s.
    other = client.create_run(studies, tags={"svt.study": "t", "svt.study_role": "parent"})
    with pytest.raises(ConfigError, match=r"parent run of study 't', not of 's'; pass that"):
        collect_study(uri, "svt-ray-studies", "s", parent_run_id=other.info.run_id)
    with pytest.raises(  # a study run with another store: say which store was searched
        ConfigError,
        match=rf"no study 'u' in MLflow experiment 'svt-ray-studies' of {uri} \(its studies: "
        r"s, t\); pass the --tracking-uri",
    ):
        collect_study(uri, "svt-ray-studies", "u")

    # Plain pretraining runs, in their own experiment: batch sizes compare as numbers, and
    # seeds are repeats of a setting, not a setting.
    plain = client.create_experiment("svt-ray")
    run_ids = []
    for batch, seed in itertools.product((64, 8, 16), (0, 1)):
        run_id = _finished_run(client, plain, 50.0 + batch / 8 + seed)
        client.log_param(run_id, "optim.batch_size", str(batch))
        client.log_param(run_id, "train.seed", str(seed))
        client.log_param(run_id, "train.run_name", f"b{batch}-s{seed}")
        client.log_param(run_id, "data.decode_actors", str(1 + seed))  # a study's CPU share
        run_ids.append(run_id)
    report = collect_study(uri, "svt-ray-studies", "runs", run_ids=run_ids)
    assert report.swept == ["optim.batch_size"]
    rows = report.aggregate()
    assert [row["optim.batch_size"] for row in rows] == [8, 16, 64]
    assert [(row["scored"], row["knn_top1_mean"]) for row in rows] == [
        (2, 51.5), (2, 52.5), (2, 58.5)
    ]  # fmt: skip
    assert rows[0]["knn_top1_sem"] == pytest.approx(0.5)
    with pytest.raises(ConfigError, match="no MLflow run with id or name 'deadbeef' in sqlite"):
        collect_study(uri, "svt-ray-studies", "runs", run_ids=["deadbeef"])
    failed = client.create_run(plain).info.run_id  # failed before its first step
    client.set_terminated(failed, "FAILED")
    rows = collect_study(uri, "svt-ray-studies", "runs", run_ids=[run_ids[0], failed]).rows()
    assert [(row["status"], row["hours"] is None) for row in rows] == [
        ("FINISHED", False), ("FAILED", True)  # no "0.0" hours of training for it
    ]  # fmt: skip
    with pytest.raises(
        ConfigError,
        match=rf"the parent run of study 's', .*with --study s --parent-run {parents[0]}, or name",
    ):
        collect_study(uri, "svt-ray-studies", "runs", run_ids=[run_ids[0], parents[0]])
    with pytest.raises(ConfigError, match=rf"{parents[0]} --experiment svt-ray-studies, or name"):
        collect_study(uri, "svt-ray", "runs", run_ids=[parents[0]])  # --study searches svt-ray
    # Runs by name, as `svt-ray pretrain` calls them; a name two runs share needs the id.
    for name, run_id in (("b8-s0", run_ids[2]), ("b16-s0", run_ids[4]), ("twice", run_ids[0])):
        client.set_tag(run_id, "mlflow.runName", name)
    client.set_tag(run_ids[1], "mlflow.runName", "twice")
    by_name = collect_study(uri, "svt-ray-studies", "runs", run_ids=["b8-s0", "b16-s0"])
    assert [t.run_id for t in by_name.trials] == [run_ids[2], run_ids[4]]
    with pytest.raises(ConfigError, match=r"2 MLflow runs of .* are named 'twice' \("):
        collect_study(uri, "svt-ray-studies", "runs", run_ids=["twice"])
    # How often runs log and checkpoint is not a setting; runs without online kNN are said.
    quiet = []
    for every in (10, 20):
        run_id = client.create_run(plain).info.run_id
        client.log_param(run_id, "train.checkpoint_every", str(every))
        client.log_param(run_id, "train.progress_every_s", str(every))
        client.set_terminated(run_id, "FINISHED")
        quiet.append(run_id)
    report = collect_study(uri, "svt-ray-studies", "runs", run_ids=quiet)
    assert report.swept == []
    assert "note: no run logged online kNN" in report.summary()
    assert "swept no setting (the same recipe); 2 trials (0 failed" in report.summary()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an empty curves plot, without matplotlib's warning
        report.write(tmp_path / "quiet")


def test_a_verdict_says_which_side_has_a_single_seed():
    from svt_ray.study_report import _difference_phrase

    assert "one seed per setting" in _difference_phrase((70.0, None, 1), (60.0, None, 1))
    phrase = _difference_phrase((71.0, 2.0, 3), (60.0, None, 1))
    assert phrase.startswith("+11.0 points (3 against 1 seed(s): one side has a single seed")
    assert "within" in _difference_phrase((61.0, 2.0, 3), (60.0, 1.0, 3))


def test_the_frame_rate_verdict_answers_paper_against_reference_code():
    """The frame-rate study asks whether the paper's views beat the reference code's; best
    against worst (its verdict before) set the reference code's against the best, not against the paper's."""
    g, loc = "views.global_frames", "views.local_frames"
    grid = {  # (global, local) -> final online kNN
        ((8, 16), (8,)): 73.4, ((8, 16), (2, 4, 8, 16)): 71.4,
        ((8, 8), (8,)): 64.1, ((4, 8), (8,)): 40.0,
    }  # fmt: skip
    report = _report(
        [_trial({g: list(a), loc: list(b)}, 0, [(0, 39.0), (3040, final)])
         for (a, b), final in grid.items()],
        [g, loc],
    )  # fmt: skip
    paper = "views.global_frames=[8, 16], views.local_frames=[2, 4, 8, 16]"
    reference = "views.global_frames=[8, 8], views.local_frames=[8]"
    assert frame_rate_verdict(report) == (
        f"the paper's views ({paper}) 71.4 against the reference code's ({reference}) 64.1, "
        "final online kNN: +7.3 points (one seed per setting: no error bars, indicative only). "
        f"Whole grid: {best_vs_worst_verdict(report)}"
    )
    # ASHA stopped the reference code's setting at 1,200 clips (three seeds each): both are
    # read there, each seed's last value up to it.
    seeds = []
    for seed, shift in enumerate((0.0, 2.0, -2.0)):
        seeds += [
            _trial({g: [8, 16], loc: [2, 4, 8, 16]}, seed,
                   [(0, 39.0), (1200, 56.0 + shift), (2400, 60.0), (3040, 70.0)]),
            _trial({g: [8, 8], loc: [8]}, seed, [(0, 39.0), (800, 45.0), (1200, 50.0 + shift)],
                   status="KILLED"),
        ]  # fmt: skip
    # (2 s.e. of each side: 2 / sqrt(3) * 2, together 2 * hypot = 3.27)
    assert frame_rate_verdict(_report(seeds, [g, loc])).startswith(
        f"the paper's views ({paper}) 56.0 against the reference code's ({reference}) 50.0, "
        "online kNN at 1200 clips seen (the furthest both got before ASHA stopped one): +6.0 "
        "points, beyond the noise (2 s.e. = 3.3). Whole grid: "
    )
    # Another --grid, without the reference code's setting: best against worst alone.
    other = _report([t for t in report.trials if t.sweep != {g: [8, 8], loc: [8]}], [g, loc])
    assert frame_rate_verdict(other) == best_vs_worst_verdict(other)


def test_list_settings_sort_by_their_numbers():
    """A frame-rate grid's [64] came before [8] in the tables (sorted as text)."""
    frames = "views.local_frames"
    report = _report([_trial({frames: f}, 0, [(0, 10.0), (100, 20.0)]) for f in ([64], [8, 16], [8])],
                     [frames])  # fmt: skip
    assert [row[frames] for row in report.rows()] == [[8], [8, 16], [64]]
    assert [row[frames] for row in report.aggregate()] == [[8], [8, 16], [64]]


def _recorded(calls: list, method):
    """`method` (of matplotlib's Axes), appending the positional arguments of each call to
    `calls` before it draws."""

    def record(self, *args, **kwargs):
        calls.append(args)
        return method(self, *args, **kwargs)

    return record


def test_the_final_plot_keeps_the_settings_asha_stopped(tmp_path, monkeypatch):
    """final.png showed finished settings only: a setting ASHA stopped in every trial was
    missing without a mark (the view-count study's 2G+8L). What it draws is checked, not only
    that a file was written."""
    from matplotlib.axes import Axes

    from svt_ray.study_report import _stopped_settings

    views = "views.num_local"
    report = _report(
        [_trial({views: 0}, 0, [(0, 10.0), (400, 30.0)]),
         _trial({views: 4}, 0, [(0, 10.0), (200, 14.0)], status="KILLED"),
         _trial({views: 4}, 1, [(0, 10.0), (300, 18.0)], status="KILLED"),
         _trial({views: 8}, 0, [(0, 10.0), (200, 12.0)], status="KILLED"),
         _trial({views: 8}, 1, [(0, 10.0), (400, 40.0)])],  # one seed finished: a mean
        [views],
    )  # fmt: skip
    assert _stopped_settings(report) == {"[4]": (16.0, 300)}
    drawn = {"plot": [], "annotate": [], "set_xticks": []}  # the plots' calls, by method
    for method, calls in drawn.items():
        monkeypatch.setattr(Axes, method, _recorded(calls, getattr(Axes, method)))
    files = report.write(tmp_path)
    assert files["final.png"].stat().st_size > 10_000
    assert drawn["set_xticks"][-1] == (range(3), ["0", "4", "8"])
    assert ([1], [16.0], "v") in drawn["plot"]  # setting 4, at x 1, its trials' mean last value
    assert ("300 clips", (1, 16.0)) in drawn["annotate"]


def _recorded_calls(calls: list, method):
    """As `_recorded`, keeping each call's keyword arguments too: (args, kwargs)."""

    def record(self, *args, **kwargs):
        calls.append((args, kwargs))
        return method(self, *args, **kwargs)

    return record


def test_a_setting_some_of_whose_seeds_asha_stopped_is_not_judged_on_its_survivors(
    tmp_path, monkeypatch
):
    """Setting A's mean was of the two seeds ASHA let finish (its third stopped at 41), and
    "+8.0 points, beyond the noise" judged those survivors against B's three seeds."""
    from matplotlib.axes import Axes

    terms = "loss_terms"
    report = _report(
        [_trial({terms: "A"}, 0, [(0, 40.0), (1216, 70.0), (4864, 82.0)]),
         _trial({terms: "A"}, 1, [(0, 40.0), (1216, 41.0)], status="KILLED"),
         _trial({terms: "A"}, 2, [(0, 40.0), (1216, 80.0), (4864, 84.0)])]
        + [_trial({terms: "B"}, s, [(0, 40.0), (1216, 55.0 + s), (4864, 74.0 + s)])
           for s in (0, 1, 2)],
        [terms],
    )  # fmt: skip
    verdict = best_vs_worst_verdict(report)
    assert verdict.startswith(
        "finished: best loss_terms=A (83.0); over worst loss_terms=B: +8.0 points, not judged "
        "against the noise (loss_terms=A: 2 of 3 seeds finished); at 1216 clips seen (the "
        "furthest every setting got before ASHA stopped it): best loss_terms=A (63.7)"
    )
    assert "beyond" not in verdict
    best = "best: loss_terms=A: online kNN top-1 83.0 ± 1.0 (2 seed(s); 2 of 3 seeds finished)"
    assert best in report.summary()
    annotated = []
    monkeypatch.setattr(Axes, "annotate", _recorded(annotated, Axes.annotate))
    report.write(tmp_path)
    assert ("2 of 3 seeds finished", (0, 83.0)) in annotated  # final.png: A at x 0


def test_without_asha_a_stopped_trial_is_not_said_to_be_asha_s(tmp_path, mlflow_db):
    """In a study run with --no-asha, a trial stopped (KILLED) was said stopped "before ASHA
    stopped it" and counted "stopped early"; the parent run's `asha` param says which."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("svt-ray-studies")
    for name, asha in (("off", "False"), ("on", "True"), ("older", None)):
        parent = client.create_run(experiment, tags={
            "svt.study": name, "svt.study_role": "parent",
            "svt.verdict_fn": "svt_ray.study_report:best_vs_worst_verdict",
        }).info.run_id  # fmt: skip
        client.log_param(parent, "sweep.views.num_local", "0,4")
        if asha is not None:  # studies before the param was logged lack it
            client.log_param(parent, "asha", asha)
        for views, points, status in (
            (0, [(0, 10.0), (400, 50.0)], "FINISHED"),
            (4, [(0, 10.0), (100, 12.0)], "KILLED"),
        ):
            run = client.create_run(experiment, tags={
                "mlflow.parentRunId": parent, "svt.seed": "0",
                "svt.sweep.views.num_local": str(views),
            }).info.run_id  # fmt: skip
            client.log_batch(run, metrics=[Metric(METRIC, y, 1000 + x, x) for x, y in points])
            client.set_terminated(run, status)
        client.set_terminated(parent, "FINISHED")
    off = collect_study(uri, "svt-ray-studies", "off")
    assert off.verdict == (
        "at 100 clips seen (the furthest every setting got before it was stopped): best "
        "views.num_local=4 (12.0); over worst views.num_local=0: +2.0 points (one seed per "
        "setting: no error bars, indicative only)"
    )
    assert "2 trials (0 failed, 1 stopped by an interruption, ASHA off)" in off.summary()
    assert off.asha is False
    for name in ("on", "older"):  # an older study: as before
        report = collect_study(uri, "svt-ray-studies", name)
        assert "(the furthest every setting got before ASHA stopped it)" in report.verdict
        assert "2 trials (0 failed, 1 stopped early)" in report.summary()
    g, loc = "views.global_frames", "views.local_frames"
    pair = _report(
        [_trial({g: [8, 16], loc: [2, 4, 8, 16]}, 0, [(0, 39.0), (1200, 56.0), (3040, 70.0)]),
         _trial({g: [8, 8], loc: [8]}, 0, [(0, 39.0), (1200, 50.0)], status="KILLED")],
        [g, loc],
    )  # fmt: skip
    pair.asha = False
    assert "(the furthest both got before one was stopped): +6.0 points" in (
        frame_rate_verdict(pair)
    )


def test_a_restarted_trials_clips_per_s_is_over_all_its_sessions(tmp_path, mlflow_db):
    """clips_per_s restarts with each training session of a resumed trial, and the report read
    the latest value: a short slow session after a restart stood for the whole trial (10 clips/s
    of a trial that ran 30 for most of its time), and the scaling efficiency with it."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    from svt_ray.study_report import _trial_record

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment("x")
    t0 = 1_000_000

    def run(sessions) -> str:
        """A run of (loop start in ms, [(clips seen, wall_time_s, clips_per_s)]) sessions."""
        run_id = client.create_run(experiment, start_time=t0).info.run_id
        metrics = []
        for start, points in sessions:
            for clips, wall, rate in points:
                timestamp = start + int(wall * 1000)
                metrics += [Metric("wall_time_s", wall, timestamp, clips),
                            Metric("clips_per_s", rate, timestamp, clips)]  # fmt: skip
        client.log_batch(run_id, metrics=metrics)
        client.set_terminated(run_id, "FINISHED", end_time=timestamp + 1000)
        return run_id

    # 300 s at 30 clips/s, a lost node, 100 s at 10 clips/s: 25 clips/s over its training.
    restarted = run([(t0 + 40_000, [(3000, 150.0, 28.0), (9000, 300.0, 30.0)]),
                     (t0 + 10_000_000, [(9500, 100.0, 10.0)])])  # fmt: skip
    record = _trial_record(client, client.get_run(restarted), [])
    assert record.hours == pytest.approx(400 / 3600, abs=1e-4)
    assert record.clips_per_s == pytest.approx((30.0 * 300 + 10.0 * 100) / 400)
    once = run([(t0 + 40_000, [(3000, 150.0, 28.0), (9000, 300.0, 30.5)])])
    assert _trial_record(client, client.get_run(once), []).clips_per_s == 30.5  # as logged
    assert "for a trial restarted after a stop, over all its training sessions" in (
        _report([], ["x"]).markdown()
    )


def test_a_trial_with_two_mlflow_runs_counts_once(tmp_path, mlflow_db):
    """An attempt abandoned without a checkpoint (KILLED) and the run made for the same trial
    after it were two trials of one seed: a setting had 2 trials, 1 scored."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("svt-ray-studies")
    parent = client.create_run(
        experiment, tags={"svt.study": "s", "svt.study_role": "parent"}
    ).info.run_id
    client.log_param(parent, "sweep.views.num_local", "0,4,8")
    runs = {}
    for trial, views, start, knn, status in (
        ("a_00000", 0, 1_000, 40.0, "KILLED"),  # abandoned, then run again
        ("a_00000", 0, 2_000, 50.0, "FINISHED"),
        ("a_00001", 4, 1_000, 60.0, "FINISHED"),  # a later attempt that did not finish
        ("a_00001", 4, 3_000, 20.0, "KILLED"),
        ("a_00002", 8, 1_000, 30.0, "KILLED"),  # none finished: the newest
        ("a_00002", 8, 2_000, 35.0, "FAILED"),
    ):
        run_id = client.create_run(experiment, start_time=start, tags={
            "mlflow.parentRunId": parent, "svt.trial_id": trial, "svt.seed": "0",
            "svt.sweep.views.num_local": str(views),
        }).info.run_id  # fmt: skip
        client.log_batch(run_id, metrics=[Metric(METRIC, knn, start + 10, 100)])
        client.set_terminated(run_id, status, end_time=start + 20)
        runs[trial, start] = run_id
    client.set_terminated(parent, "FINISHED")
    report = collect_study(uri, "svt-ray-studies", "s")
    kept = [runs["a_00000", 2_000], runs["a_00001", 1_000], runs["a_00002", 2_000]]
    assert sorted(t.run_id for t in report.trials) == sorted(kept)
    assert [(row["trials"], row["scored"]) for row in report.aggregate()] == [
        (1, 1), (1, 1), (1, 0)
    ]  # fmt: skip
    # Runs named to `compare --runs` are each compared, whatever their trial.
    named = collect_study(uri, "svt-ray-studies", "runs", run_ids=list(runs.values())[:2])
    assert len(named.trials) == 2


def test_a_setting_whose_every_trial_failed_is_said_and_drawn(tmp_path, monkeypatch):
    """The frame-rate verdict dropped its own question when the paper's views all failed,
    final.png left that setting out without a mark, and curves.png drew a failed trial's curve
    solid, as a finished one's."""
    import dataclasses

    from matplotlib.axes import Axes

    g, loc = "views.global_frames", "views.local_frames"
    paper, reference = {g: [8, 16], loc: [2, 4, 8, 16]}, {g: [8, 8], loc: [8]}
    diverged = dataclasses.replace(
        _trial(paper, 0, [(0, 40.0), (1200, 50.0), (2400, 55.0)], status="FAILED"),
        error="NonFiniteLossError: loss is nan at step 160\nTraceback (most recent call last):",
    )
    report = _report(
        [diverged,
         _trial(reference, 0, [(0, 40.0), (1200, 49.0), (3040, 64.0)]),
         _trial({g: [8, 16], loc: [8]}, 0, [(0, 40.0), (1200, 56.0), (3040, 73.0)])],
        [g, loc],
    )  # fmt: skip
    assert frame_rate_verdict(report) == (
        "the paper's views (views.global_frames=[8, 16], views.local_frames=[2, 4, 8, 16]): "
        "every trial failed (NonFiniteLossError: loss is nan at step 160): no comparison. "
        f"Whole grid: {best_vs_worst_verdict(report)}"
    )
    # One seed of three failed: the two left are not judged against the noise.
    seeds = [
        _trial(side, s, [(0, 40.0), (3040, final + s)])
        for s in (0, 1, 2)
        for side, final in ((paper, 70.0), (reference, 60.0))
    ]
    seeds[0] = dataclasses.replace(seeds[0], status="FAILED")
    assert frame_rate_verdict(_report(seeds, [g, loc])).startswith(
        "the paper's views (views.global_frames=[8, 16], views.local_frames=[2, 4, 8, 16]) 71.5 "
        "against the reference code's (views.global_frames=[8, 8], views.local_frames=[8]) "
        "61.0, final online kNN: +10.5 points, not judged against the noise (the paper's views: "
        "2 of 3 seeds measured). Whole grid: "
    )

    drawn = {"plot": [], "annotate": [], "set_xticks": []}
    for method, calls in drawn.items():
        monkeypatch.setattr(Axes, method, _recorded_calls(calls, getattr(Axes, method)))
    report.write(tmp_path)
    styles = {kwargs.get("label"): args[2] for args, kwargs in drawn["plot"] if len(args) > 2}
    assert styles["global_frames=[8, 16], local_frames=[2, 4, 8, 16] (seed 0, failed)"] == ":"
    assert styles["global_frames=[8, 8], local_frames=[8] (seed 0)"] == "-"
    ticks = drawn["set_xticks"][-1][0][1]
    assert ticks == ["[8, 8], [8]", "[8, 16], [2, 4, 8, 16]", "[8, 16], [8]"]
    assert (("failed", (1, 0.02)), {"xycoords": ("data", "axes fraction"), "ha": "center",
            "fontsize": 7, "color": "red"}) in drawn["annotate"]  # fmt: skip
    assert any(
        args == ([1], [55.0], "x") and kwargs["label"].startswith("failed")
        for args, kwargs in drawn["plot"]
    )


def test_the_batch_size_verdict_names_every_batch_of_a_tie():
    """'not monotone, best batch 16' where 16 and 32 tied."""
    bs = "optim.batch_size"

    def curve(value):
        return [(0, 40.0), (100, value), (200, value)]

    report = _report(
        [_trial({bs: b}, 0, curve(v)) for b, v in ((8, 50.0), (16, 60.0), (32, 60.0), (64, 55.0))],
        [bs],
    )
    assert "; not monotone, best batch 16 and 32 (tied at 55.0)); batch 8 vs 64" in (
        batch_size_verdict(report)
    )


def test_the_scaling_table_leaves_out_a_missing_clips_per_s():
    """A trial without clips/s counted as 0 clips/s: a 1-worker mean of 10 for 20, efficiency
    1.50; with no 1-worker clips/s at all, efficiency 30.00."""
    workers = "scaling.num_workers"
    curve = [(0, 40.0), (4864, 60.0)]
    report = _report(
        [_trial({workers: 1}, 0, curve, clips_per_s=20.0),
         _trial({workers: 1}, 1, curve),
         _trial({workers: 2}, 0, curve, clips_per_s=30.0)],
        [workers],
    )  # fmt: skip
    assert [(r["clips_per_s"], r["efficiency"]) for r in scaling_table(report)] == [
        (20.0, 1.0), (30.0, 0.75)
    ]  # fmt: skip
    silent = _report([_trial({workers: 1}, 0, curve), report.trials[2]], [workers])
    assert [(r["clips_per_s"], r["efficiency"]) for r in scaling_table(silent)] == [
        (None, None), (30.0, None)
    ]  # fmt: skip
    assert scaling_verdict(silent).startswith(
        "2 workers: no scaling efficiency against 1 worker(s) (no clips/s logged with 1); "
        "1: none; 2: none; time to"
    )


def test_a_non_finite_knn_is_left_out_and_said():
    """A NaN final kNN made best against worst raise IndexError, and the summary's best read
    'nan'."""
    nan = float("nan")
    views = "views.num_local"
    report = _report(
        [_trial({views: v}, 0, [(0, 40.0), (4864, final)])
         for v, final in ((0, nan), (4, 50.0), (8, 60.0))],
        [views],
    )  # fmt: skip
    report.verdict = best_vs_worst_verdict(report)
    assert report.verdict == (
        "best views.num_local=8 (60.0); over worst views.num_local=4: +10.0 points (one seed per "
        "setting: no error bars, indicative only); a non-finite online kNN (left out wherever "
        "compared) in views.num_local=0, seed 0"
    )
    summary = report.summary()
    assert "best: views.num_local=8: online kNN top-1 60.0 (1 seed(s))" in summary
    assert "note: a non-finite online kNN in views.num_local=0, seed 0: such values are" in (
        summary
    )
    assert [row["scored"] for row in report.aggregate()] == [0, 1, 1]
    # At the common rung, in the batch-size verdict and in a trial's best: left out too.
    stopped = _report(
        [_trial({views: 0}, 0, [(0, 40.0), (1200, nan)], status="KILLED"), *report.trials[1:]],
        [views],
    )
    assert "a non-finite online kNN (left out wherever compared) in views.num_local=0, seed 0" in (
        best_vs_worst_verdict(stopped)
    )
    bs = "optim.batch_size"
    batches = _report(
        [_trial({bs: b}, 0, [(0, 40.0), (200, final)]) for b, final in ((8, nan), (16, 50.0),
                                                                         (64, 45.0))],
        [bs],
    )  # fmt: skip
    assert batch_size_verdict(batches).startswith("leans yes: mean online kNN over the budget "
                                                  "(per batch size: 16: ")  # fmt: skip

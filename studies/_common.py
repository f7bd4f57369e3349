"""Settings every study script shares on the embedded default (tiny preset, synthetic data).

On a cluster these are starting points: pass `--preset paper --data <uri> --workers N
--gpus-per-worker 1 --address auto --storage <uri> --tracking-uri <server>` (storage and
tracking every node reaches), `--max-concurrent N` (an autoscaling cluster holds little when
the study starts) and `--set optim.epochs=...` for a real budget.
"""

SMALL_BUDGET = [
    # Equal clips seen for every trial: 8 passes over the training split (the demo's budget;
    # on the embedded data the online kNN rises mostly between 1,500 and 5,000 clips seen).
    "optim.epochs=8",
    "eval.online_every_clips=400",  # online kNN at the same clip counts for every batch size
    "eval.online_bank_clips=300",
    "eval.online_query_clips=200",
    "train.checkpoint_every=50",
]

"""Settings every study script shares on the embedded default (tiny preset, synthetic data).

On a cluster these are starting points: pass `--preset paper --data <uri> --workers N
--gpus-per-worker 1 --address auto` and `--set optim.epochs=...` for a real budget.
"""

SMALL_BUDGET = [
    "optim.epochs=2",  # equal clips seen for every trial: 2 passes over the training split
    "eval.online_every_clips=200",  # online kNN at the same clip counts for every batch size
    "eval.online_bank_clips=300",
    "eval.online_query_clips=200",
    "train.checkpoint_every=50",
]

"""Clips/s and time to accuracy against the number of Ray Train workers.

The global batch stays fixed, so the per-worker batch shrinks as workers are added (the
config derives it); the table gives scaling efficiency = clips/s(N) / (N x clips/s(1)).
On a laptop the CPU count caps what can be shown; on a cluster, with a budget for real data
in place of the embedded default's (README, "Studies"):

    python studies/scaling.py --preset paper --data s3://bucket/k400 --gpus-per-worker 1 \
        --address auto --grid scaling.num_workers=1,2,4,8 --storage s3://bucket/runs \
        --tracking-uri http://127.0.0.1:5000 \
        --set optim.epochs=20 --set train.checkpoint_every=1000 \
        --set eval.online_every_clips=240000 --set eval.online_bank_clips=4000 \
        --set eval.online_query_clips=2000
"""

import sys

from svt_ray.studies import SMALL_BUDGET, StudySpec, Sweep, study_main
from svt_ray.study_report import scaling_verdict

SPEC = StudySpec(
    name="scaling",
    question="How do clips/s and time to accuracy scale with the number of workers?",
    sweeps=[Sweep("scaling.num_workers", (1, 2))],
    fixed=SMALL_BUDGET,  # the full budget: time to accuracy needs runs that learn
    verdict=scaling_verdict,
    x_label="Ray Train workers",
    asha=False,
    exclusive=True,
)

if __name__ == "__main__":
    sys.exit(study_main(SPEC))

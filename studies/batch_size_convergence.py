"""Does SVT converge faster per clip seen with smaller batches (the paper's claim)?

Global batch 8..64 with the learning rate scaled linearly (optim.base_lr x batch / 256, the
config's rule), every trial running the same epochs: epochs x (training clips // batch)
steps, so a batch that does not divide the training clips sees fewer (batch 64 sees 4,608 of
the embedded data's 4,864, 5% fewer; the clips left at an epoch's end start the next epoch's
batches). On the embedded default online kNN is measured every 400 clips seen in whole steps
(384 at batch 32 and 64); the verdict compares the area under those curves over the clips
every trial saw. On real data give the budget with --set, as below (README, "Studies").

    python studies/batch_size_convergence.py                 # tiny preset, synthetic data, CPU
    python studies/batch_size_convergence.py --seeds 0,1,2   # error bars
    python studies/batch_size_convergence.py --preset paper --data s3://bucket/k400 \
        --workers 8 --gpus-per-worker 1 --address auto --grid optim.batch_size=64,128,256,512 \
        --storage s3://bucket/runs --tracking-uri http://127.0.0.1:5000 --max-concurrent 4 \
        --set optim.epochs=20 --set train.checkpoint_every=1000 \
        --set eval.online_every_clips=240000 --set eval.online_bank_clips=4000 \
        --set eval.online_query_clips=2000 --set optim.accumulation_steps=2
"""

import sys

from svt_ray.studies import SMALL_BUDGET, StudySpec, Sweep, study_main
from svt_ray.study_report import batch_size_verdict

SPEC = StudySpec(
    name="batch_size_convergence",
    question="Do smaller global batches (linearly scaled lr, equal clips seen) converge faster "
    "per clip seen?",
    sweeps=[Sweep("optim.batch_size", (8, 16, 32, 64))],
    fixed=SMALL_BUDGET,
    verdict=batch_size_verdict,
    x_label="global batch size",
    asha=False,  # the question is about whole curves: run the full grid
)

if __name__ == "__main__":
    sys.exit(study_main(SPEC))

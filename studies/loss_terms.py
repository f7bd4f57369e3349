"""SVT's two correspondence losses: cross-view only, motion only, both.

python studies/loss_terms.py --seeds 0,1
"""

import sys

from svt_ray.studies import SMALL_BUDGET, StudySpec, Sweep, study_main
from svt_ray.study_report import best_vs_worst_verdict

TERMS = Sweep(
    "loss_terms",
    (
        {"loss.cross_view_weight": 1.0, "loss.motion_weight": 0.0},
        {"loss.cross_view_weight": 0.0, "loss.motion_weight": 1.0},
        {"loss.cross_view_weight": 1.0, "loss.motion_weight": 1.0},
    ),
    labels=("cross-view only", "motion only", "both"),
)

SPEC = StudySpec(
    name="loss_terms",
    question="Do both correspondence losses (cross-view and motion) matter?",
    sweeps=[TERMS],
    fixed=SMALL_BUDGET,
    verdict=best_vs_worst_verdict,
    x_label="loss terms",
)

if __name__ == "__main__":
    sys.exit(study_main(SPEC))

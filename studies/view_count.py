"""How much do SVT's local views (and a third global view) add?

python studies/view_count.py
python studies/view_count.py --grid views.num_global=2,3 --grid views.num_local=0,4
"""

import sys

from _common import SMALL_BUDGET

from svt_ray.studies import StudySpec, Sweep, best_vs_worst_verdict, study_main

SPEC = StudySpec(
    name="view_count",
    question="Does online kNN improve with more local views (0, 2, 4, 8) at equal clips seen?",
    sweeps=[Sweep("views.num_local", (0, 2, 4, 8))],
    fixed=SMALL_BUDGET,
    verdict=best_vs_worst_verdict,
    x_label="local views",
)

if __name__ == "__main__":
    sys.exit(study_main(SPEC))

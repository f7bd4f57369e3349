"""How much do SVT's local views, and a third global view, add at equal clips seen?

Two globals with 0, 2, 4 or 8 locals, and three globals with 4 locals: one sweep whose
settings move both counts, so the grid stays five trials on a laptop. For the full cross:

    python studies/view_count.py
    python studies/view_count.py --grid views.num_global=2,3 --grid views.num_local=0,2,4,8
"""

import sys

from svt_ray.studies import SMALL_BUDGET, StudySpec, Sweep, study_main
from svt_ray.study_report import best_vs_worst_verdict

COUNTS = ((2, 0), (2, 2), (2, 4), (2, 8), (3, 4))
VIEWS = Sweep(
    "views",
    tuple({"views.num_global": g, "views.num_local": n} for g, n in COUNTS),
    labels=tuple(f"{g}G+{n}L" for g, n in COUNTS),
)

SPEC = StudySpec(
    name="view_count",
    question="Does online kNN improve with more local views (0, 2, 4, 8) or a third global view "
    "at equal clips seen?",
    sweeps=[VIEWS],
    fixed=SMALL_BUDGET,
    verdict=best_vs_worst_verdict,
    x_label="views (G global + L local)",
)

if __name__ == "__main__":
    sys.exit(study_main(SPEC))

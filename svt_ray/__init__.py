"""svt-ray: Self-supervised Video Transformer (SVT) pretraining and scaling studies on Ray."""

import os
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("svt-ray")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "unknown"

# Lines Ray's own actors print on every run that no svt-ray user can act on: the note that
# Ray Train's and Ray Data's actors keep constructor arguments in the object store (Ray issue
# 53727), Ray Train's use of Ray Data's deprecated `exclude_resources` (the warning and the
# source line Python prints under it), and Ray Data's hint on turning on the progress bars
# svt-ray turned off (`svt_ray.data.set_progress_bars` silences the driver's copy; this one
# comes from the stream's coordinator actor).
RAY_NOISE_REGEX = (
    r"has constructor arguments in the object store and max_restarts > 0"
    r"|ExecutionOptions\.exclude_resources` is deprecated"
    r"|^\s*self\.exclude_resources = exclude_resources\s*$"
    r"|Progress bars disabled\. To enable, set `ray\.data\.DataContext"
)


def quiet_ray_logs() -> None:
    """[entry points: `svt-ray`, `python -m data_prep`, a study script] Ray skips the
    forwarded worker lines that match RAY_DEDUP_LOGS_SKIP_REGEX, read when `ray` is first
    imported (no svt_ray module imports it at import time): `RAY_NOISE_REGEX`, unless the user
    set the variable (even empty: every line)."""
    os.environ.setdefault("RAY_DEDUP_LOGS_SKIP_REGEX", RAY_NOISE_REGEX)

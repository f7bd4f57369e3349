"""`--help` of the argparse commands (data_prep, `svt-ray synth`, the study scripts).

Kept free of the project's other modules: data_prep imports it without the training config.
"""

from __future__ import annotations

import argparse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each option's default is shown, unless it has none, it is an on/off switch that is
    off, or its help already says what happens without it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        switch = (
            action.nargs == 0
            and action.default is False
            and not isinstance(action, argparse.BooleanOptionalAction)  # --x/--no-x: say which
        )
        if switch or action.default in (None, [], argparse.SUPPRESS):
            return action.help
        if "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)

"""`svt-ray`: the command line of the project.

Every command that takes an experiment builds it the same way: --preset, then --config (a
YAML file), then --set section.field=value overrides, validated in one place. A bad value
prints one line naming the field and exits with status 2, never a traceback.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

from svt_ray.config import PRESETS, ConfigError, ExperimentConfig, load_config

app = typer.Typer(
    name="svt-ray",
    help="Self-supervised Video Transformer (SVT) pretraining and scaling studies on Ray.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
config_app = typer.Typer(help="Inspect and validate experiment configs.", no_args_is_help=True)
app.add_typer(config_app, name="config")

PresetOption = Annotated[
    str, typer.Option("--preset", "-p", help=f"Starting recipe: {', '.join(PRESETS)}.")
]
ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="YAML file of overrides, applied after the preset."),
]
SetOption = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        "-s",
        help="Dotted override applied last, e.g. --set views.num_local=4 (repeatable; YAML values).",
    ),
]


def fail(message: str, code: int = 2) -> typer.Exit:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    return typer.Exit(code)


def build_config(preset: str, config: Path | None, overrides: list[str] | None) -> ExperimentConfig:
    try:
        return load_config(preset, config, overrides or [])
    except ConfigError as error:
        raise fail(str(error)) from None


@config_app.command("show")
def config_show(
    preset: PresetOption = "paper",
    config: ConfigOption = None,
    overrides: SetOption = None,
    clips: Annotated[
        int | None,
        typer.Option(help="Training clips per epoch: also print the derived batch, lr and steps."),
    ] = None,
) -> None:
    """Print the validated config as YAML (with --clips, the resolved one)."""
    experiment = build_config(preset, config, overrides)
    if clips is not None:
        try:
            experiment = experiment.resolve(clips)
        except ConfigError as error:
            raise fail(str(error)) from None
    typer.echo(experiment.dump(), nl=False)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        app()
    except ConfigError as error:  # a config problem raised deeper than the option parsing
        typer.secho(f"error: {error}", err=True, fg=typer.colors.RED)
        sys.exit(2)


if __name__ == "__main__":
    main()

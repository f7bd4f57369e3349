"""A pretrained backbone for downstream use: `svt-ray export` and `load_backbone`.

A training checkpoint (`state.pt`) holds both networks, their heads, the optimiser and the loss
centre. Downstream work (fine-tuning, feature extraction) needs one backbone and how to build
it. `export_backbone` writes just that, loadable with `torch.load(..., weights_only=True)`:

    {"format": "svt-ray backbone v1",
     "backbone": {name: tensor},  # TimeSformer weights, no head; keys as the reference SVT
                                  # code's VisionTransformer (its ckpt["teacher"] without the
                                  # `backbone.` prefix): cls_token, pos_embed, time_embed,
                                  # patch_embed.proj.*, blocks.N.{norm1,attn,temporal_norm1,
                                  # temporal_attn,temporal_fc,norm2,mlp}.*, norm.*
     "config": {...},             # the run's resolved experiment config (architecture, the
                                  # normalisation mean/std in config["views"])
     "source": {"checkpoint": str, "step": int, "weights": "teacher" | "student"},
     "svt_ray_version": str,      # the svt-ray that wrote the file (training checkpoints and
                                  # run.json record theirs too)
     "teacher" | "student": {"backbone." + name: tensor},  # the same tensors again (stored
     "backbone." + name: tensor, ...,                        # once), for the reference loaders
     "model": {name: tensor, "head.weight": (0, d), "head.bias": (0,)}}

The last three let the code the paper evaluated and fine-tuned with read the file:
- SVT's `eval_knn.py` (`--pretrained_weights FILE`) takes `ckpt["teacher"]` (the key is fixed
  in its code, whatever `--checkpoint_key` says), keeps the keys that start with `backbone.`
  with that prefix cut, and loads with `strict=False`: a dict without the prefix loads nothing,
  silently. An SVT training checkpoint's teacher (DINO's MultiCropWrapper: `backbone.*` and
  `head.*`) has it; so does this file's, without the head. Exporting the student stores it
  under `student`: eval_knn.py fails on it with a KeyError, not with random weights;
- SVT's `eval_linear.py` (its latest version) does the same with the file's top-level keys:
  hence the `backbone.*` keys beside the others;
- DINO's `load_pretrained_weights` (`--checkpoint_key teacher`) strips `module.` and
  `backbone.` from `ckpt[key]`: it reads the same dict;
- facebookresearch/TimeSformer (`TIMESFORMER.PRETRAINED_MODEL FILE`; SVT's fine-tuning used
  its recipe) takes `ckpt["model"]` and drops `head.*` when its row count differs from the
  number of classes; it raises KeyError without a head, so the file carries an empty one
  (0 classes), always dropped. Its filter reshapes the patch weights to 3 input channels:
  a backbone with `model.frame_difference` (6 channels) does not fit that code.

SVT evaluates and fine-tunes the teacher (svt_spec.md §5); the student is there for comparison.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import torch

from svt_ray import __version__
from svt_ray.config import ExperimentConfig, validate_recorded
from svt_ray.model import TimeSformer, build_backbone

FORMAT = "svt-ray backbone v1"
WEIGHTS = ("teacher", "student")


@dataclass(frozen=True)
class ExportSummary:
    path: Path | str  # a local file or a filesystem URI
    step: int
    weights: str
    tensors: int
    parameters: int
    num_bytes: int

    def line(self) -> str:
        return (
            f"{self.weights} backbone of step {self.step}: {self.tensors} tensors, "
            f"{self.parameters / 1e6:.2f} M parameters, {self.num_bytes / 1e6:.1f} MB -> {self.path}"
        )


def backbone_state(checkpoint: dict, weights: str = "teacher") -> dict[str, torch.Tensor]:
    """One network's backbone weights from a training checkpoint, `backbone.` prefix removed;
    an exported file's own backbone (whichever network it was made from)."""
    if checkpoint.get("format") == FORMAT:
        return checkpoint["backbone"]
    if weights not in WEIGHTS:
        raise ValueError(f"weights: {weights!r} is not one of {', '.join(WEIGHTS)}")
    prefix = "backbone."
    state = checkpoint[weights]
    return {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}


def _empty_head(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A 0-class classifier: TimeSformer's loader needs `head.weight` to exist and drops it
    whenever its row count differs from the classes wanted, which 0 always does."""
    width = state["norm.weight"].shape[0]
    return {"head.weight": torch.zeros(0, width), "head.bias": torch.zeros(0)}


def _file_key(filesystem, path: str) -> str:
    """One name for one file whatever it was called by: a local file's resolved path (links,
    `..` and file:// URIs alike), or the filesystem's kind and normalised path (s3://b/k)."""
    import os
    import posixpath

    from pyarrow import fs as pafs

    if isinstance(filesystem, pafs.LocalFileSystem):
        return os.path.realpath(path)
    return f"{filesystem.type_name}://{posixpath.normpath(path)}"


def _check_out(checkpoint: str, out: str) -> None:
    """Refuse, before the checkpoint is read, an `out` that cannot be written or that is the
    checkpoint's own state.pt (the export would replace the training state)."""
    from pyarrow import fs as pafs

    from data_prep.inputs import resolve_filesystem
    from svt_ray.evaluate import checkpoint_file

    if not out.strip():
        raise ValueError("OUT is empty: name the file to write, e.g. svt_backbone.pt")
    filesystem, path = resolve_filesystem(out)
    if filesystem.get_file_info(path).type == pafs.FileType.Directory:
        raise ValueError(
            f"{out} is a folder: name a file inside it, e.g. {out.rstrip('/')}/svt_backbone.pt"
        )
    if isinstance(filesystem, pafs.LocalFileSystem):  # the nearest existing parent a folder
        parent = Path(path).parent
        while not parent.exists():
            parent = parent.parent
        if not parent.is_dir():
            raise ValueError(
                f"cannot write {out}: {parent} is a file, not a folder; name a file in a folder"
            )
    source_filesystem, source = checkpoint_file(checkpoint)  # what load_state reads
    if _file_key(filesystem, path) == _file_key(source_filesystem, source):
        raise ValueError(
            f"{out} is the checkpoint's own file: the export would replace its training state "
            "(both networks, the optimiser, the loss centre); name another file, e.g. "
            "svt_backbone.pt"
        )


def export_backbone(checkpoint: str, out: str | Path, weights: str = "teacher") -> ExportSummary:
    """Write the `weights` backbone of `checkpoint` (a checkpoint folder, its state.pt, or a
    filesystem URI of either) to `out` (a file or a URI such as s3://bucket/svt_backbone.pt),
    atomically: a failed write leaves no partial file under `out`'s name. An `out` that is the
    checkpoint's own file, or a folder, is a ValueError; a failed write, an OSError naming it."""
    from data_prep.shards import write_file
    from svt_ray.evaluate import load_state

    _check_out(checkpoint, str(out))
    saved = load_state(checkpoint)
    if saved.get("format") == FORMAT:
        raise ValueError(
            f"{checkpoint} is already an exported backbone ({saved['source']['weights']} of "
            f"{saved['source']['checkpoint']}); export from a training checkpoint"
        )
    if not {"config", "step", weights} <= set(saved):
        raise ValueError(
            f"{checkpoint} is not an svt-ray training checkpoint (it holds "
            f"{', '.join(map(str, list(saved)[:6]))}); pass a checkpoint_NNNNNNNN folder or "
            "its state.pt"
        )
    state = {key: value.detach().clone() for key, value in backbone_state(saved, weights).items()}
    config = validate_recorded(
        saved["config"],
        str(checkpoint),
        "Export it with the svt-ray version that trained it",
        saved.get("svt_ray_version"),
    )
    build_backbone(config).load_state_dict(state)  # the file must rebuild: fail here, not later
    reference_layout = {f"backbone.{key}": value for key, value in state.items()}
    payload = {
        "format": FORMAT,
        "backbone": state,
        "config": config.model_dump(mode="json"),
        "source": {"checkpoint": checkpoint, "step": int(saved["step"]), "weights": weights},
        "svt_ray_version": __version__,
        # the same tensors again (torch.save writes each storage once), as the reference
        # loaders find them (see the module's docstring)
        weights: reference_layout,
        **reference_layout,
        "model": {**state, **_empty_head(state)},
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    try:
        write_file(str(out), buffer.getvalue())  # a local file or any URI; temp + rename
    except OSError as error:
        raise OSError(f"cannot write {out}: {error}") from error
    return ExportSummary(
        path=out,
        step=int(saved["step"]),
        weights=weights,
        tensors=len(state),
        parameters=sum(value.numel() for value in state.values()),
        num_bytes=buffer.tell(),
    )


def _mismatch(model: torch.nn.Module, weights: dict[str, torch.Tensor], shown: int = 3) -> str:
    """The first keys on which `weights` and `model` disagree, in a few words."""
    expected = model.state_dict()
    missing = [key for key in expected if key not in weights]
    unexpected = [key for key in weights if key not in expected]
    shapes = [
        f"{key} is {tuple(weights[key].shape)}, the model's {tuple(value.shape)}"
        for key, value in expected.items()
        if key in weights and weights[key].shape != value.shape
    ]
    parts = []
    for label, items in (("missing ", missing), ("unexpected ", unexpected), ("", shapes)):
        if items:
            more = f" and {len(items) - shown} more" if len(items) > shown else ""
            parts.append(label + ", ".join(items[:shown]) + more)
    return "; ".join(parts)


def load_backbone(path: str | Path) -> tuple[TimeSformer, ExperimentConfig]:
    """The backbone of an `export_backbone` file, built and loaded, in eval mode, with the
    config it was trained with (`config.views.mean` / `.std` normalise its input). A file this
    version cannot build is a ValueError that names it and says why."""
    from svt_ray.evaluate import load_state

    try:
        payload = load_state(str(path))  # a file or a URI; weights only
    except FileNotFoundError:
        raise FileNotFoundError(f"no file at {path}") from None
    found = payload.get("format")
    if isinstance(found, str) and found.startswith("svt-ray backbone") and found != FORMAT:
        raise ValueError(
            f"{path}: an svt-ray backbone of format {found!r}; this version reads {FORMAT!r}: "
            "load it with the svt-ray version that wrote it, or export the checkpoint again "
            "with this one"
        )
    if found != FORMAT:
        raise ValueError(
            f"{path}: not an svt-ray backbone file (no format {FORMAT!r}); make one with "
            "`svt-ray export CHECKPOINT OUT`, or read a training checkpoint with "
            "svt_ray.evaluate.load_state"
        )
    config = validate_recorded(
        payload["config"],
        str(path),
        "Load it with that version, or export the checkpoint again with this one",
        payload.get("svt_ray_version"),
    )
    backbone = build_backbone(config)
    try:
        backbone.load_state_dict(payload["backbone"])
    except RuntimeError:  # torch's message lists every key: hundreds of characters
        raise ValueError(
            f"{path}: its weights do not fit the architecture of its config "
            f"({_mismatch(backbone, payload['backbone'])})"
        ) from None
    return backbone.eval(), config

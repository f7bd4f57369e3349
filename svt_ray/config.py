"""One typed description of an SVT experiment.

Defaults < preset YAML < user YAML < dotted overrides (`--set views.num_local=4`), the
order dinov2's `utils/config.py` uses. Every field is documented and validated; unknown keys
are rejected; checks that span several fields (a view that needs more frames than its span
holds, a batch that does not split over the workers) name the fields and the allowed range.
`resolve()` derives everything that depends on the batch size, the world size or the
dataset size in one place, so it can be logged and dumped.

The schema defaults are the paper's recipe (design.md §3); presets live in `configs/*.yaml`.
"""

from __future__ import annotations

import copy
import math
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

PRESETS = ("paper", "reference_code", "tiny")

PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0.0)]
NonNegativeInt = Annotated[int, Field(ge=0)]
Probability = Annotated[float, Field(ge=0.0, le=1.0)]
UnitInterval = Annotated[float, Field(gt=0.0, le=1.0)]


def _takes(annotation: Any, *kinds: type) -> bool:
    """Whether a field's type takes one of `kinds` anywhere in it (`int | None`, `list[int]`)."""
    return annotation in kinds or any(_takes(arg, *kinds) for arg in get_args(annotation))


class ConfigError(ValueError):
    """A configuration problem, phrased as one line that names the field."""


class _Section(BaseModel):
    # use_attribute_docstrings: the string under each field is its description (json schema,
    # and the test that every field has one). allow_inf_nan=False: `.inf` and `.nan` parse as
    # YAML floats, and an infinite epoch count or learning rate is never meant.
    model_config = ConfigDict(
        extra="forbid",
        validate_assignment=True,
        frozen=False,
        use_attribute_docstrings=True,
        allow_inf_nan=False,
    )

    @field_validator("*", mode="before")
    @classmethod
    def _no_yes_no_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        """YAML reads true/false, yes/no and on/off as booleans, which pydantic takes as 1 and
        0 for a number: `--set optim.batch_size=yes` trained with a batch of 1. And an empty
        value (`--set data.path=`, `--data ''`) reads as null: "Input should be a valid string"
        said nothing of what was given."""
        field = cls.model_fields.get(info.field_name or "")
        if value is None and field is not None and not _takes(field.annotation, type(None)):
            raise ValueError("got an empty value (or YAML's null / ~); give one")
        items = value if isinstance(value, list | tuple) else [value]
        bools = any(isinstance(item, bool) for item in items)
        if bools and field is not None and not _takes(field.annotation, bool):  # bool | None
            wanted = "give a number" if _takes(field.annotation, int, float) else "quote it: 'yes'"
            raise ValueError(
                f"got a true/false value (YAML reads yes/no, on/off and true/false as one); "
                f"{wanted}"
            )
        return value


class ModelConfig(_Section):
    """TimeSformer backbone with divided space-time attention, plus the DINO head."""

    patch_size: PositiveInt = 16
    "Side of the square patches (pixels); view sizes must be multiples of it."
    embed_dim: PositiveInt = 768
    "Token width."
    depth: PositiveInt = 12
    "Number of divided space-time blocks."
    num_heads: PositiveInt = 12
    "Attention heads; embed_dim must be divisible by it."
    mlp_ratio: Annotated[float, Field(gt=0)] = 4.0
    "Hidden width of the block MLP as a multiple of embed_dim."
    qkv_bias: bool = True
    "Bias in the qkv projections (TimeSformer/timm ViT-B/16 use one)."
    drop_path_rate: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.1
    "Stochastic depth of the student, rising linearly over the blocks. The teacher runs in eval mode."
    image_size: PositiveInt | None = None
    "Grid the spatial position table is stored for; None = the global view size (224 in the paper)."
    num_frames: PositiveInt | None = None
    "Frames the temporal position table is stored for; None = the largest frame count of any view."
    spatial_pos_interpolation: Literal["nearest", "bilinear", "bicubic"] = "nearest"
    "How the spatial table is resized to a view's grid (the reference code uses nearest)."
    temporal_pos_interpolation: Literal["nearest", "linear"] = "nearest"
    "How the temporal table is resized to a view's frame count (the reference code uses nearest)."
    attention: Literal["sdpa", "naive"] = "sdpa"
    "sdpa = F.scaled_dot_product_attention (flash/memory-efficient kernels); naive = explicit softmax."
    activation_checkpointing: bool = False
    "Recompute each block in the backward pass: less memory, about a third more compute."
    view_batching: Literal["view", "shape", "resolution"] = "resolution"
    (
        "Which views share a backbone call: view = one call per view (the reference code); "
        "shape = views of equal frames and size (DINO's MultiCropWrapper); resolution = all "
        "views of one frame size, spatial attention and MLP over all their frames in one call, "
        "temporal attention per frame count. The same function either way; fewer, larger calls."
    )
    head_hidden_dim: PositiveInt = 2048
    "Hidden width of the DINO head MLP."
    head_bottleneck_dim: PositiveInt = 256
    "Width of the L2-normalised bottleneck before the weight-normalised last layer."
    head_out_dim: PositiveInt = 65536
    "Number of prototypes (the softmax width of the loss)."
    head_layers: Annotated[int, Field(ge=1, le=5)] = 3
    "Linear layers in the head MLP before the bottleneck output."
    norm_last_layer: bool = True
    "Freeze the weight-norm gain of the last layer at 1 (DINO default; stabilises training)."
    init_from: str | None = None
    (
        "Local image-ViT checkpoint (DINO or timm ViT layout) loaded into the spatial weights. "
        "Made absolute and checked on the driver; on a cluster every node needs the file at "
        "that path (a file mount of ray_cluster.yaml)."
    )
    frame_difference: bool = False
    (
        "Give the patch embedding each frame's difference to the view's previous frame as 3 "
        "more channels: a 2-frame temporal kernel the paper's per-frame patches (svt_spec "
        "§1.1) do not have. On in the tiny preset, off in paper and reference_code; measured in "
        "docs/demo.md."
    )
    difference_init_scale: PositiveFloat = 1.0
    (
        "With frame_difference: multiply PyTorch's default init of the difference filters by "
        "this, so the random network leans on motion from the start (docs/demo.md)."
    )

    @model_validator(mode="after")
    def _heads_divide_width(self) -> ModelConfig:
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"model.embed_dim={self.embed_dim} must be divisible by "
                f"model.num_heads={self.num_heads}"
            )
        return self


def span_frames(fraction: float, window: int) -> int:
    """Source frames a view spread over `fraction` of a `window`-frame clip window covers
    (`views.global_span`, `views.local_span`): what the sampler uses and the check refuses
    more frames than."""
    return round(fraction * window)


class ViewsConfig(_Section):
    """The SVT views of one clip: global and local spatiotemporal crops (svt_spec §2)."""

    clip_frames: PositiveInt = 150
    """Source frames of the window views are cut from: the "video" whose ~90% (global) and 1/8
    (local) the paper's spans are. 150 is 10 s at data_prep's 15 fps cap, a Kinetics clip; the
    reference decodes 8.5 s (128 frames, its preset's value) and spreads its globals over it."""
    num_global: Annotated[int, Field(ge=1, le=8)] = 2
    "Global views; the teacher sees only these."
    global_frames: list[PositiveInt] = Field(default_factory=lambda: [8, 16])
    "Frame counts given to the global views, spread over them in order (paper: 8 and 16)."
    global_size: PositiveInt = 224
    "Side of a global view in pixels."
    global_span: UnitInterval = 0.9
    "Fraction of the clip window a global view's frames are spread over."
    global_window: Literal["random", "reference"] = "random"
    (
        "random = an independent random span per global view (paper); reference = the "
        "reference code's windows: globals over [0, L-5] and [5, L], locals over L//8 + 1 "
        "frames (L: clip_frames)."
    )
    global_crop_scale: tuple[UnitInterval, UnitInterval] = (0.4, 1.0)
    "Area fraction range of a global crop."
    num_local: Annotated[int, Field(ge=0, le=32)] = 8
    "Local views; the student sees them, the teacher does not."
    local_frames: list[PositiveInt] = Field(default_factory=lambda: [2, 4, 8, 16])
    "Frame counts given to the local views, spread evenly (8 locals: 2,2,4,4,8,8,16,16)."
    local_size: PositiveInt = 96
    "Side of a local view in pixels."
    local_span: UnitInterval = 0.125
    "Fraction of the clip window a local view's frames are spread over (paper: 1/8)."
    local_crop_scale: tuple[UnitInterval, UnitInterval] = (0.05, 0.4)
    "Area fraction range of a local crop."
    aspect_ratio: tuple[Annotated[float, Field(gt=0)], Annotated[float, Field(gt=0)]] = (
        3 / 4,
        4 / 3,
    )
    "Aspect ratio range of crops, sampled log-uniformly."
    interpolation: Literal["bilinear", "bicubic"] = "bilinear"
    "Resize filter used when cutting views (antialiased, on uint8)."
    flip_p: Probability = 0.5
    "Horizontal flip probability; set 0 when classes depend on left/right direction."
    color_jitter_p: Probability = 0.8
    "Probability of colour jitter per view."
    brightness: Annotated[float, Field(ge=0, lt=1)] = 0.4
    "Colour jitter: the brightness factor is drawn from [1 - x, 1 + x] (blend with black)."
    contrast: Annotated[float, Field(ge=0, lt=1)] = 0.4
    "Colour jitter: the contrast factor is drawn from [1 - x, 1 + x] (blend with mean grey)."
    saturation: Annotated[float, Field(ge=0, lt=1)] = 0.2
    "Colour jitter: the saturation factor is drawn from [1 - x, 1 + x] (blend with grey)."
    hue: Annotated[float, Field(ge=0, le=0.5)] = 0.0
    "Colour jitter: a hue turn drawn from [-x, x] turns, in YIQ (the reference uses none)."
    grayscale_p: Probability = 0.2
    "Probability of converting a view to grayscale."
    global_blur_p: list[Probability] = Field(default_factory=lambda: [1.0, 0.1], min_length=1)
    "Gaussian-blur probability per global view, cycled (DINO: 1.0 then 0.1)."
    local_blur_p: Probability = 0.5
    "Gaussian-blur probability of a local view."
    blur_sigma: tuple[Annotated[float, Field(gt=0)], Annotated[float, Field(gt=0)]] = (0.1, 2.0)
    "Range of the blur's sigma in pixels (DINO's values, used for 224 and 96 px views alike)."
    global_solarize_p: list[Probability] = Field(default_factory=lambda: [0.0, 0.2], min_length=1)
    "Solarize probability per global view, cycled (DINO: 0 then 0.2)."
    local_solarize_p: Probability = 0.0
    "Solarize probability of a local view."
    solarize_threshold: Probability = 0.5
    "Pixel value (0..1) above which solarize inverts."
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    "Per-channel mean subtracted from the [0, 1] pixels (ImageNet's, as in pretraining)."
    std: tuple[PositiveFloat, PositiveFloat, PositiveFloat] = (0.229, 0.224, 0.225)
    "Per-channel std the centred pixels are divided by (ImageNet's)."

    @model_validator(mode="after")
    def _consistent(self) -> ViewsConfig:
        for name in ("global_crop_scale", "local_crop_scale", "aspect_ratio", "blur_sigma"):
            low, high = getattr(self, name)
            if low > high:
                raise ValueError(
                    f"views.{name}=({low}, {high}): the first value must be <= the second"
                )
        if not self.global_frames:
            raise ValueError("views.global_frames must list at least one frame count")
        if self.num_local and not self.local_frames:
            raise ValueError(
                "views.local_frames must list at least one frame count when num_local > 0"
            )
        for kind, frames, span in (
            ("global", self.global_frames, self.global_span),
            ("local", self.local_frames if self.num_local else [], self.local_span),
        ):
            available = span_frames(span, self.clip_frames)
            for count in frames:
                if count > available:
                    raise ValueError(
                        f"views.{kind}_frames: a {count}-frame view needs a span of >= {count} "
                        f"source frames, but views.{kind}_span x views.clip_frames = "
                        f"{span} x {self.clip_frames} = {available}; raise views.clip_frames to "
                        f">= {math.ceil(count / span)} or use <= {available} frames"
                    )
        return self

    def global_frame_counts(self) -> list[int]:
        """Frame count of each global view, in slot order."""
        return _spread(self.global_frames, self.num_global)

    def local_frame_counts(self) -> list[int]:
        """Frame count of each local view, in slot order (8 locals of [2,4,8,16]: 2,2,4,4,...)."""
        return _spread(self.local_frames, self.num_local)


def _spread(choices: list[int], count: int) -> list[int]:
    """Assign `count` slots to `choices` evenly and in order (choices may repeat or run short)."""
    return [choices[(i * len(choices)) // count] for i in range(count)] if count else []


class LossConfig(_Section):
    """SVT loss: DINO cross-entropy between teacher (globals) and student (all views)."""

    cross_view_weight: Annotated[float, Field(ge=0)] = 1.0
    "Weight of the cross-view terms (teacher global -> student local); 0 switches them off."
    motion_weight: Annotated[float, Field(ge=0)] = 1.0
    "Weight of the motion terms (teacher global -> student other global); 0 switches them off."
    student_temp: Annotated[float, Field(gt=0)] = 0.1
    "Temperature of the student's softmax over the prototypes."
    teacher_temp: Annotated[float, Field(gt=0)] = 0.04
    "Teacher temperature after warm-up."
    warmup_teacher_temp: Annotated[float, Field(gt=0)] = 0.04
    "Teacher temperature at step 0 (DINO warms it up linearly)."
    warmup_teacher_temp_epochs: Annotated[float, Field(ge=0)] = 0.0
    "Epochs of linear teacher-temperature warm-up."
    centering: Literal["ema", "sinkhorn_knopp"] = "ema"
    "ema = DINO centring with momentum; sinkhorn_knopp = DINOv2's batch-balanced teacher targets."
    center_momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9
    "EMA momentum of the centre subtracted from the teacher's logits (centering=ema)."
    sinkhorn_iterations: PositiveInt = 3
    "Row and column normalisations of Sinkhorn-Knopp (centering=sinkhorn_knopp)."
    koleo_weight: Annotated[float, Field(ge=0)] = 0.0
    "Weight of DINOv2's KoLeo regulariser on the student's global-view features (spreads them out)."

    @model_validator(mode="after")
    def _some_term(self) -> LossConfig:
        if self.cross_view_weight == 0 and self.motion_weight == 0:
            raise ValueError(
                "loss.cross_view_weight and loss.motion_weight are both 0: at least one must be > 0"
            )
        return self


class OptimConfig(_Section):
    """AdamW, schedules and batch (svt_spec §4). Epoch lengths become steps in resolve()."""

    batch_size: PositiveInt = 32
    "Global batch (clips per step over all workers)."
    accumulation_steps: PositiveInt = 1
    (
        "Pieces each worker's share of the batch is cut into, each through forward and backward "
        "on its own, with one optimiser step for all: the memory of a smaller batch, the "
        "gradients of the whole one (but KoLeo and Sinkhorn-Knopp centring see one piece at a "
        "time). For a per-worker batch that does not fit on the device."
    )
    epochs: Annotated[float, Field(gt=0)] = 20
    "Length of training in passes over the dataset."
    base_lr: Annotated[float, Field(gt=0)] = 5e-4
    "Peak learning rate for a batch of lr_reference_batch; scaled linearly with the batch."
    lr_reference_batch: PositiveInt = 256
    "The batch base_lr is given for: peak lr = base_lr x batch_size / lr_reference_batch."
    min_lr: Annotated[float, Field(ge=0)] = 1e-6
    "Learning rate at the end of the cosine decay."
    warmup_epochs: Annotated[float, Field(ge=0)] = 10
    "Epochs of linear lr warm-up from 0 (DINO default; a 20-epoch run spends half of it warming)."
    weight_decay: Annotated[float, Field(ge=0)] = 0.04
    "Weight decay at step 0 (biases and 1-D parameters such as norms get none, as in DINO)."
    weight_decay_end: Annotated[float, Field(ge=0)] = 0.4
    "Weight decay follows a cosine from weight_decay to weight_decay_end."
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = (
        0.9,
        0.999,
    )
    "AdamW's (beta1, beta2)."
    momentum_teacher: Annotated[float, Field(ge=0, le=1)] = 0.996
    "EMA momentum of the teacher at step 0."
    momentum_teacher_end: Annotated[float, Field(ge=0, le=1)] = 1.0
    "EMA momentum of the teacher follows a cosine from momentum_teacher to momentum_teacher_end."
    clip_grad: Annotated[float, Field(ge=0)] = 3.0
    "Gradient clipping threshold; 0 disables clipping."
    clip_mode: Literal["per_parameter", "global"] = "per_parameter"
    "per_parameter clips each tensor's norm separately (DINO); global clips the total norm."
    freeze_last_layer_epochs: Annotated[float, Field(ge=0)] = 1
    "Epochs during which the head's last layer gets no update (DINO stabiliser)."


class DataConfig(_Section):
    """Where clips come from and how they are decoded."""

    path: str | None = None
    (
        "Dataset directory or URI (s3://, gs://, local) of data_prep shards. pretrain and eval "
        "require one; the study scripts make the synthetic default when it is None."
    )
    decoder: Literal["decord", "pyav"] = "decord"
    "Decoder of the training and evaluation clips (pyav: the slower reference backend)."
    decode_threads: PositiveInt = 1
    "Threads per decoder (one decoder per Ray Data actor)."
    short_side: PositiveInt = 256
    (
        "Short side the shards are expected to have (data_prep --short-side): views larger "
        "than it are refused. The loader neither checks nor resizes to it; the demo and the "
        "studies make their synthetic clips this size."
    )
    shuffle_buffer: Annotated[int, Field(ge=0)] = 64
    (
        "Clips in each worker's local shuffle buffer (0: none), on top of the order of the "
        "64-clip slices of the shards, drawn anew each epoch from train.seed (with "
        "deterministic, the slices keep a fixed order)."
    )
    decode_cpus: Annotated[float, Field(gt=0)] = 1.0
    "CPUs reserved by each decode actor."
    decode_actors: PositiveInt | None = None
    "Maximum decode actors; None = what the cluster's free CPUs allow."
    prefetch_batches: PositiveInt = 2
    (
        "Batches each training worker fetches ahead of its step. More absorb a slow decode (or, "
        "with preserve_order, a straggler's hold-back) at the cost of host memory: each batch "
        "holds per-worker batch x the views' uint8 bytes (paper views: 5.3 MB a clip)."
    )
    preserve_order: bool = True
    (
        "Clips reach the workers in the order of the seeded shuffles, whichever decode actor "
        "finishes first: a run repeated with its seed ends with the same weights. false lets "
        "a straggling decode actor's clips be overtaken: the order was free up to 16 decode "
        "actors per training worker and cost up to 31% of training time at 32 (docs/data.md); "
        "worth it when data_wait_fraction is high."
    )
    deterministic: bool = False
    (
        "Views that depend on (seed, clip id) only and one stream per epoch, in order: a run "
        "resumed mid-run ends with the weights of an uninterrupted one (exact-resume tests); "
        "every epoch then sees the same views."
    )


class ScalingSettings(_Section):
    """How many Ray Train workers, and what each reserves."""

    num_workers: PositiveInt = 1
    "Ray Train workers (DDP ranks); the global batch is split evenly over them."
    gpus_per_worker: Annotated[float, Field(ge=0)] = 0
    "GPUs each worker reserves; 0 trains on CPU (gloo). The default: say 1 to use GPUs."
    cpus_per_worker: Annotated[float, Field(gt=0)] = 1
    "CPUs each worker reserves; also its torch thread count on CPU."
    address: str | None = None
    (
        "Ray cluster address ('auto' for the cluster this machine belongs to); None joins "
        "RAY_ADDRESS (set in a `ray job submit` job) or starts a local Ray."
    )


def unusable_folder_name(name: str) -> bool:
    """Whether `name` cannot name one folder (empty, `.`, `..`, or holding / or \\): run and
    study names are folder names (`bad/name` made nested folders)."""
    return not name or name in (".", "..") or "/" in name or "\\" in name


def _folder_name(name: str) -> str:
    """A run name is its folder's name."""
    if unusable_folder_name(name):
        raise ValueError(
            f"{name!r}: a run name is its folder's name under storage_path; give a name "
            "without / or \\"
        )
    return name


class TrainSettings(_Section):
    """Run-level settings of a pretraining run."""

    seed: Annotated[int, Field(ge=0, lt=2**32)] = 0
    "Seeds the weights, the views and the data order; part of the default run name."
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    "auto = bf16 autocast on GPU, fp32 on CPU."
    compile: bool | None = None
    (
        "torch.compile each backbone block (one graph per view layout, no per-step "
        "recompiles); None = on for CUDA, off on CPU (compiling on CPU takes minutes)."
    )
    checkpoint_every: PositiveInt = 500
    "Steps between checkpoints (one is always written at the end)."
    keep_checkpoints: NonNegativeInt = 2
    (
        "Latest checkpoints kept in the run's folder; older ones are deleted as new ones land "
        "(a paper-preset checkpoint, both networks and AdamW, is about 2 GB). 0 = keep all "
        "(to evaluate intermediate ones)."
    )
    log_every: PositiveInt = 1
    "Steps between metric logs (MLflow and metrics.jsonl)."
    progress_every_s: Annotated[float, Field(ge=0)] = 30.0
    (
        "Seconds between progress lines on the console (rank 0: step, loss, online kNN, "
        "clips/s, data wait, ETA; also at the first and the last step); 0 prints none."
    )
    report_every: PositiveInt = 50
    (
        "Steps between metric reports to Ray Train / Tune, besides those at checkpoints and "
        "online kNN evaluations (what Tune's schedulers act on). Each report synchronises the "
        "workers with the Train controller: about 0.9 s on a 2-core machine, so not every step."
    )
    storage_path: str = "svt_runs"
    "Checkpoint root: a local folder, NFS or an object-store URI."
    run_name: Annotated[str, AfterValidator(_folder_name)] | None = None
    (
        "Stable id of the run (resume uses it) and its folder's name under storage_path, so "
        "without / or \\; None = derived from the preset and seed."
    )
    max_failures: Annotated[int, Field(ge=-1)] = 2
    "Worker-group restarts from the last checkpoint before the run gives up (-1 = forever)."
    wait_for_workers_s: Annotated[float, Field(gt=0)] | None = 1200
    (
        "Seconds, in all over the run, that Ray Train may wait for room to place the workers: "
        "at the start, and after a failure such as a lost node while the autoscaler replaces "
        "it. Then the run stops, keeping its checkpoints, for `pretrain --resume`. Counted in "
        "steps of Ray Train's worker-group start timeout (RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S, "
        "60 s by default). None = wait forever (Ray's default)."
    )


class TrackingConfig(_Section):
    """MLflow."""

    tracking_uri: str = "sqlite:///mlflow.db"
    "MLflow 3's default store in the working directory, so a bare `mlflow ui` finds it."
    experiment: str = "svt-ray"
    "MLflow experiment of pretraining runs (the studies use their own, svt-ray-studies)."
    flush_timeout_s: Annotated[float, Field(ge=0.0)] = 60.0
    (
        "How long rank 0 waits at the end of a run for MLflow to take what it held back in an "
        "outage; the rest stays in metrics.jsonl (`svt-ray tracking sync` sends it later). A "
        "new run waits as long (10 s at least) for its params, and does not start without them."
    )


class EvalSettings(_Section):
    """Frozen-feature evaluation (svt_spec §5): kNN, linear probe, slow-fast features."""

    clip_frames: PositiveInt = 8
    "Frames of the single evaluation clip, spread over the centred clip window."
    clip_size: PositiveInt = 224
    "Side of the single evaluation clip (short side resized, centre crop)."
    slow_fast: bool = True
    "Also evaluate slow-fast features: mean CLS of the single (slow) clip and a fast clip."
    fast_frames: PositiveInt = 64
    "Frames of the fast clip of slow-fast evaluation (paper: 64)."
    fast_size: PositiveInt = 96
    "Side of the fast clip (paper: 96 px)."
    knn_k: PositiveInt = 20
    "Neighbours that vote in DINO's weighted kNN."
    knn_temperature: Annotated[float, Field(gt=0)] = 0.07
    "Temperature of the kNN votes, exp(similarity / T)."
    linear_epochs: PositiveInt = 100
    "Epochs of the linear probe on frozen, precomputed features."
    train_split: str = "train"
    "Split used as the kNN memory bank and the probe's training set."
    test_split: str = "val"
    "Split the accuracies are measured on."
    online_every: NonNegativeInt = 0
    "Online kNN of the teacher every this many steps during pretraining (0: off)."
    online_every_clips: NonNegativeInt = 0
    (
        "The same in clips seen (overrides online_every when > 0): one spacing for every batch "
        "size, rounded to whole steps (400 clips: 400 at batch 8 or 16, 384 at 32 or 64)."
    )
    online_bank_clips: PositiveInt = 1000
    "Clips of train_split in the online kNN memory bank (a fixed subset, held in memory)."
    online_query_clips: PositiveInt = 500
    "Clips of test_split the online kNN accuracy is measured on."

    @model_validator(mode="after")
    def _held_out(self) -> EvalSettings:
        if self.train_split == self.test_split:
            raise ValueError(
                f"eval.test_split={self.test_split!r} is also eval.train_split: every query "
                "would find itself in the kNN bank (100% top-1 whatever the features) and the "
                "probe would be scored on what it trained on; name a held-out split (prepare "
                "one with `svt-ray prep ... --val-fraction 0.1`)"
            )
        return self


class Derived(_Section):
    """Values computed by resolve(); never set them by hand."""

    world_size: PositiveInt
    "Training workers: scaling.num_workers."
    per_worker_batch: PositiveInt
    "optim.batch_size / world_size."
    lr: float
    "Peak lr = optim.base_lr x optim.batch_size / optim.lr_reference_batch."
    min_lr: float
    "The lr at the end of the cosine: optim.min_lr, not scaled."
    steps_per_epoch: PositiveInt
    (
        "clips_per_epoch // optim.batch_size. A run trains total_steps x optim.batch_size "
        "clips: by default batches run across epoch ends (an epoch's remainder carries into the "
        "next epoch); with data.deterministic each epoch's last partial batch is dropped."
    )
    total_steps: PositiveInt
    "optim.epochs x steps_per_epoch, rounded."
    warmup_steps: int
    "optim.warmup_epochs in steps."
    freeze_last_layer_steps: int
    "optim.freeze_last_layer_epochs in steps."
    teacher_temp_warmup_steps: int
    "loss.warmup_teacher_temp_epochs in steps."
    clips_per_epoch: PositiveInt
    "Training clips of the dataset (its manifest's train split)."


class ExperimentConfig(_Section):
    """A whole SVT experiment."""

    preset: str = "paper"
    "The preset this config started from (recorded for tracking)."
    model: ModelConfig = Field(default_factory=ModelConfig)
    "The network: backbone and head."
    views: ViewsConfig = Field(default_factory=ViewsConfig)
    "What each view is: frames, crops, augmentations."
    loss: LossConfig = Field(default_factory=LossConfig)
    "The SVT loss and its targets."
    optim: OptimConfig = Field(default_factory=OptimConfig)
    "Batch, optimiser and schedules."
    data: DataConfig = Field(default_factory=DataConfig)
    "Where clips come from and how they are decoded."
    scaling: ScalingSettings = Field(default_factory=ScalingSettings)
    "Ray Train workers and what each reserves."
    train: TrainSettings = Field(default_factory=TrainSettings)
    "The run: seed, precision, checkpoints, storage, failures."
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    "MLflow."
    eval: EvalSettings = Field(default_factory=EvalSettings)
    "Frozen-feature evaluation, online and at the end."
    derived: Derived | None = None
    "Filled by resolve()."

    @model_validator(mode="after")
    def _cross_section(self) -> ExperimentConfig:
        views, model = self.views, self.model
        for name in ("global_size", "local_size"):
            size = getattr(views, name)
            if size % model.patch_size:
                raise ValueError(
                    f"views.{name}={size} must be a multiple of model.patch_size={model.patch_size}"
                )
            if size > self.data.short_side:
                raise ValueError(
                    f"views.{name}={size} is larger than the source frames' short side "
                    f"data.short_side={self.data.short_side}: use <= {self.data.short_side}"
                )
        if model.image_size is not None and model.image_size % model.patch_size:
            raise ValueError(
                f"model.image_size={model.image_size} must be a multiple of "
                f"model.patch_size={model.patch_size}"
            )
        if self.optim.batch_size % self.scaling.num_workers:
            fits = [n for n in range(1, min(self.optim.batch_size, 64) + 1)
                    if self.optim.batch_size % n == 0]  # fmt: skip
            raise ValueError(
                f"optim.batch_size={self.optim.batch_size} does not split over "
                f"scaling.num_workers={self.scaling.num_workers}: use a multiple of "
                f"{self.scaling.num_workers}, or a number of workers that divides it "
                f"({', '.join(map(str, fits))})"
            )
        pieces = self.scaling.num_workers * self.optim.accumulation_steps
        if self.optim.batch_size % pieces:
            raise ValueError(
                f"optim.batch_size={self.optim.batch_size} does not split into "
                f"optim.accumulation_steps={self.optim.accumulation_steps} pieces on each of "
                f"scaling.num_workers={self.scaling.num_workers}: use a multiple of {pieces}"
            )
        has_cross_view = self.loss.cross_view_weight > 0 and views.num_local > 0
        has_motion = self.loss.motion_weight > 0 and views.num_global > 1
        if not (has_cross_view or has_motion):
            raise ValueError(
                "no loss term has a pair of views to compare: need loss.cross_view_weight > 0 "
                "with views.num_local >= 1, or loss.motion_weight > 0 with views.num_global >= 2 "
                f"(now num_global={views.num_global}, num_local={views.num_local}, "
                f"cross_view_weight={self.loss.cross_view_weight}, "
                f"motion_weight={self.loss.motion_weight})"
            )
        return self

    # -- derived values ----------------------------------------------------------------------

    @property
    def image_size(self) -> int:
        return self.model.image_size or self.views.global_size

    @property
    def num_frames(self) -> int:
        return self.model.num_frames or max(
            self.views.global_frame_counts() + self.views.local_frame_counts()
        )

    def resolve(self, clips_per_epoch: int) -> ExperimentConfig:
        """Fill `derived` and the model's table sizes; everything batch- or data-dependent.

        `clips_per_epoch` is the number of training clips (from the dataset manifest).
        """
        if clips_per_epoch <= 0:
            raise ConfigError(f"the dataset has {clips_per_epoch} training clips; need at least 1")
        optim, world = self.optim, self.scaling.num_workers
        if clips_per_epoch < optim.batch_size:  # no full batch: every worker would fail
            raise ConfigError(
                f"optim.batch_size: a global batch of {optim.batch_size} clips needs at least as "
                f"many training clips, and the dataset has {clips_per_epoch}; lower "
                "optim.batch_size or prepare more clips"
            )
        steps_per_epoch = clips_per_epoch // optim.batch_size
        lr = optim.base_lr * optim.batch_size / optim.lr_reference_batch
        if optim.min_lr > lr:  # the cosine would raise the lr from its peak
            raise ConfigError(
                f"optim.min_lr: {optim.min_lr:g} is above the peak lr {lr:g} (optim.base_lr "
                f"{optim.base_lr:g} x batch {optim.batch_size} / optim.lr_reference_batch "
                f"{optim.lr_reference_batch}); lower optim.min_lr"
            )
        resolved = self.model_copy(deep=True)
        resolved.model.image_size = self.image_size
        resolved.model.num_frames = self.num_frames
        resolved.derived = Derived(
            world_size=world,
            per_worker_batch=optim.batch_size // world,
            lr=lr,
            min_lr=optim.min_lr,
            steps_per_epoch=steps_per_epoch,
            total_steps=max(1, round(optim.epochs * steps_per_epoch)),
            warmup_steps=round(optim.warmup_epochs * steps_per_epoch),
            freeze_last_layer_steps=round(optim.freeze_last_layer_epochs * steps_per_epoch),
            teacher_temp_warmup_steps=round(self.loss.warmup_teacher_temp_epochs * steps_per_epoch),
            clips_per_epoch=clips_per_epoch,
        )
        return resolved

    def flat(self) -> dict[str, Any]:
        """Dotted key -> value, for MLflow params."""
        return flatten_tree(self.model_dump(mode="json"))

    def dump(self) -> str:
        """The config as YAML (what `svt-ray config show` prints and runs record)."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def flatten_tree(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted key -> value of a nested dict (a config as JSON)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_tree(value, f"{name}."))
        else:
            flat[name] = value
    return flat


# -- loading --------------------------------------------------------------------------------


def preset_dict(name: str) -> dict[str, Any]:
    """The raw mapping of a shipped preset (configs/<name>.yaml)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    text = resources.files("svt_ray").joinpath("configs", f"{name}.yaml").read_text()
    return yaml.safe_load(text) or {}


def _yaml_problem(error: yaml.YAMLError, lines: bool = True) -> str:
    """A YAML parser error in one line: what it met and where (PyYAML's own message quotes
    the text with a caret under it, over several lines)."""
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    mark = getattr(error, "problem_mark", None)
    if mark is None:
        return problem
    where = (
        f"line {mark.line + 1}, column {mark.column + 1}" if lines else f"column {mark.column + 1}"
    )
    return f"{problem} at {where}"


def parse_override(item: str) -> tuple[list[str], Any]:
    """`views.num_local=4` -> (['views', 'num_local'], 4); the value is parsed as YAML."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} must look like section.field=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as error:
        raise ConfigError(
            f"override {item!r}: the value is not valid YAML ({_yaml_problem(error, False)} of "
            f"{raw.strip()!r}); lists are written [2, 4], and a string with : or # in quotes"
        ) from None
    return key.strip().split("."), value


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_config(
    preset: str | None = None,
    config_file: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    base: dict[str, Any] | None = None,
) -> ExperimentConfig:
    """Build a validated config: schema defaults < preset < YAML file < dotted overrides.
    `base`, a config as JSON (a checkpoint's), takes the preset's place. The preset is
    `preset`, else the file's `preset:` line (`svt-ray config show` writes one), else paper;
    the two disagreeing is an error. A file's `derived` section (a run's config.yaml) is
    recomputed, not read.

    Raises ConfigError with one line naming the offending field.
    """
    path, loaded = None, {}  # the --config file and its mapping: its unknown keys name it
    if config_file is not None:
        path = Path(config_file)
        loaded = _read_config_file(path)
        preset = _file_preset(preset, loaded, path) if base is None else preset
    if base is not None:
        tree = {key: value for key, value in copy.deepcopy(base).items() if key != "derived"}
    else:
        preset = preset or "paper"
        tree = preset_dict(preset)
        tree["preset"] = preset
    tree = _merge(tree, {key: value for key, value in loaded.items() if key != "derived"})
    overridden = []  # the keys --set gave: an error in one of them is not the file's
    for item in overrides:
        keys, value = parse_override(item)
        overridden.append(keys)
        if keys == ["preset"]:  # the base, chosen before any setting
            raise ConfigError(f"override {item!r}: choose the preset with --preset")
        if keys[0] == "derived":
            raise ConfigError(
                f"override {item!r}: derived.* is computed from the other settings and the "
                "data (per-worker batch, lr, steps); set those instead"
            )
        node = tree
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {key} is not a section")
        if isinstance(value, dict) and isinstance(node.get(keys[-1]), dict):
            node[keys[-1]] = _merge(node[keys[-1]], value)  # as a file's section merges
        else:
            node[keys[-1]] = value
    return validate_config(tree, path, _without(loaded, overridden))


def _without(tree: dict[str, Any], paths: list[list[str]]) -> dict[str, Any]:
    """`tree` less the keys at `paths`: what of a file's mapping stands after --set items
    (an error in a key an override set is the override's, not the file's)."""
    kept = copy.deepcopy(tree)
    for keys in paths:
        node = kept
        for key in keys[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(keys[-1], None)
    return kept


def _read_config_file(path: Path) -> dict[str, Any]:
    """The mapping of a --config YAML file; a missing, unreadable or non-mapping one is a
    ConfigError naming it."""
    if not path.is_file():
        raise ConfigError(
            f"config file {path} is a folder: name a YAML file"
            if path.is_dir()
            else f"config file {path} does not exist"
        )
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as error:
        raise ConfigError(
            f"config file {path} is not UTF-8 text (byte {error.object[error.start]:#04x} at "
            f"offset {error.start}); save it as UTF-8 YAML"
        ) from None
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {path} is not valid YAML: {_yaml_problem(error)}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections")
    return loaded


def _file_preset(preset: str | None, loaded: dict[str, Any], path: Path) -> str | None:
    """The preset a config file names (`preset: tiny`), checked against `preset` (--preset):
    the file's line was shown, and ignored, while the paper preset's model was built."""
    named = loaded.get("preset")
    if named is None:
        return preset
    if named not in PRESETS:
        raise ConfigError(
            f"config file {path}: preset {named!r} is not one of {', '.join(PRESETS)}"
        )
    if preset is not None and preset != named:
        raise ConfigError(
            f"--preset {preset} and config file {path} (preset: {named}) disagree; drop "
            "--preset, or change the file's preset line"
        )
    return named


def validate_config(
    tree: dict[str, Any], config_file: Path | None = None, file_tree: dict[str, Any] | None = None
) -> ExperimentConfig:
    """Validate a raw mapping; turn pydantic's report into one ConfigError line per problem.
    An unknown key that `config_file` (whose mapping is `file_tree`) holds names that file."""
    try:
        return ExperimentConfig.model_validate(tree)
    except ValidationError as error:
        raise ConfigError(format_validation_error(error, config_file, file_tree)) from None


# Where and how a run runs, not what it learns: `pretrain --resume` may change these.
RESUMABLE_SETTINGS = frozenset({
    "scaling.num_workers", "scaling.address", "scaling.gpus_per_worker",
    "scaling.cpus_per_worker", "tracking.tracking_uri", "tracking.flush_timeout_s",
    "train.storage_path", "train.run_name", "train.max_failures", "train.wait_for_workers_s",
    "train.progress_every_s", "train.keep_checkpoints", "data.path", "data.decode_actors",
    "data.decode_cpus", "data.decode_threads", "data.prefetch_batches", "data.preserve_order",
    "model.init_from",  # where the starting weights are: read at step 0 only
})  # fmt: skip


def resumable_settings_text() -> str:
    """The `--set` keys `pretrain --resume` takes, for its help and its refusals (the run's
    name is the one it resumes, so not among them)."""
    return ", ".join(sorted(RESUMABLE_SETTINGS - {"train.run_name"}))


def validate_recorded(
    tree: dict[str, Any], what: str, then: str, written_by: str | None = None
) -> ExperimentConfig:
    """A config that a run, checkpoint or export recorded (`written_by`: the svt-ray version
    that wrote it, where recorded). One this version's schema rejects was written by another
    version (a renamed or removed field): said so, with the versions and `then` (what to do),
    not only which field."""
    from svt_ray import __version__

    try:
        return validate_config(tree)
    except ConfigError as error:
        by = (
            "another svt-ray version"
            if not written_by or written_by == "unknown"
            else f"another build of svt-ray {written_by}"
            if written_by == __version__
            else f"svt-ray {written_by}"
        )
        raise ConfigError(
            f"{what}: its recorded config was written by {by} and does not fit this one "
            f"({__version__}): {error}. {then}"
        ) from None


def format_validation_error(
    error: ValidationError, config_file: Path | None = None, file_tree: dict[str, Any] | None = None
) -> str:
    lines = []
    for item in error.errors():
        loc = item["loc"]
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] in ("missing", "too_long") and (needed := _tuple_length(loc)):
            loc = loc[:-1] if isinstance(loc[-1], int) else loc  # (..., field, missing index)
            given = item["input"]
            count = f", not {len(given)}" if isinstance(given, (list, tuple)) else ""
            message = f"give {needed} values{count}"
        location = ".".join(str(part) for part in loc)
        if item["type"] == "extra_forbidden":
            section = ".".join(str(part) for part in loc[:-1]) or "the top level"
            message = f"unknown key (not a field of {section}{_did_you_mean(loc)})"
            if config_file is not None and _holds_key(file_tree or {}, loc):
                location = f"{config_file}: {location}"
        elif message.startswith(tuple(f"{name}." for name in ExperimentConfig.model_fields)):
            location = ""
        elif config_file is not None and _holds_key(file_tree or {}, loc):
            location = f"{config_file}: {location}"  # a value of the file's
        lines.append(f"{location}: {message}" if location else message)
    return "; ".join(dict.fromkeys(lines))  # a list short by two: one line, not two alike


def _section_model(section: list[str]) -> type[BaseModel] | None:
    """The model of the config section at `section` (its path of field names), None where a
    name is not a section."""
    model: type[BaseModel] | None = ExperimentConfig
    for part in section:
        field = model.model_fields.get(part) if model else None
        if field is None:
            return None
        kinds = (field.annotation, *get_args(field.annotation))
        model = next(
            (kind for kind in kinds if isinstance(kind, type) and issubclass(kind, BaseModel)), None
        )
    return model


def _tuple_length(location: tuple) -> int | None:
    """The length of the fixed-length tuple field at `location` (its index, if any, ignored),
    None for any other field."""
    *section, name = [str(part) for part in location if not isinstance(part, int)] or [""]
    model = _section_model(section)
    field = model.model_fields.get(name) if model else None
    if field is None or get_origin(field.annotation) is not tuple:
        return None
    kinds = get_args(field.annotation)
    return None if Ellipsis in kinds else len(kinds)


def _did_you_mean(location: tuple) -> str:
    """The fields an unknown key was likely meant to be (a typo, or a word of a field's
    name: `lr` -> `base_lr`), or where to see them when none is close."""
    import difflib

    *section, key = (str(part) for part in location)
    model = _section_model(section)
    if model is None:
        return ""
    names = [name for name in model.model_fields if name != "derived"]  # derived: computed
    close = difflib.get_close_matches(key, names, n=3)
    close += [name for name in names if key in name.split("_") and name not in close]
    close = ["".join(f"{part}." for part in section) + name for name in close[:3]]
    if close:
        options = close[-1] if len(close) == 1 else f"{', '.join(close[:-1])} or {close[-1]}"
        return f"; did you mean {options}?"
    listed = ", ".join(names)  # a short list is worth printing; a long one is a wall
    return (
        f"; its fields are {listed}" if len(listed) <= 80 else "; `svt-ray config show` lists them"
    )


def _holds_key(tree: dict[str, Any], location: tuple) -> bool:
    """Whether a nested mapping has a value at a pydantic error location."""
    for part in location:
        if not isinstance(tree, dict) or part not in tree:
            return False
        tree = tree[part]
    return True

"""TimeSformer with divided space-time attention, the DINO head, and SVT's multi-view forward.

References: TimeSformer `timesformer/models/vit.py` (divided block, CLS flow), kahnchana/svt
`models/timesformer.py` (dynamic position embeddings), DINO `vision_transformer.py` (DINOHead)
and `utils.py` (MultiCropWrapper). Parameter names follow timm/TimeSformer so image-ViT
checkpoints (DINO, timm) load into the spatial weights by name.

Axis names used in every rearrange: b batch, t frames, n spatial tokens per frame, d width,
h heads, v views, gh/gw patch grid.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange, reduce, repeat
from torch import nn
from torch.utils.checkpoint import checkpoint

from svt_ray.config import ConfigError, ExperimentConfig

RGB = 3
"""Colour channels of a frame; a frame-difference patch embedding takes 2 x RGB."""

logger = logging.getLogger(__name__)


# (clips, frames) of each group of videos that share a backbone call, in packing order.
FrameLayout = tuple[tuple[int, int], ...]


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch of a clip with probability p.

    Eval mode returns before p is looked at: a compiled block specialises on the branch it
    took, and blocks of different p (0 in the first) would compile a graph each for the
    teacher and the evaluation too.
    """

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def scales(
        self, like: torch.Tensor, layout: FrameLayout
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """One keep/drop factor per clip (B, 1, 1) and the same per frame (F, 1, 1); None = off.
        The MLP branch's draw: the reference drops it per clip."""
        if not self.training or self.p == 0.0:
            return None, None
        keep = 1.0 - self.p
        clips = sum(count for count, _ in layout)
        per_clip = like.new_empty((clips, 1, 1)).bernoulli_(keep) / keep
        return per_clip, clips_to_frames(per_clip, layout)

    def per_frame(self, like: torch.Tensor) -> torch.Tensor | None:
        """A factor per frame (F, 1, 1): the spatial branch's draw, as the reference drops it on
        (B·T)×(1+HW)×D (svt_spec §1.2). None = off."""
        if not self.training or self.p == 0.0:
            return None
        keep = 1.0 - self.p
        return like.new_empty((like.shape[0], 1, 1)).bernoulli_(keep) / keep

    def per_position(self, like: torch.Tensor, layout: FrameLayout) -> torch.Tensor | None:
        """A factor per (clip, spatial position), the same for all the clip's frames
        (F, n, 1): the temporal branch's draw, as the reference drops it on (B·H·W)×T×D.
        None = off."""
        if not self.training or self.p == 0.0:
            return None
        keep = 1.0 - self.p
        positions = like.shape[1]
        groups = [
            like.new_empty((clips, 1, positions, 1)).bernoulli_(keep).expand(-1, frames, -1, -1)
            for clips, frames in layout
        ]
        return torch.cat([g.reshape(-1, positions, 1) for g in groups]) / keep


def _scaled(x: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    return x if scale is None else x * scale


def clips_to_frames(per_clip: torch.Tensor, layout: FrameLayout) -> torch.Tensor:
    """(B, ...) one row per clip -> (F, ...) the row repeated for each of the clip's frames."""
    parts = per_clip.split([clips for clips, _ in layout])
    repeated = [
        repeat(part, "b ... -> (b t) ...", t=frames)
        for part, (_, frames) in zip(parts, layout, strict=True)
    ]
    return repeated[0] if len(repeated) == 1 else torch.cat(repeated)


def mean_over_frames(per_frame: torch.Tensor, layout: FrameLayout) -> torch.Tensor:
    """(F, ...) one row per frame -> (B, ...) the mean over each clip's frames."""
    parts = per_frame.split([clips * frames for clips, frames in layout])
    means = [
        reduce(part, "(b t) ... -> b ...", "mean", t=frames)
        for part, (_, frames) in zip(parts, layout, strict=True)
    ]
    return means[0] if len(means) == 1 else torch.cat(means)


class Attention(nn.Module):
    """Multi-head self-attention over the second axis of (batch, tokens, width)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, implementation: str = "sdpa"):
        super().__init__()
        self.num_heads = num_heads
        self.implementation = implementation
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def attend(self, qkv: torch.Tensor) -> torch.Tensor:
        """(batch, tokens, 3 * width) projected queries, keys, values -> (batch, tokens, width)."""
        qkv = rearrange(qkv, "b n (three h d) -> three b h n d", three=3, h=self.num_heads)
        q, k, v = qkv.unbind(0)
        if self.implementation == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v)
        else:  # explicit softmax, as the reference code does (the benchmark's baseline)
            weights = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
            out = weights.softmax(dim=-1) @ v
        return rearrange(out, "b h n d -> b n (h d)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.attend(self.qkv(x)))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DividedSpaceTimeBlock(nn.Module):
    """Temporal attention, then spatial attention with a per-frame CLS, then the MLP (svt_spec §1.2).

    Works on a packed set of clips that share a frame size but not a frame count: one CLS per
    clip `cls` (B, 1, d) and the patch tokens of every frame `patches` (F, n, d), grouped as
    `layout` says ((clips, frames) per group; within a group the frames are ordered (b t)).
    Temporal attention runs per group (its sequence length is the group's frame count); the
    projections, the spatial attention and the MLP run once over all frames. One group is the
    plain single-shape case.
    """

    def __init__(self, dim, num_heads, mlp_ratio, qkv_bias, drop_path, attention):
        super().__init__()
        self.temporal_norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.temporal_attn = Attention(dim, num_heads, qkv_bias, attention)
        self.temporal_fc = nn.Linear(dim, dim)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias, attention)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(
        self, cls: torch.Tensor, patches: torch.Tensor, layout: FrameLayout
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cls (B, 1, d), patches (F, n, d) -> the same shapes."""
        # Temporal attention: each spatial position attends over time; the CLS takes no part.
        qkv = self.temporal_attn.qkv(self.temporal_norm1(patches))  # (F, n, 3d)
        groups = qkv.split([clips * frames for clips, frames in layout])
        temporal = [
            rearrange(
                self.temporal_attn.attend(rearrange(group, "(b t) n c -> (b n) t c", t=frames)),
                "(b n) t d -> (b t) n d",
                b=clips,
            )
            for group, (clips, frames) in zip(groups, layout, strict=True)
        ]
        temporal = temporal[0] if len(temporal) == 1 else torch.cat(temporal)  # (F, n, d)
        temporal = self.temporal_attn.proj(temporal)
        position_scale = self.drop_path.per_position(patches, layout)
        patches = patches + self.temporal_fc(_scaled(temporal, position_scale))

        # Spatial attention: each frame attends over its positions plus a copy of the CLS;
        # the CLS outputs of a clip's frames are averaged into one CLS residual.
        frame_cls = clips_to_frames(cls, layout)  # (F, 1, d)
        spatial = self.attn(self.norm1(torch.cat([frame_cls, patches], dim=1)))  # (F, 1 + n, d)
        spatial = _scaled(spatial, self.drop_path.per_frame(spatial))  # frames drop apart
        # The spatial residual adds to the temporal output, not to the block input.
        cls = cls + mean_over_frames(spatial[:, :1], layout)
        patches = patches + spatial[:, 1:]

        clip_scale, frame_scale = self.drop_path.scales(patches, layout)
        cls = cls + _scaled(self.mlp(self.norm2(cls)), clip_scale)
        patches = patches + _scaled(self.mlp(self.norm2(patches)), frame_scale)
        return cls, patches


class PatchEmbed(nn.Module):
    """Per-frame 2D patches (no tubelets): (F, c, h, w) frames -> (F, n, d) tokens."""

    def __init__(self, patch_size: int, dim: int, in_channels: int = RGB):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, frames: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        h, w = frames.shape[-2:]
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(
                f"view size {h}x{w} is not a multiple of the patch size {self.patch_size}"
            )
        tokens = self.proj(frames)  # (F, d, gh, gw)
        grid_h, grid_w = tokens.shape[-2:]
        return rearrange(tokens, "f d gh gw -> f (gh gw) d"), grid_h, grid_w


def with_frame_difference(video: torch.Tensor) -> torch.Tensor:
    """(b, 3, t, h, w) -> (b, 6, t, h, w): each frame, then its difference to the view's
    previous frame (zero for the first), so every frame's patches see a 2-frame motion cue."""
    previous = torch.cat([video[:, :, :1], video[:, :, :-1]], dim=2)
    return torch.cat([video, video - previous], dim=1)


class TimeSformer(nn.Module):
    """The SVT backbone; `forward_features` returns the final CLS token (b, d)."""

    def __init__(
        self,
        *,
        patch_size: int = 16,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.1,
        image_size: int = 224,
        num_frames: int = 16,
        spatial_pos_interpolation: str = "nearest",
        temporal_pos_interpolation: str = "nearest",
        attention: str = "sdpa",
        activation_checkpointing: bool = False,
        frame_difference: bool = False,
        difference_init_scale: float = 1.0,
    ):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(
                f"image_size {image_size} is not a multiple of patch_size {patch_size}"
            )
        self.embed_dim = embed_dim
        self.grid = image_size // patch_size
        self.num_frames = num_frames
        self.spatial_pos_interpolation = spatial_pos_interpolation
        self.temporal_pos_interpolation = temporal_pos_interpolation
        self.activation_checkpointing = activation_checkpointing
        self.frame_difference = frame_difference
        self.difference_init_scale = difference_init_scale
        self.patch_embed = PatchEmbed(patch_size, embed_dim, 2 * RGB if frame_difference else RGB)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid**2, embed_dim))
        self.time_embed = nn.Parameter(torch.zeros(1, num_frames, embed_dim))
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(
            DividedSpaceTimeBlock(embed_dim, num_heads, mlp_ratio, qkv_bias, rate, attention)
            for rate in rates
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """TimeSformer init: trunc-normal weights, zero time table, zeroed temporal_fc."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.zeros_(self.time_embed)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        # Every temporal branch starts silent, so the model starts as a per-frame image ViT.
        for block in self.blocks:
            nn.init.zeros_(block.temporal_fc.weight)
            nn.init.zeros_(block.temporal_fc.bias)
        if self.frame_difference:
            # PyTorch's conv init (kept for the frame channels), with the difference filters
            # scaled: a random network then leans on motion from the start (docs/demo.md).
            self.patch_embed.proj.reset_parameters()
            with torch.no_grad():
                self.patch_embed.proj.weight[:, RGB:] *= self.difference_init_scale

    def spatial_pos_embed(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """(1, 1 + gh*gw, d): the stored table, resized to a view's patch grid."""
        if (grid_h, grid_w) == (self.grid, self.grid):
            return self.pos_embed
        cls_pos, patch_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        patch_pos = rearrange(patch_pos, "1 (gh gw) d -> 1 d gh gw", gh=self.grid)
        mode = self.spatial_pos_interpolation
        align = False if mode in ("bilinear", "bicubic") else None
        patch_pos = F.interpolate(patch_pos, size=(grid_h, grid_w), mode=mode, align_corners=align)
        return torch.cat([cls_pos, rearrange(patch_pos, "1 d gh gw -> 1 (gh gw) d")], dim=1)

    def temporal_pos_embed(self, frames: int) -> torch.Tensor:
        """(1, t, d): the stored table, resized to a view's frame count."""
        if frames == self.num_frames:
            return self.time_embed
        mode = self.temporal_pos_interpolation
        table = F.interpolate(
            rearrange(self.time_embed, "1 t d -> 1 d t"),
            size=frames,
            mode=mode,
            align_corners=False if mode == "linear" else None,
        )
        return rearrange(table, "1 d t -> 1 t d")

    def forward_features(self, video: torch.Tensor) -> torch.Tensor:
        """(b, 3, t, h, w) -> final CLS (b, d)."""
        return self.forward_features_packed([video])[0]

    def forward_features_packed(self, videos: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Videos of one frame size and any frame counts, (b_i, 3, t_i, h, w) -> CLS (b_i, d) each.

        All their frames share one patch-embedding call and, in every block, one spatial
        attention and one MLP call; temporal attention runs once per video (svt_spec §1.2).
        """
        sizes = {tuple(video.shape[-2:]) for video in videos}
        if len(sizes) != 1:
            raise ValueError(f"packed videos must share one frame size, got {sorted(sizes)}")
        layout = tuple((video.shape[0], video.shape[2]) for video in videos)
        if self.frame_difference:
            videos = [with_frame_difference(video) for video in videos]
        per_video = [rearrange(video, "b c t h w -> (b t) c h w") for video in videos]
        patches, grid_h, grid_w = self.patch_embed(
            per_video[0] if len(per_video) == 1 else torch.cat(per_video)
        )  # (F, n, d)
        pos = self.spatial_pos_embed(grid_h, grid_w)
        time = [
            repeat(self.temporal_pos_embed(frames)[0], "t d -> (b t) 1 d", b=clips)
            for clips, frames in layout
        ]  # (F, 1, d); the CLS gets no time embedding
        patches = patches + pos[:, 1:] + (time[0] if len(time) == 1 else torch.cat(time))
        total_clips = sum(clips for clips, _ in layout)
        # (B, 1, d), contiguous: the blocks' outputs are, and a compiled block specialises on
        # strides, so an expanded (stride 0) CLS would cost a second graph per layout.
        cls = (self.cls_token + pos[:, :1]).expand(total_clips, -1, -1).contiguous()
        for block in self.blocks:
            if self.activation_checkpointing and self.training:
                cls, patches = checkpoint(block, cls, patches, layout, use_reentrant=False)
            else:
                cls, patches = block(cls, patches, layout)
        return list(self.norm(cls[:, 0]).split([count for count, _ in layout]))

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        return self.forward_features(video)


class WeightNormLinear(nn.Module):
    """Bias-free linear layer with weight normalisation: w = g * v / ||v|| per output unit.

    With `learn_gain=False` (DINO's norm_last_layer) the gain is fixed at 1, so the layer is a
    set of unit-norm prototypes.
    """

    def __init__(self, in_features: int, out_features: int, learn_gain: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Linear's default, as DINO
        self.gain = nn.Parameter(torch.ones(out_features, 1)) if learn_gain else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = F.normalize(self.weight, dim=1)
        if self.gain is not None:
            weight = weight * self.gain
        return F.linear(x, weight)


class DINOHead(nn.Module):
    """MLP -> L2-normalised bottleneck -> weight-normalised prototypes (DINO, svt_spec §3.2)."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        num_layers: int = 3,
        norm_last_layer: bool = True,
    ):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i, (d_in, d_out) in enumerate(itertools.pairwise(dims)):
            layers.append(nn.Linear(d_in, d_out))
            if i < num_layers - 1:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        for module in self.mlp:
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim, learn_gain=not norm_last_layer)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        bottleneck = F.normalize(self.mlp(features), dim=-1)
        # The prototypes in fp32 whatever the autocast: logits are cosines in [-1, 1] that the
        # loss divides by temperatures down to 0.04, so bf16's 3 significant digits would
        # become errors of ~0.1 in the softmax's exponent. 256 x 65536 per clip and view: a
        # small share of the step.
        with torch.autocast(bottleneck.device.type, enabled=False):
            return self.last_layer(bottleneck.to(self.last_layer.weight.dtype))


@dataclass
class MultiViewOutput:
    logits: torch.Tensor  # (v, b, k): head outputs in view order
    features: torch.Tensor  # (v, b, d): backbone CLS in view order


VIEW_BATCHING = ("view", "shape", "resolution")


def group_views(shapes: Sequence[tuple[int, ...]], view_batching: str) -> list[list[list[int]]]:
    """Which views share a backbone call: calls -> videos of the call -> view indices.

    shapes are (c, t, h, w) per view. view: one call per view (the reference code);
    shape: views of equal (t, h, w) concatenated along the batch, one call per shape (DINO's
    MultiCropWrapper); resolution: one call per frame size (h, w), with a packed video per
    frame count inside it.
    """
    if view_batching not in VIEW_BATCHING:
        raise ValueError(f"view_batching must be one of {VIEW_BATCHING}, got {view_batching!r}")
    calls: dict[tuple[int, ...], dict[tuple[int, ...], list[int]]] = {}
    for index, (_, frames, height, width) in enumerate(shapes):
        if view_batching == "view":
            call, video = (index,), (index,)
        elif view_batching == "shape":
            call, video = (frames, height, width), ()
        else:
            call, video = (height, width), (frames,)
        calls.setdefault(call, {}).setdefault(video, []).append(index)
    return [list(videos.values()) for videos in calls.values()]


class SVTModel(nn.Module):
    """Backbone + head over a list of views of different shapes (DINO's MultiCropWrapper).

    `view_batching` decides which views share a backbone call (see `group_views`); views of
    one shape are always concatenated along the batch within a call. The head runs once on
    all CLS tokens. Every setting computes the same function.
    """

    def __init__(self, backbone: TimeSformer, head: DINOHead, view_batching: str = "shape"):
        super().__init__()
        if view_batching not in VIEW_BATCHING:
            raise ValueError(
                f"model.view_batching must be one of {VIEW_BATCHING}, got {view_batching!r}"
            )
        self.backbone = backbone
        self.head = head
        self.view_batching = view_batching

    def forward(self, views: Sequence[torch.Tensor]) -> MultiViewOutput:
        calls = group_views([tuple(view.shape[1:]) for view in views], self.view_batching)
        features: list[torch.Tensor | None] = [None] * len(views)
        for call in calls:
            videos = [
                torch.cat([views[i] for i in indices]) if len(indices) > 1 else views[indices[0]]
                for indices in call
            ]
            for indices, cls in zip(
                call, self.backbone.forward_features_packed(videos), strict=True
            ):
                for i, chunk in zip(indices, cls.chunk(len(indices)), strict=True):
                    features[i] = chunk
        stacked = torch.stack(features)  # (v, b, d)
        logits = self.head(rearrange(stacked, "v b d -> (v b) d"))
        return MultiViewOutput(rearrange(logits, "(v b) k -> v b k", v=len(views)), stacked)


def build_backbone(config: ExperimentConfig) -> TimeSformer:
    m = config.model
    return TimeSformer(
        patch_size=m.patch_size,
        embed_dim=m.embed_dim,
        depth=m.depth,
        num_heads=m.num_heads,
        mlp_ratio=m.mlp_ratio,
        qkv_bias=m.qkv_bias,
        drop_path_rate=m.drop_path_rate,
        image_size=config.image_size,
        num_frames=config.num_frames,
        spatial_pos_interpolation=m.spatial_pos_interpolation,
        temporal_pos_interpolation=m.temporal_pos_interpolation,
        attention=m.attention,
        activation_checkpointing=m.activation_checkpointing,
        frame_difference=m.frame_difference,
        difference_init_scale=m.difference_init_scale,
    )


def check_init_from(config: ExperimentConfig) -> None:
    """[driver] `model.init_from` made absolute and checked before any Ray worker loads it: a
    worker resolves a relative path in its own working directory, and a missing file would
    fail every worker (and each of their restarts) instead of the command."""
    path = config.model.init_from
    if not path:
        return
    if "://" in path:
        raise ConfigError(
            f"model.init_from: {path}: a local file is read, not a URI; copy it to every node"
        )
    absolute = Path(path).expanduser().resolve()
    if not absolute.is_file():
        raise ConfigError(
            f"model.init_from: no checkpoint at {absolute} (nothing is downloaded); give the "
            "path of a local DINO or timm ViT file"
        )
    config.model.init_from = str(absolute)


def initial_backbone(config: ExperimentConfig) -> TimeSformer:
    """The backbone a run starts from: random (seed the generator first), then
    `model.init_from`'s image ViT weights if set."""
    backbone = build_backbone(config)
    if config.model.init_from:
        report = load_image_vit(backbone, config.model.init_from)
        logger.info("%s", report.summary())
    return backbone


def build_model(config: ExperimentConfig) -> SVTModel:
    """The student (or teacher) network of an experiment; loads `model.init_from` if set."""
    m = config.model
    backbone = initial_backbone(config)
    head = DINOHead(
        m.embed_dim,
        m.head_out_dim,
        m.head_hidden_dim,
        m.head_bottleneck_dim,
        m.head_layers,
        m.norm_last_layer,
    )
    return SVTModel(backbone, head, m.view_batching)


# -- initialisation from an image ViT ----------------------------------------------------------

_WRAPPER_KEYS = ("teacher", "student", "model", "state_dict", "module")
_PREFIXES = ("module.", "backbone.", "model.", "encoder.")


@dataclass
class LoadReport:
    path: str
    loaded: list[str] = field(default_factory=list)
    resized: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # in the checkpoint, not used
    new: list[str] = field(default_factory=list)  # in the model, left at their initialisation

    def summary(self) -> str:
        def names(keys: list[str]) -> str:
            shown = ", ".join(
                sorted({k.split(".")[0] if k.startswith("blocks.") else k for k in keys})
            )
            return shown or "-"

        return (
            f"init_from {self.path}: loaded {len(self.loaded)} tensors "
            f"({len(self.resized)} resized: {names(self.resized)}); "
            f"skipped {len(self.skipped)} from the checkpoint ({names(self.skipped)}); "
            f"newly initialised {len(self.new)} "
            f"({_describe_new(self.new)})"
        )


def _describe_new(keys: list[str]) -> str:
    kinds = sorted({k.split(".")[2] if k.startswith("blocks.") else k for k in keys})
    return ", ".join(kinds) or "-"


def _unwrap_state_dict(raw: dict) -> dict[str, torch.Tensor]:
    """Find the backbone weights in DINO, timm or plain checkpoints."""
    state = raw
    for key in _WRAPPER_KEYS:  # DINO training checkpoints keep the teacher as the better one
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    cleaned = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            continue
        for prefix in _PREFIXES:
            while key.startswith(prefix):
                key = key[len(prefix) :]
        cleaned[key] = value
    return cleaned


def load_image_vit(backbone: TimeSformer, path: str | Path) -> LoadReport:
    """Load a local image-ViT checkpoint (DINO ViT-B/16 or timm layout) into the spatial weights.

    Patch embedding, CLS, spatial position table (resized to this model's grid), spatial
    attention, norms and MLPs load by name; the temporal attention, temporal_fc and the time
    table keep their fresh initialisation (the paper: temporal weights random). Nothing is
    downloaded.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model.init_from: no checkpoint at {path} (nothing is downloaded)")
    state = _unwrap_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    own = backbone.state_dict()
    report = LoadReport(str(path))
    update = {}
    for key, value in state.items():
        if key not in own:
            report.skipped.append(key)
            continue
        if key == "pos_embed" and value.shape != own[key].shape:
            value = _resize_pos_embed(value, backbone.grid)
            report.resized.append(key)
        if key == "patch_embed.proj.weight" and backbone.frame_difference and value.shape[1] == RGB:
            # RGB filters from the image model; the difference channels keep their init.
            value = torch.cat([value.to(own[key].dtype), own[key][:, RGB:]], dim=1)
            report.resized.append(key)
        if value.shape != own[key].shape:
            report.skipped.append(key)
            continue
        update[key] = value.to(own[key].dtype)
        report.loaded.append(key)
    report.new = [key for key in own if key not in update]
    if not update:
        raise ValueError(
            f"model.init_from: {path} holds no tensor that matches the backbone "
            f"(expected ViT names such as blocks.0.attn.qkv.weight, patch_embed.proj.weight)"
        )
    backbone.load_state_dict(update, strict=False)
    return report


def _resize_pos_embed(table: torch.Tensor, grid: int) -> torch.Tensor:
    """(1, 1 + g*g, d) of another grid -> (1, 1 + grid*grid, d), bicubic over the 2D grid."""
    source = math.isqrt(table.shape[1] - 1)
    if source * source != table.shape[1] - 1:
        return table  # not a square grid with one CLS: left to the shape check
    patch = rearrange(table[:, 1:], "1 (gh gw) d -> 1 d gh gw", gh=source)
    patch = F.interpolate(patch.float(), size=(grid, grid), mode="bicubic", align_corners=False)
    return torch.cat([table[:, :1], rearrange(patch, "1 d gh gw -> 1 (gh gw) d")], dim=1)

"""Frozen-feature evaluation: DINO's weighted kNN, a linear probe, and slow-fast features.

References: DINO `eval_knn.py` (weighted vote with exp(sim / T), k=20, T=0.07), SVT
`eval_linear.py` (linear layer on the frozen teacher CLS), and the paper's slow-fast
inference (svt_spec §5): one slow clip (8 x 224) and one fast clip (64 x 96) per video, CLS
averaged. kNN and the probe are plain torch on in-memory features; `evaluate_backbones`
extracts those features from labelled shards by Ray Data batch inference (`FeatureUDF`, the
pipelines in `svt_ray.data`); `OnlineKNN` scores the teacher during pretraining.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from svt_ray.config import ConfigError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Accuracy:
    top1: float  # percent
    top5: float  # percent


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor) -> Accuracy:
    """(n, c) class scores and (n,) labels -> top-1 and top-5 accuracy in percent."""
    k = min(5, scores.shape[1])
    top = scores.topk(k, dim=1).indices
    hits = top == labels[:, None]
    return Accuracy(
        top1=100.0 * hits[:, 0].float().mean().item(),
        top5=100.0 * hits.any(dim=1).float().mean().item(),
    )


def read_only_tensor(array: np.ndarray) -> torch.Tensor:
    """A tensor on a NumPy array that is only read. Ray Data hands out read-only arrays (on
    Arrow's memory), and torch warns, once a process, of writes that never come."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


def dense_labels(*labels: torch.Tensor) -> tuple[list[torch.Tensor], int]:
    """The labels as class indices 0..C-1 over the classes they hold, and C. A dataset's
    labels may be sparse (class folders named 3 and 1000 are labels 3 and 1000) and the
    scores have a column per class: `max + 1` columns made 1001 classes of two, a chance rate of
    0.1% and a top-5 below 100."""
    classes = torch.unique(torch.cat(labels))
    return [torch.searchsorted(classes, label) for label in labels], len(classes)


@torch.no_grad()
def knn_scores(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> torch.Tensor:
    """DINO's weighted kNN: each of the k nearest (cosine) neighbours votes exp(sim / T)."""
    train = F.normalize(train_features.float(), dim=1)
    test = F.normalize(test_features.float(), dim=1)
    k = min(k, train.shape[0])
    scores = []
    for start in range(0, test.shape[0], chunk):
        similarity = test[start : start + chunk] @ train.t()
        top_similarity, top_index = similarity.topk(k, dim=1)
        votes = torch.zeros(top_index.shape[0], num_classes, device=train.device)
        votes.scatter_add_(1, train_labels[top_index], (top_similarity / temperature).exp())
        scores.append(votes)
    return torch.cat(scores)


def knn_accuracy(
    train_features, train_labels, test_features, test_labels, num_classes, k=20, temperature=0.07
) -> Accuracy:
    scores = knn_scores(train_features, train_labels, test_features, num_classes, k, temperature)
    return topk_accuracy(scores, test_labels)


def linear_probe_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    epochs: int = 100,
    lr: float = 0.1,
    weight_decay: float = 0.0,
    batch_size: int = 256,
    seed: int = 0,
) -> Accuracy:
    """A linear layer on frozen, standardised features (SGD, momentum 0.9, cosine lr).

    Features are standardised with the training statistics, which makes one lr work for
    backbones of any scale; the layer is initialised N(0, 0.01) as in SVT's eval_linear.py.
    A feature constant over the training clips keeps its scale (as scikit-learn's scaler
    does): divided by a clamped std, its test values grew up to 1e6-fold against a weight that
    never trains away from its initial value, and swamped the logits.
    """
    generator = torch.Generator().manual_seed(seed)
    mean = train_features.float().mean(0, keepdim=True)
    std = train_features.float().std(0, keepdim=True, correction=0)
    std = torch.where(std > 1e-6, std, torch.ones_like(std))
    train = (train_features.float() - mean) / std
    test = (test_features.float() - mean) / std
    layer = nn.Linear(train.shape[1], num_classes)
    with torch.no_grad():
        layer.weight.normal_(0.0, 0.01, generator=generator)
        layer.bias.zero_()
    optimizer = torch.optim.SGD(layer.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    steps_per_epoch = max(1, -(-train.shape[0] // batch_size))
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * steps_per_epoch)
    for _ in range(epochs):
        order = torch.randperm(train.shape[0], generator=generator)
        for start in range(0, train.shape[0], batch_size):
            index = order[start : start + batch_size]
            loss = F.cross_entropy(layer(train[index]), train_labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    with torch.no_grad():
        return topk_accuracy(layer(test), test_labels)


@dataclass(frozen=True)
class EvalResult:
    """Accuracies of one feature set (single clip or slow-fast)."""

    name: str
    knn: Accuracy
    linear: Accuracy
    train_clips: int = 0  # the clips the kNN bank and the probe were fitted on
    test_clips: int = 0  # the clips scored
    num_classes: int = 0

    def row(self) -> dict[str, float | str]:
        return {
            "features": self.name,
            "knn_top1": self.knn.top1,
            "knn_top5": self.knn.top5,
            "linear_top1": self.linear.top1,
            "linear_top5": self.linear.top5,
        }


def evaluate_features(
    name: str,
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    linear_epochs: int = 100,
) -> EvalResult:
    return EvalResult(
        name=name,
        knn=knn_accuracy(
            train_features, train_labels, test_features, test_labels, num_classes, k, temperature
        ),
        linear=linear_probe_accuracy(
            train_features, train_labels, test_features, test_labels, num_classes, linear_epochs
        ),
        train_clips=len(train_labels),
        test_clips=len(test_labels),
        num_classes=num_classes,
    )


def describe_evaluation(results: list[EvalResult], settings) -> str:
    """What an evaluation's table scores, in one line to print above it: how many clips of
    which split, how many classes and the chance rate a number is to be read against."""
    if not results:
        return ""
    first = results[0]
    classes = first.num_classes
    k = min(settings.knn_k, first.train_clips)  # the neighbours there are
    text = (
        f"{first.test_clips} {settings.test_split!r} clips, {classes} classes (chance "
        f"{100 / max(classes, 1):.1f}% top-1), scored by kNN (k={k}) and a linear "
        f"probe ({settings.linear_epochs} epochs) fitted on {first.train_clips} "
        f"{settings.train_split!r} clips"
    )
    if classes <= 5:
        text += f"; top-5 is 100 with {classes} classes"
    return text + ":"


def format_table(rows: list[dict[str, float | str]]) -> str:
    """A Markdown table of result rows (the same text goes to stdout and to MLflow)."""
    if not rows:
        return ""
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [f"{row[c]:.1f}" if isinstance(row[c], float) else str(row[c]) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


class FeatureExtractor:
    """Teacher-backbone CLS features of uint8 clips; slow-fast = mean of the two clips' CLS.

    Used as a Ray Data callable class (one model per actor) and directly in tests.
    """

    def __init__(self, backbone: nn.Module, mean, std, device: str = "cpu"):
        self.device = torch.device(device)
        self.backbone = backbone.to(self.device).eval()
        self.mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1, 1)
        self.std = torch.tensor(std, device=self.device).view(1, 3, 1, 1, 1)

    @torch.no_grad()
    def features(self, clips: torch.Tensor) -> torch.Tensor:
        """uint8 (b, 3, t, h, w) -> (b, d) CLS features."""
        x = clips.to(self.device, non_blocking=True).float().div_(255.0)
        return self.backbone.forward_features((x - self.mean) / self.std).float().cpu()


class OnlineKNN:
    """kNN top-1 / top-5 of a backbone on a fixed labelled subset held in memory.

    Built once per run (`from_config` decodes the clips), then called every
    `eval.online_every` steps on the teacher's backbone, so runs and studies can compare
    accuracy curves against clips seen. Uses the single evaluation clip (no slow-fast).
    """

    CACHE_FOLDER = "online_knn_clips"  # under train.storage_path, beside the runs

    def __init__(
        self,
        bank: dict[str, torch.Tensor],
        query: dict[str, torch.Tensor],
        mean,
        std,
        k: int = 20,
        temperature: float = 0.07,
        batch_size: int = 32,
    ):
        (bank_labels, query_labels), self.num_classes = dense_labels(bank["label"], query["label"])
        self.bank = {**bank, "label": bank_labels}
        self.query = {**query, "label": query_labels}
        self.mean, self.std = mean, std
        self.k, self.temperature, self.batch_size = k, temperature, batch_size

    @staticmethod
    def clip_sets(config) -> dict[str, dict]:
        """The bank's and the queries' clips: `data.eval_cache_settings` of each."""
        from svt_ray import data

        settings = config.eval
        common = {
            "clips": {"clip": (settings.clip_frames, settings.clip_size)},
            "window_frames": config.views.clip_frames,
            "decoder": config.data.decoder,
            "interpolation": config.views.interpolation,
        }
        return {
            "bank": data.eval_cache_settings(
                settings.train_split, max_clips=settings.online_bank_clips, **common
            ),
            "query": data.eval_cache_settings(
                settings.test_split, max_clips=settings.online_query_clips, **common
            ),
        }

    @classmethod
    def cache_folders(cls, config) -> dict[str, str]:
        """Where `prepare` keeps each set's decoded clips: `train.storage_path`/CACHE_FOLDER/
        a key of the dataset's contents and the clips' settings, so that the runs of a study
        (and any run on the same data and settings) share one decode."""
        from svt_ray import data
        from svt_ray.runs import join_uri, storage_root

        manifest = data.read_dataset_manifest(config.data.path)
        root = join_uri(storage_root(config.train.storage_path), cls.CACHE_FOLDER)
        return {
            name: join_uri(root, data.eval_cache_key(manifest, settings))
            for name, settings in cls.clip_sets(config).items()
        }

    @classmethod
    def prepare(cls, configs) -> list[dict[str, str]]:
        """On the driver, before training: decode the clips of each config (an ExperimentConfig
        or a list, a study's trials) into storage (`data.cache_eval_clips`: on Ray Data where
        they are many), unless they are there. Rank 0 then reads them at every start
        (`from_config`) instead of decoding thousands of clips one after another while the
        other workers wait. Returns each config's `cache_folders`."""
        from svt_ray import data

        configs = list(configs) if isinstance(configs, list | tuple) else [configs]
        folders = [cls.cache_folders(config) for config in configs]
        by_data: dict[tuple[str, float], dict[str, dict]] = {}
        for config, where in zip(configs, folders, strict=True):
            sets = by_data.setdefault((config.data.path, config.data.decode_cpus), {})
            for name, settings in cls.clip_sets(config).items():
                sets[where[name]] = settings
        for (data_path, decode_cpus), sets in by_data.items():
            missing = {f: s for f, s in sets.items() if data.read_eval_clips_record(f) is None}
            if missing:
                logger.info(
                    "online kNN: decoding up to %s clips of %s into %s, once for every run on "
                    "this data with these settings",
                    " + ".join(f"{s['max_clips']} {s['split']}" for s in missing.values()),
                    data_path, ", ".join(missing),
                )  # fmt: skip
                data.cache_eval_clips(data_path, missing, decode_cpus=decode_cpus)
        return folders

    @classmethod
    def from_config(cls, config, folders: dict[str, str] | None = None) -> OnlineKNN:
        """The clips `prepare` decoded into `folders` (its answer; by default where it puts
        them for `config`); decoded here, in this process, where it did not (a storage that
        this node does not see, a folder deleted since)."""
        from svt_ray import data

        folders = folders or cls.cache_folders(config)

        def load(name: str, settings: dict) -> dict[str, torch.Tensor]:
            columns = data.read_eval_clips(folders[name])
            if columns is None:
                logger.warning(
                    "online kNN: no decoded %s clips in %s; decoding %d in this process",
                    name, folders[name], settings["max_clips"],
                )  # fmt: skip
                columns = data.load_eval_clips(config.data.path, **settings)
            return {
                "clip": read_only_tensor(columns["clip"]),
                "label": read_only_tensor(columns["label"]),
            }

        sets = cls.clip_sets(config)
        return cls(
            load("bank", sets["bank"]),
            load("query", sets["query"]),
            config.views.mean,
            config.views.std,
            config.eval.knn_k,
            config.eval.knn_temperature,
        )

    @torch.no_grad()
    def features(self, backbone: nn.Module, clips: torch.Tensor) -> torch.Tensor:
        device = next(backbone.parameters()).device
        extractor = FeatureExtractor(backbone, self.mean, self.std, str(device))
        return torch.cat(
            [
                extractor.features(clips[i : i + self.batch_size])
                for i in range(0, len(clips), self.batch_size)
            ]
        )

    def __call__(self, backbone: nn.Module) -> Accuracy:
        """Accuracy of `backbone`'s CLS features; the backbone's train/eval mode is restored."""
        was_training = backbone.training
        try:
            bank = self.features(backbone, self.bank["clip"])
            query = self.features(backbone, self.query["clip"])
        finally:
            backbone.train(was_training)
        return knn_accuracy(
            bank,
            self.bank["label"],
            query,
            self.query["label"],
            self.num_classes,
            self.k,
            self.temperature,
        )


# -- evaluating a checkpoint on labelled shards ------------------------------------------------


class FeatureUDF:
    """Ray Data UDF: labelled clips -> CLS features of one or more backbones, plus the mean
    pixels of each clip's middle frame (the frame-only baseline). One model set per actor."""

    def __init__(
        self,
        config: dict,
        backbones: dict[str, str | None],
        clip_columns: list[str],
        pixel_grid: int = 8,
        device: str | None = None,
    ):
        from svt_ray.config import ExperimentConfig
        from svt_ray.export import backbone_state
        from svt_ray.model import build_backbone, initial_backbone

        experiment = ExperimentConfig.model_validate(config)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.extractors = {}
        for name, path in backbones.items():
            if path is None:  # the run's own starting point: its seed, and init_from if set
                torch.manual_seed(experiment.train.seed)
                backbone = initial_backbone(experiment)
            else:
                backbone = build_backbone(experiment)
                backbone.load_state_dict(backbone_state(load_state(path), "teacher"))
            self.extractors[name] = FeatureExtractor(
                backbone, experiment.views.mean, experiment.views.std, device
            )
        self.clip_columns = clip_columns
        self.pixel_grid = pixel_grid

    def __call__(self, batch: dict) -> dict:
        out = {"label": batch["label"], "clip_id": batch["clip_id"]}
        for column in self.clip_columns:
            clips = read_only_tensor(batch[column])
            for name, extractor in self.extractors.items():
                out[f"{name}/{column}"] = extractor.features(clips).numpy()
        first = read_only_tensor(batch[self.clip_columns[0]]).float()
        middle = first[:, :, first.shape[2] // 2]  # (b, 3, s, s)
        pooled = F.adaptive_avg_pool2d(middle, self.pixel_grid)
        out["pixels"] = pooled.flatten(1).numpy()
        return out


def checkpoint_file(path: str):
    """The filesystem and path of the state.pt that `path` names: the file itself, or the one
    inside a checkpoint folder; local or any pyarrow filesystem URI."""
    from pyarrow import fs as pafs

    from data_prep.inputs import resolve_filesystem

    filesystem, where = resolve_filesystem(path)
    if filesystem.get_file_info(where).type == pafs.FileType.Directory:
        where = f"{where.rstrip('/')}/state.pt"
    return filesystem, where


def _no_checkpoint_message(path: str) -> str:
    """Why `path` is not a checkpoint: it does not exist, or it is a run's folder (then its
    latest checkpoint is named), or a folder without state.pt."""
    from pyarrow import fs as pafs

    from data_prep.inputs import resolve_filesystem
    from svt_ray.runs import checkpoint_dir_name, checkpoint_steps, join_uri

    filesystem, where = resolve_filesystem(path)
    if filesystem.get_file_info(where).type == pafs.FileType.NotFound:
        # A checkpoint of its run that was pruned, or of another length of run (the quick
        # tour's path, after a run of another batch size): its run's latest is named.
        run_dir = path.rstrip("/").rpartition("/")[0]
        try:
            steps = checkpoint_steps(run_dir) if run_dir else []
        except (OSError, ValueError):  # no folder to list (a bucket's root, a bad URI)
            steps = []
        if steps:
            latest = join_uri(run_dir, checkpoint_dir_name(steps[-1]))
            return f"no SVT checkpoint at {path}: it does not exist; its run's latest is {latest}"
        return f"no SVT checkpoint at {path}: it does not exist"
    steps = checkpoint_steps(path)
    if steps:
        latest = join_uri(path, checkpoint_dir_name(steps[-1]))
        return (
            f"{path} is a run's folder, not one of its checkpoints; name one, e.g. its latest: "
            f"{latest}"
        )
    return f"no SVT checkpoint at {path}: a checkpoint folder holds state.pt, and this one does not"


def load_state(path: str) -> dict:
    """A checkpoint file (state.pt) or a checkpoint directory holding one; local or a URI.
    Loaded with `weights_only=True`: tensors and plain containers only, so a checkpoint from a
    shared bucket cannot run code. A file torch cannot read that way is a ValueError."""
    import io
    import pickle
    import zipfile

    from pyarrow import fs as pafs

    filesystem, where = checkpoint_file(path)
    if filesystem.get_file_info(where).type != pafs.FileType.File:
        raise FileNotFoundError(_no_checkpoint_message(path))
    if isinstance(filesystem, pafs.LocalFileSystem):
        source = Path(where)
    else:  # object storage
        with filesystem.open_input_stream(where) as stream:
            source = io.BytesIO(stream.read())
    # A local checkpoint is mapped, not read: `svt-ray eval` wants only the config of a file
    # that holds both networks and the optimiser (GBs for the paper model). torch maps only
    # its zip format; anything else is read as before.
    mmap = isinstance(source, Path) and zipfile.is_zipfile(source)
    try:
        state = torch.load(source, map_location="cpu", weights_only=True, mmap=mmap)
    except (pickle.UnpicklingError, RuntimeError, KeyError, EOFError, OSError) as error:
        if isinstance(source, Path) and not mmap and not _torch_pickle(source):
            raise ValueError(
                f"{path}: not a file torch.save wrote; pass a checkpoint (a run's "
                "checkpoint_NNNNNNNN folder or its state.pt) or an `svt-ray export` file"
            ) from None
        if "Weights only load failed" in str(error):  # torch's advice would run its code
            raise ValueError(
                f"{path}: holds Python objects besides tensors, so it is not an svt-ray "
                "checkpoint (those hold tensors and plain values only) and is not loaded"
            ) from None
        first = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        raise ValueError(f"{path}: not a checkpoint torch can load safely ({first})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not an svt-ray checkpoint")
    return state


def _torch_pickle(path: Path) -> bool:
    """Whether a file starts as torch.save's files do: a zip (one cut short has no central
    directory, so `zipfile.is_zipfile` says no) or its legacy format, a pickle."""
    with open(path, "rb") as file:
        start = file.read(4)
    return start.startswith(b"\x80") or start == b"PK\x03\x04"


def cpus_per_evaluation(config) -> float:
    """Logical CPUs `evaluate_backbones` holds on one node: a decode actor, the inference actor
    and one CPU for Ray Data's read tasks (the local-Ray rule of `cluster.cpus_per_run`)."""
    return config.data.decode_cpus + 2


def inference_gpus(config) -> float:
    """GPUs for the feature-extraction actor. Asked of Ray, not of the driver's torch: on a
    cluster the driver runs on a CPU head. One GPU if the cluster has one now, or if it is a
    cluster (`scaling.address`) whose run trained on GPUs (the autoscaler starts a GPU node);
    none otherwise, as on a laptop evaluating a checkpoint trained on GPUs elsewhere (an actor
    asking for a GPU there would wait forever)."""
    import ray

    from svt_ray.cluster import joins_a_cluster

    if ray.cluster_resources().get("GPU", 0) >= 1:
        return 1.0
    scaling = config.scaling
    return 1.0 if joins_a_cluster(scaling.address) and scaling.gpus_per_worker > 0 else 0.0


def initial_row_name(config) -> str:
    """How a table names the run's starting point: random weights, or an image ViT's."""
    if config.model.init_from:
        return f"start ({Path(config.model.init_from).name})"
    return "random init"


def check_eval_data(data_path: str, manifest: dict, settings, also: str = "") -> None:
    """Before any clip is decoded: the kNN bank's and the queries' splits (`settings`: the
    `eval` section) hold clips, and the dataset has class labels. `also`: one more way out,
    for the error."""
    counts = manifest["counts"]
    labels = counts.get("labels")
    if labels and not any(int(label) >= 0 for label in labels):  # first: no split fixes this
        raise ConfigError(
            f"{data_path}: none of its clips has a class label (videos loose at the input's "
            "root get none), and kNN and the linear probe score class labels. Prepare it from "
            "class folders (ROOT/CLASS/video.mp4) or a CSV with a label column" + also
        )
    splits = counts.get("splits", {})
    missing = [s for s in (settings.train_split, settings.test_split) if not splits.get(s)]
    if missing:
        fraction = (manifest.get("options") or {}).get("val_fraction") or 0
        how = (
            f"its {sum(splits.values())} clips drew split 'val' with --val-fraction {fraction:g} "
            "and none did: prepare more clips or give a larger --val-fraction"
            if fraction and "val" in missing
            else "prepare it with a held-out split (`svt-ray prep ... --val-fraction 0.1`)"
        )
        raise ConfigError(
            f"{data_path} has no clips of split {', '.join(map(repr, missing))} (it has "
            f"{splits}); {how}, or name others with --set eval.train_split=... / "
            f"eval.test_split=...{also}"
        )


def evaluate_backbones(
    config,
    backbones: dict[str, str | None],
    data_path: str,
    pixel_baseline: bool = False,
) -> list[EvalResult]:
    """kNN and linear probe of each backbone's features (single clip and slow-fast).

    `backbones` maps a row name to a checkpoint path, or to None for the run's starting point
    (`initial_row_name`: random with its seed, or `model.init_from`). Clips are decoded once per split and every backbone sees the same ones.
    """
    from svt_ray import data
    from svt_ray.model import check_init_from
    from svt_ray.runs import absolute_path

    settings = config.eval
    if None in backbones.values():  # the starting point's init_from: there, on the driver
        config = config.model_copy(deep=True)
        check_init_from(config)
    data_path = absolute_path(data_path)
    manifest = data.read_dataset_manifest(data_path)
    check_eval_data(data_path, manifest, settings)  # before a whole split is decoded
    counts = manifest["counts"]["splits"]
    clips = {"clip": (settings.clip_frames, settings.clip_size)}
    if settings.slow_fast:
        clips["fast"] = (settings.fast_frames, settings.fast_size)
    kwargs = {
        "config": config.model_dump(mode="json"),
        "backbones": backbones,
        "clip_columns": list(clips),
    }
    gpus = inference_gpus(config)
    features = {}
    for split in (settings.train_split, settings.test_split):
        dataset = data.build_eval_dataset(
            data_path,
            clips,
            split=split,
            window_frames=config.views.clip_frames,
            decoder=config.data.decoder,
            decode_actors=config.data.decode_actors,
            interpolation=config.views.interpolation,
        )
        rows = data.run_batch_inference(dataset, FeatureUDF, kwargs, num_gpus=gpus)
        # In clip order, not the order the actors finished in: the linear probe's result
        # depends on the order of its rows, and an evaluation must not vary run to run.
        order = np.argsort(rows["clip_id"], kind="stable")
        features[split] = {column: values[order] for column, values in rows.items()}
    train, test = features[settings.train_split], features[settings.test_split]
    for split, scored in ((settings.train_split, train), (settings.test_split, test)):
        if len(scored["label"]) < counts[split]:  # unlabelled, or failed to decode (warned)
            logger.warning(
                "evaluation scores %d of the %d %s clips: the others have no label or did not "
                "decode", len(scored["label"]), counts[split], split,
            )  # fmt: skip
    return score_features(settings, list(backbones), train, test, pixel_baseline)


def score_features(
    settings,
    names: list[str],
    train: dict[str, np.ndarray],
    test: dict[str, np.ndarray],
    pixel_baseline: bool = False,
) -> list[EvalResult]:
    """The rows of an evaluation from its feature columns (`NAME/clip`, `NAME/fast`, `pixels`,
    `label`, per split): each backbone's single clip, then, with `settings.slow_fast`, the
    mean of its slow (single) and fast clips' features (svt_spec §5), then the frame pixels."""
    (train_labels, test_labels), num_classes = dense_labels(
        torch.from_numpy(train["label"]), torch.from_numpy(test["label"])
    )

    def score(name: str, train_x, test_x) -> EvalResult:
        return evaluate_features(
            name,
            torch.from_numpy(train_x),
            train_labels,
            torch.from_numpy(test_x),
            test_labels,
            num_classes,
            settings.knn_k,
            settings.knn_temperature,
            settings.linear_epochs,
        )

    results = []
    for name in names:
        results.append(score(name, train[f"{name}/clip"], test[f"{name}/clip"]))
        if settings.slow_fast:
            slow_fast_train = (train[f"{name}/clip"] + train[f"{name}/fast"]) / 2
            slow_fast_test = (test[f"{name}/clip"] + test[f"{name}/fast"]) / 2
            results.append(score(f"{name} slow-fast", slow_fast_train, slow_fast_test))
    if pixel_baseline:
        results.append(score("frame pixels", train["pixels"], test["pixels"]))
    return results

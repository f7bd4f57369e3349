"""The synthetic action videos: deterministic, balanced, decodable, and motion-defined."""

from __future__ import annotations

import json

import numpy as np
import pytest

from svt_ray.synthetic import (
    CLASS_NAMES,
    SynthConfig,
    class_folder,
    clip_label,
    encode_clip,
    generate_dataset,
    main,
    render_clip,
)
from svt_ray.video import open_video


def test_render_is_deterministic_in_seed_and_index():
    config = SynthConfig(num_clips=4, num_frames=16, height=32, width=48)
    first = render_clip(config, 3)
    assert first.shape == (16, 32, 48, 3) and first.dtype == np.uint8
    np.testing.assert_array_equal(first, render_clip(config, 3))
    assert not np.array_equal(first, render_clip(config, 2))
    other_seed = SynthConfig(num_clips=4, num_frames=16, height=32, width=48, seed=1)
    assert not np.array_equal(first, render_clip(other_seed, 3))
    assert encode_clip(config, 1) == encode_clip(config, 1)  # bytes, through the real codec


def test_generate_writes_a_balanced_folder_per_class_layout(tmp_path):
    config = SynthConfig(num_clips=12, num_classes=4, num_frames=20, height=32, width=32)
    summary = generate_dataset(str(tmp_path), config)
    assert summary.written == 12 and summary.skipped == 0
    folders = sorted(p.name for p in tmp_path.iterdir() if p.is_dir())
    assert folders == [class_folder(label) for label in range(4)]
    counts = [len(list((tmp_path / folder).glob("*.mp4"))) for folder in folders]
    assert counts == [3, 3, 3, 3]
    clip = next((tmp_path / folders[2]).glob("*.mp4")).read_bytes()
    reader = open_video(clip)
    assert (reader.num_frames, reader.height, reader.width) == (20, 32, 32)
    assert reader.fps == pytest.approx(config.fps)
    meta = json.loads((tmp_path / "synthetic.json").read_text())
    assert meta["class_names"] == list(CLASS_NAMES[:4])
    again = generate_dataset(str(tmp_path), config)  # resumable: nothing to redo
    assert again.written == 0 and again.skipped == 12


def test_cli_entry_point(tmp_path, capsys):
    assert (
        main(
            [
                str(tmp_path),
                "--num-clips",
                "2",
                "--num-frames",
                "8",
                "--height",
                "32",
                "--width",
                "32",
                "--num-classes",
                "2",
            ]
        )
        == 0
    )
    assert "2 clips written" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main([str(tmp_path), "--num-classes", "11"])


def _pooled(frames: np.ndarray, k: int = 8) -> np.ndarray:
    """(..., H, W, 3) uint8 -> (..., H/k, W/k, 3) float means."""
    *lead, h, w, c = frames.shape
    return frames.reshape(*lead, h // k, k, w // k, k, c).mean(axis=(-4, -2)) / 255.0


def _ridge_classifier_accuracy(x_train, y_train, x_test, y_test, ridge: float = 1.0) -> float:
    """Closed-form one-vs-rest ridge regression on standardised features (a linear probe)."""
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    a = np.hstack([(x_train - mean) / std, np.ones((len(x_train), 1))])
    targets = np.eye(y_train.max() + 1)[y_train]
    weights = np.linalg.solve(a.T @ a + ridge * np.eye(a.shape[1]), a.T @ targets)
    b = np.hstack([(x_test - mean) / std, np.ones((len(x_test), 1))])
    return float(((b @ weights).argmax(1) == y_test).mean())


@pytest.fixture(scope="module")
def rendered():
    config = SynthConfig(num_clips=200, num_classes=10, num_frames=32, height=32, width=32, seed=3)
    clips = np.stack([render_clip(config, i) for i in range(config.num_clips)])
    labels = np.array([clip_label(config, i) for i in range(config.num_clips)])
    return config, clips, labels


def test_labels_are_balanced_and_a_single_frame_does_not_tell_the_class(rendered):
    config, clips, labels = rendered
    assert np.bincount(labels).tolist() == [20] * 10
    rng = np.random.default_rng(0)
    features = _pooled(clips, 4)  # (N, T, 8, 8, 3)

    def frames_of(indices):
        times = rng.integers(0, config.num_frames, size=(len(indices), 4))
        x = np.concatenate([features[indices[:, None], times].reshape(-1, 8 * 8 * 3)])
        return x, np.repeat(labels[indices], 4)

    train, test = np.arange(150), np.arange(150, 200)
    x_train, y_train = frames_of(train)
    x_test, y_test = frames_of(test)
    accuracy = _ridge_classifier_accuracy(x_train, y_train, x_test, y_test)
    assert accuracy < 0.1 + 0.1, f"per-frame appearance classifier reached {accuracy:.2f}"


def test_appearance_drifts_so_distant_windows_do_not_identify_the_clip(rendered):
    """SSL shortcut check: colour histograms of a clip's first and last quarter should not
    match each other better than they match other clips (views share motion, not colours)."""
    config, clips, _ = rendered
    quarter = config.num_frames // 4

    def histogram(window: np.ndarray) -> np.ndarray:
        codes = (window // 64).astype(np.int64)  # 4 levels per channel
        codes = codes[..., 0] * 16 + codes[..., 1] * 4 + codes[..., 2]
        counts = np.stack([np.bincount(c.ravel(), minlength=64) for c in codes]).astype(float)
        return counts / np.linalg.norm(counts, axis=1, keepdims=True)

    early, late = histogram(clips[:, :quarter]), histogram(clips[:, -quarter:])
    retrieval = ((early @ late.T).argmax(axis=1) == np.arange(len(clips))).mean()
    assert retrieval < 0.1, f"same-clip retrieval from colours across the clip: {retrieval:.2f}"


def test_config_validation():
    with pytest.raises(ValueError, match="num_classes"):
        SynthConfig(num_classes=0)
    with pytest.raises(ValueError, match="even"):
        SynthConfig(height=33)

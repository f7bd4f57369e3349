"""The synthetic action videos: deterministic, balanced, decodable, and motion-defined."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from media import REENCODE_TOLERANCE, frame_errors

from svt_ray.synthetic import (
    CLASS_NAMES,
    SCENE_CLASS_NAMES,
    SCENE_SPEED,
    SynthConfig,
    class_folder,
    clip_label,
    encode_clip,
    generate_dataset,
    main,
    render_clip,
)
from svt_ray.video import open_video


@pytest.mark.parametrize("style", ["scene", "objects"])
def test_render_is_deterministic_in_seed_and_index(style):
    config = SynthConfig(num_clips=4, num_frames=16, height=32, width=48, style=style)
    first = render_clip(config, 3)
    assert first.shape == (16, 32, 48, 3) and first.dtype == np.uint8
    np.testing.assert_array_equal(first, render_clip(config, 3))
    assert not np.array_equal(first, render_clip(config, 2))
    other_seed = SynthConfig(num_clips=4, num_frames=16, height=32, width=48, seed=1, style=style)
    assert not np.array_equal(first, render_clip(other_seed, 3))
    # through the real codec: libx264 repeats its bytes but for rare rate-control variations
    # (test_video), so the encodes are compared decoded, within codec tolerance
    assert frame_errors(encode_clip(config, 1), encode_clip(config, 1)).max() < REENCODE_TOLERANCE


def test_generate_writes_a_balanced_folder_per_class_layout(tmp_path):
    config = SynthConfig(num_clips=12, num_classes=4, num_frames=20, height=32, width=32)
    summary = generate_dataset(str(tmp_path), config)
    assert summary.written == 12 and summary.skipped == 0
    folders = sorted(p.name for p in tmp_path.iterdir() if p.is_dir())
    assert folders == [class_folder(config, label) for label in range(4)]
    assert folders[0] == "00_pan_right"  # the embedded default: scene style, the four pans
    counts = [len(list((tmp_path / folder).glob("*.mp4"))) for folder in folders]
    assert counts == [3, 3, 3, 3]
    clip = next((tmp_path / folders[2]).glob("*.mp4")).read_bytes()
    reader = open_video(clip)
    assert (reader.num_frames, reader.height, reader.width) == (20, 32, 32)
    assert reader.fps == pytest.approx(config.fps)
    meta = json.loads((tmp_path / "synthetic.json").read_text())
    assert meta["class_names"] == list(SCENE_CLASS_NAMES[:4])
    again = generate_dataset(str(tmp_path), config)  # resumable: nothing to redo
    assert again.written == 0 and again.skipped == 12


@pytest.mark.ray
@pytest.mark.parametrize("ray_was_running", [True, False])
def test_ray_workers_leave_ray_as_they_found_it(
    tmp_path, ray_session, monkeypatch, ray_was_running
):
    """With workers > 1 the clips are Ray tasks; a Ray this call started is shut down after
    (a caller's next ray.init would fail otherwise), a caller's Ray is left running. The
    session's Ray runs the tasks either way; only what generate_dataset decides is observed."""
    calls, running = [], [ray_was_running]  # a stand-in for Ray's own state

    def record(call: str, now_running: bool) -> None:
        calls.append(call)
        running[0] = now_running

    monkeypatch.setattr(ray_session, "is_initialized", lambda: running[0])
    monkeypatch.setattr(ray_session, "init", lambda **options: record("init", True))
    monkeypatch.setattr(ray_session, "shutdown", lambda: record("shutdown", False))
    config = SynthConfig(num_clips=4, num_classes=2, num_frames=8, height=32, width=32)
    summary = generate_dataset(str(tmp_path), config, workers=2)
    assert summary.written == 4
    assert calls == ([] if ray_was_running else ["init", "shutdown"])


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
    assert main([str(tmp_path / "s"), "--num-classes", "9"]) == 2  # the scene style has 8
    assert main([str(tmp_path / "o"), "--style", "objects", "--num-classes", "11"]) == 2
    small = ["--num-frames", "8", "--height", "32", "--width", "32"]
    assert main([str(tmp_path), *small, "--num-classes", "3"]) == 2  # the folder has 2
    errors = capsys.readouterr().err.splitlines()  # one line each, no usage block over them
    assert len(errors) == 3 and all(
        e.startswith("python -m svt_ray.synthetic: error: ") for e in errors
    )
    assert "num_classes must lie in [1, 8] for style 'scene'" in errors[0]
    assert "num_classes must lie in [1, 10] for style 'objects'" in errors[1]
    assert "other settings (num_classes 2 -> 3); use another folder" in errors[2]
    assert not (tmp_path / "s").exists() and not (tmp_path / "o").exists()  # nothing made


def test_usage_names_the_command_that_was_run(capsys):
    """`python -m svt_ray.synthetic --help` printed `usage: svt-ray synth`."""
    from typer.testing import CliRunner

    from svt_ray.cli import app

    with pytest.raises(SystemExit):
        main(["--help"])
    assert capsys.readouterr().out.startswith("usage: python -m svt_ray.synthetic ")
    result = CliRunner().invoke(app, ["synth", "--help"])
    assert result.exit_code == 0 and result.stdout.startswith("usage: svt-ray synth ")


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
    config = SynthConfig(
        num_clips=200, num_classes=10, num_frames=32, height=32, width=32, seed=3, style="objects"
    )
    clips = np.stack([render_clip(config, i) for i in range(config.num_clips)])
    labels = np.array([clip_label(config, i) for i in range(config.num_clips)])
    return config, clips, labels


def test_labels_are_balanced_and_a_single_frame_does_not_tell_the_class(rendered):
    config, clips, labels = rendered
    assert config.class_names == CLASS_NAMES
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
    with pytest.raises(ValueError, match="style"):
        SynthConfig(style="cartoon")
    with pytest.raises(ValueError, match="even"):
        SynthConfig(height=33)
    # Refused before synthetic.json records them: the folder then refused the corrected
    # command as made "with other settings (fps 0.0 -> 15.0)", with no clip in it.
    for bad in ({"fps": 0}, {"fps": float("nan")}, {"gop": 0}, {"crf": 60}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SynthConfig(**bad)


# -- scene style: motion read off the pixels by a written-out least-squares flow fit ----------


def _affine_flow(clip: np.ndarray) -> np.ndarray:
    """Fit one affine flow u = a + b x + c y, v = d + e x + f y (pixels per frame, x right, y
    down, origin at the frame centre) to a grey clip by least squares on the brightness
    constancy constraint Ix u + Iy v + It = 0 over every pixel of every frame pair."""
    grey = clip[..., 0].astype(np.float64)
    it = grey[1:] - grey[:-1]
    mid = (grey[1:] + grey[:-1]) / 2
    iy, ix = np.gradient(mid, axis=(1, 2))
    h, w = grey.shape[1:]
    y, x = np.mgrid[0:h, 0:w] - np.array([(h - 1) / 2, (w - 1) / 2])[:, None, None]
    x, y = np.broadcast_to(x, ix.shape), np.broadcast_to(y, ix.shape)
    design = np.stack([ix, ix * x, ix * y, iy, iy * x, iy * y], axis=-1).reshape(-1, 6)
    return np.linalg.lstsq(design, -it.ravel(), rcond=None)[0]


def test_scene_motion_read_from_pixels_is_the_class():
    """Pans give the translation (a, d), rotations the sign of the curl e - c (clockwise on a
    y-down screen is positive), zooms the sign of the divergence b + f."""
    config = SynthConfig(num_clips=32, num_classes=8, num_frames=16, height=48, width=48)
    pan_speed = SCENE_SPEED * 48  # pixels per frame
    turn = 2 * SCENE_SPEED / 0.35  # curl (rotation) or divergence (zoom) per frame
    for index in range(config.num_clips):
        name = config.class_names[clip_label(config, index)]
        a, b, c, d, e, f = _affine_flow(render_clip(config, index))
        if name.startswith("pan_"):
            expected = {"right": (1, 0), "left": (-1, 0), "up": (0, -1), "down": (0, 1)}
            direction = np.array(expected[name[4:]])
            along = a * direction[0] + d * direction[1]
            across = a * direction[1] - d * direction[0]
            assert 0.5 < along / pan_speed < 1.5 and abs(across) < 0.2 * pan_speed, (name, a, d)
        elif name.startswith("rotate_"):
            sign = 1 if name == "rotate_cw" else -1
            assert 0.5 < sign * (e - c) / turn < 1.5, (name, e - c)
            assert abs(b + f) < 0.6 * turn, (name, b + f)
        else:
            sign = 1 if name == "zoom_in" else -1
            assert 0.5 < sign * (b + f) / turn < 1.5, (name, b + f)
            assert abs(e - c) < 0.6 * turn, (name, e - c)


def test_no_scene_class_has_a_texture_scale_of_its_own():
    """One frame's edge strength (how fine its texture is), for all 8 scene classes: zooms
    once scaled their texture from the clip's first frame, so zoom_in's frames were coarse
    and zoom_out's fine (3.2 and 8.9 against 5.5 for the rest); every class now draws it alike.
    The block-average classifier below cannot see texture scale, so it is checked here."""
    config = SynthConfig(num_clips=80, num_classes=8, num_frames=32, height=48, width=48, seed=5)
    rng = np.random.default_rng(0)
    strength: dict[int, list[float]] = {}
    for index in range(config.num_clips):
        frame = render_clip(config, index)[rng.integers(0, config.num_frames), ..., 0]
        frame = frame.astype(np.float64)
        edges = np.abs(np.diff(frame, axis=0)).mean() + np.abs(np.diff(frame, axis=1)).mean()
        strength.setdefault(clip_label(config, index), []).append(edges)
    means = {label: float(np.mean(values)) for label, values in strength.items()}
    overall = float(np.mean(list(means.values())))
    assert all(abs(mean / overall - 1) < 0.15 for mean in means.values()), means


def test_scene_frames_do_not_tell_the_class_and_do_not_identify_the_clip():
    """A single frame's pixels classify at chance; and textures are replaced within the clip,
    so a clip's first and last frames match each other no better than other clips' frames."""
    config = SynthConfig(num_clips=160, num_classes=4, num_frames=32, height=32, width=32, seed=5)
    clips = np.stack([render_clip(config, i) for i in range(config.num_clips)])
    labels = np.array([clip_label(config, i) for i in range(config.num_clips)])
    rng = np.random.default_rng(0)
    features = _pooled(clips, 4)[..., 0]  # (N, T, 8, 8): grey, one channel carries it all
    times = rng.integers(0, config.num_frames, size=len(clips))
    x = features[np.arange(len(clips)), times].reshape(len(clips), -1)
    accuracy = _ridge_classifier_accuracy(x[:120], labels[:120], x[120:], labels[120:])
    assert accuracy < 0.25 + 0.15, f"per-frame classifier reached {accuracy:.2f}"

    first = clips[:, 0, ..., 0].reshape(len(clips), -1).astype(np.float64)
    last = clips[:, -1, ..., 0].reshape(len(clips), -1).astype(np.float64)
    first = (first - first.mean(1, keepdims=True)) / first.std(1, keepdims=True)
    last = (last - last.mean(1, keepdims=True)) / last.std(1, keepdims=True)
    retrieval = ((first @ last.T).argmax(axis=1) == np.arange(len(clips))).mean()
    assert retrieval < 0.1, f"first frame finds its clip's last frame in {retrieval:.2f}"


def test_a_folder_of_clips_is_only_extended_with_the_same_settings(tmp_path, caplog):
    """A clip's file name holds its seed, index and class, not its size or length: clips
    made with other settings were kept as they were, and synthetic.json rewritten to say
    otherwise (a demo with longer clips trained on the old ones)."""
    from svt_ray.config import ConfigError
    from svt_ray.synthetic import SynthConfig, generate_dataset

    small = dict(num_frames=8, height=32, width=32)
    generate_dataset(str(tmp_path), SynthConfig(num_clips=2, **small))
    more = generate_dataset(str(tmp_path), SynthConfig(num_clips=3, **small))
    assert (more.written, more.skipped) == (1, 2)  # the same settings: topped up
    with pytest.raises(ConfigError, match=r"other settings \(num_frames 8 -> 16\); use another"):
        generate_dataset(str(tmp_path), SynthConfig(num_clips=3, **{**small, "num_frames": 16}))
    # Fewer clips than the folder holds: all stay, it is said, and the record keeps the count.
    with caplog.at_level("WARNING", logger="svt_ray.synthetic"):
        fewer = generate_dataset(str(tmp_path), SynthConfig(num_clips=1, **small))
    assert (fewer.written, fewer.skipped) == (0, 1)
    assert "holds the 3 clips an earlier run made, more than the 1 asked: all 3 stay" in (
        caplog.text
    )
    assert json.loads((tmp_path / "synthetic.json").read_text())["config"]["num_clips"] == 3
    # A run stopped midway records the clips the folder held before it, not those it meant to.
    import svt_ray.synthetic as synthetic

    real_encode = synthetic.encode_clip

    def encode_until_the_fifth(config, index):
        if index == 4:
            raise KeyboardInterrupt
        return real_encode(config, index)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(synthetic, "encode_clip", encode_until_the_fifth)
        with pytest.raises(KeyboardInterrupt):
            generate_dataset(str(tmp_path), SynthConfig(num_clips=6, **small))
    assert json.loads((tmp_path / "synthetic.json").read_text())["config"]["num_clips"] == 3
    assert generate_dataset(str(tmp_path), SynthConfig(num_clips=6, **small)).written == 2
    assert json.loads((tmp_path / "synthetic.json").read_text())["config"]["num_clips"] == 6
    # A folder of the user's own videos: the generated classes would mix with them.
    (tmp_path / "mine" / "dog").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"mine is not empty \(dog\) and was not made by svt"):
        generate_dataset(str(tmp_path / "mine"), SynthConfig(num_clips=1, **small))
    (tmp_path / "empty").mkdir()
    assert generate_dataset(str(tmp_path / "empty"), SynthConfig(num_clips=1, **small)).written == 1


# -- objects style: the object's motion read off a plain rendering ---------------------------


def _object_rotation(before: np.ndarray, after: np.ndarray, angles: np.ndarray) -> float:
    """The turn (radians, clockwise on a y-down screen positive) that best maps the object's
    coverage in `before` onto `after` about their centroids: `after` is sampled back into
    `before` bilinearly for each candidate angle; ties take their mean."""
    height, width = before.shape
    ys, xs = np.nonzero(after > 0)
    weight = after[ys, xs]
    grid = np.mgrid[0:height, 0:width] + 0.5
    centre_before = (grid * before).sum((1, 2)) / before.sum()  # (y, x)
    centre_after = (grid * after).sum((1, 2)) / after.sum()
    px, py = xs + 0.5 - centre_after[1], ys + 0.5 - centre_after[0]
    padded = np.pad(before, 1)
    scores = []
    for angle in angles:
        cos, sin = np.cos(angle), np.sin(angle)
        sx = cos * px + sin * py + centre_before[1] + 0.5  # in padded pixel-index units
        sy = -sin * px + cos * py + centre_before[0] + 0.5
        x0, y0 = np.floor(sx).astype(int), np.floor(sy).astype(int)
        fx, fy = sx - x0, sy - y0
        x0, x1 = np.clip(x0, 0, width + 1), np.clip(x0 + 1, 0, width + 1)
        y0, y1 = np.clip(y0, 0, height + 1), np.clip(y0 + 1, 0, height + 1)
        sampled = (
            padded[y0, x0] * (1 - fx) * (1 - fy)
            + padded[y0, x1] * fx * (1 - fy)
            + padded[y1, x0] * (1 - fx) * fy
            + padded[y1, x1] * fx * fy
        )
        scores.append((sampled * weight).sum())
    scores = np.asarray(scores)
    return float(angles[scores >= scores.max() - 1e-9].mean())


def test_objects_move_turn_and_scale_as_their_class_says(monkeypatch):
    """Rendered with a black scene, a white object and no distractors (appearance only: the
    motion is the renderer's own), the object's pixels give per clip its centroid path, its
    area and its frame-to-frame turn: move_* translate the stated way (x right, y down),
    rotate_cw turns clockwise on screen and rotate_ccw the other way, grow and shrink change
    the area that way, bounce moves vertically and shake horizontally, and no class does
    what another's motion does. 16 frames: the object keeps one shape (shapes last 16+)."""
    import svt_ray.synthetic as synthetic

    calls = []

    def plain_colour(rng, t):  # background colours first, then the object's stripes
        calls.append(len(calls))
        return np.full((t.size, 3), 0.0 if len(calls) <= 2 else 1.0)

    monkeypatch.setattr(synthetic, "_drifting_colour", plain_colour)
    config = SynthConfig(
        num_clips=20,
        num_classes=10,
        num_frames=16,
        height=64,
        width=64,
        style="objects",
        num_distractors=0,
    )
    angles = np.linspace(-0.8, 0.8, 41)
    directions = {"right": (1, 0), "left": (-1, 0), "up": (0, -1), "down": (0, 1)}
    for index in range(config.num_clips):
        calls.clear()
        object_ = render_clip(config, index)[..., 0].astype(np.float64) / 255
        assert len(calls) == 4, "the renderer's colour draws changed: update the test"
        object_ = np.clip(object_, 0.0, 1.0)  # (T, H, W) coverage (times a flicker gain)
        name = config.class_names[clip_label(config, index)]
        area = object_.sum((1, 2))
        y, x = np.mgrid[0:64, 0:64] + 0.5
        cx, cy = (object_ * x).sum((1, 2)) / area, (object_ * y).sum((1, 2)) / area
        dx, dy = cx[-1] - cx[0], cy[-1] - cy[0]
        growth = np.log(area[-1] / area[0])
        turn = sum(_object_rotation(a, b, angles) for a, b in itertools.pairwise(object_))
        facts = (name, index, round(dx, 1), round(dy, 1), round(growth, 2), round(turn, 2))
        if name.startswith("move_"):
            along_x, along_y = directions[name[5:]]
            along, across = dx * along_x + dy * along_y, dx * along_y - dy * along_x
            assert along > 16 and abs(across) < 2, facts  # 0.3-0.5 of 64 px
        elif name != "shake":
            assert abs(dx) < 6 and abs(dy) < 6, facts
        if name.startswith("rotate_"):
            sign = 1 if name == "rotate_cw" else -1
            assert sign * turn > 2.0, facts  # half to one whole turn over the clip
        else:
            assert abs(turn) < 0.6, facts
        if name in ("grow", "shrink"):
            sign = 1 if name == "grow" else -1
            assert sign * growth > 0.7, facts  # the scale changes 2-3x, the area its square
        else:
            assert abs(growth) < 0.4, facts
        if name in ("bounce", "shake"):
            moving, still = (cy, cx) if name == "bounce" else (cx, cy)
            assert moving.std() > 3 and still.std() < 1, facts


def test_clips_too_big_to_render_are_refused_before_anything_is_written(tmp_path, capsys):
    """64 frames of 8192x8192 died in numpy (32 GiB for one float64 array) after synthetic.json
    and the class folders were written; now the size is refused up front."""
    big = [str(tmp_path / "s17"), "--num-clips", "3", "--height", "8192", "--width", "8192"]
    assert main(big) == 2
    error = capsys.readouterr().err
    assert error.startswith("python -m svt_ray.synthetic: error: height x width x num_frames ")
    assert "8192x8192x64 needs about" in error and "use a smaller height, width or" in error
    assert not (tmp_path / "s17").exists()
    with pytest.raises(ValueError, match="GiB to render one objects clip"):
        SynthConfig(num_frames=2, height=8192, width=8192, style="objects")
    with pytest.raises(ValueError, match="GiB to render one scene clip"):  # its texture field
        SynthConfig(num_frames=2, height=16, width=2**16)
    # What the project makes stays allowed: the loader benchmark's clips, the default.
    from svt_ray.synthetic import RENDER_MEMORY_LIMIT, render_memory

    loader = SynthConfig(num_frames=300, height=256, width=320, style="objects", num_classes=10)
    assert render_memory(loader) < RENDER_MEMORY_LIMIT / 2
    assert render_memory(SynthConfig()) < 2**30


def test_a_record_of_other_settings_without_clips_is_replaced(tmp_path):
    """A run that stopped before its first clip left synthetic.json and empty class folders,
    and the corrected command was refused as "holds clips made with other settings"."""
    import svt_ray.synthetic as synthetic

    small = dict(num_frames=8, height=32, width=32)
    failed = SynthConfig(num_clips=3, num_classes=8, **small)

    def out_of_memory(config, index):
        raise MemoryError

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(synthetic, "encode_clip", out_of_memory)
        with pytest.raises(MemoryError):
            generate_dataset(str(tmp_path), failed)
    assert len([p for p in tmp_path.iterdir() if p.is_dir()]) == 8  # the folders it leaves
    config = SynthConfig(num_clips=3, num_classes=4, **{**small, "height": 48})
    assert generate_dataset(str(tmp_path), config).written == 3
    recorded = json.loads((tmp_path / "synthetic.json").read_text())["config"]
    assert (recorded["height"], recorded["num_classes"], recorded["num_clips"]) == (48, 4, 3)
    folders = sorted(p.name for p in tmp_path.iterdir() if p.is_dir())
    assert folders == [class_folder(config, label) for label in range(4)]  # old empty ones go
    # With clips in it, other settings are still refused, and the same ones resume.
    from svt_ray.config import ConfigError

    with pytest.raises(ConfigError, match=r"other settings \(height 48 -> 32\)"):
        generate_dataset(str(tmp_path), SynthConfig(num_clips=3, num_classes=4, **small))
    assert generate_dataset(str(tmp_path), config).skipped == 3


@pytest.mark.parametrize("workers", ["0", "-4"])
def test_workers_below_one_are_refused(tmp_path, capsys, workers):
    """--workers 0 and -4 ran in this process silently, as 1 does; 1 is the way to ask that."""
    assert main([str(tmp_path / "out"), "--num-clips", "2", "--workers", workers]) == 2
    error = capsys.readouterr().err
    assert error == (
        f"python -m svt_ray.synthetic: error: workers must be >= 1 (1: in this process), got "
        f"{workers}\n"
    )
    assert not (tmp_path / "out").exists()


def test_a_run_stopped_while_rewriting_the_record_keeps_the_old_one(tmp_path, monkeypatch, capsys):
    """Every run rewrote synthetic.json in place first, even with all its clips there: a full
    disk or a Ctrl-C then left it empty, and every later synth, demo and study failed on it.
    It is written to a temporary file and renamed, as the clips are."""
    import errno

    import svt_ray.synthetic as synthetic

    small = ["--num-clips", "2", "--num-frames", "8", "--height", "32", "--width", "32"]
    assert main([str(tmp_path), *small]) == 0
    record = (tmp_path / "synthetic.json").read_bytes()

    class FullDisk:  # the filesystem the run writes to; every write fails as on a full disk
        def __init__(self, filesystem):
            self.filesystem = filesystem

        def __getattr__(self, name):
            return getattr(self.filesystem, name)

        def open_output_stream(self, path):
            stream = self.filesystem.open_output_stream(path)  # made, or emptied, here

            class Full:
                def __enter__(self):
                    return self

                def __exit__(self, *exc):
                    return stream.__exit__(*exc)

                def write(self, data):
                    raise OSError(errno.ENOSPC, "No space left on device")

            return Full()

    resolve = synthetic.resolve_filesystem

    def full_disk(root):
        filesystem, path = resolve(root)
        return FullDisk(filesystem), path

    monkeypatch.setattr(synthetic, "resolve_filesystem", full_disk)
    assert main([str(tmp_path), *small]) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert (tmp_path / "synthetic.json").read_bytes() == record
    assert not [path.name for path in tmp_path.iterdir() if path.name.startswith(".")]
    monkeypatch.undo()
    assert main([str(tmp_path), *small]) == 0
    assert "0 clips written, 2 already present" in capsys.readouterr().out


def test_a_damaged_record_is_named_with_the_way_out(tmp_path, capsys):
    """A synthetic.json cut short (by a copy) was "error: Expecting value: line 1 column 1
    (char 0)" naming no file, and a JSONDecodeError traceback in the demo and the studies: now
    the ConfigError they catch, naming the file. Without the record the folder is refused as not
    synth's, so the way out is a new folder."""
    from svt_ray.config import ConfigError

    small = ["--num-clips", "2", "--num-frames", "8", "--height", "32", "--width", "32"]
    assert main([str(tmp_path / "clips"), *small]) == 0
    (tmp_path / "clips" / "synthetic.json").write_bytes(b"")
    assert main([str(tmp_path / "clips"), *small]) == 2
    assert capsys.readouterr().err == (
        f"python -m svt_ray.synthetic: error: {tmp_path / 'clips' / 'synthetic.json'} is not a "
        "record svt-ray synth wrote (Expecting value: line 1 column 1 (char 0)); it was cut "
        "short or edited. Remove its folder and run again to make the clips anew, or give "
        "another folder\n"
    )
    (tmp_path / "clips" / "synthetic.json").write_text("[1, 2]")  # JSON, not synth's record
    with pytest.raises(ConfigError, match=r"synthetic.json is not a record svt-ray synth wrote"):
        generate_dataset(str(tmp_path / "clips"), SynthConfig(num_clips=2))
    (tmp_path / "clips" / "synthetic.json").unlink()  # no record: not taken for synth's folder
    with pytest.raises(ConfigError, match=r"clips is not empty .* Give a new or empty folder"):
        generate_dataset(str(tmp_path / "clips"), SynthConfig(num_clips=2))

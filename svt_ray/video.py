"""Video decoding and encoding behind one small interface.

A reader opens one clip from in-memory bytes (the `video` column of a shard, or a file read from
object storage) and returns frames by index as uint8 (N, H, W, 3) RGB. Frame index i is the i-th
frame in presentation order, whatever the timestamps are (constant or variable frame rate).

Two backends:
- `decord` (default): random access with a frame-accurate seek, the fastest for the sparse index
  sets the SVT view sampler asks for (docs/data.md has the measurements).
- `pyav`: the maintained fallback and the reference of the frame-exactness tests. It demuxes once
  (no decoding) to learn every frame's timestamp and the keyframes, then for a set of indices
  decodes forward from the nearest keyframe, seeking only when that skips work.

Readers hold native decoder state: create them inside the worker that uses them (never pickle
one) and close them promptly; decord can hold on to large buffers (dmlc/decord#197).

`H264Encoder` is the one encoding path of the project: data_prep re-encodes every source video
with it, and the synthetic generator encodes its clips with it.

Both packages ship their own FFmpeg, and decord loads its library with RTLD_GLOBAL: imported
before PyAV, it makes PyAV bind to decord's libavcodec and libx264, and the encoder then writes
different bytes for the same frames (data_prep's resumed shards differed from an uninterrupted
run's). So this module loads PyAV first, and says so when decord came earlier. libx264 still
varies its rate control now and then for the same frames (docs/data.md): encodes are faithful,
not always bit-identical.
"""

from __future__ import annotations

import bisect
import io
import logging
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Protocol

import numpy as np

logger = logging.getLogger(__name__)

if "decord" in sys.modules and "av" not in sys.modules:
    logger.warning(
        "decord was imported before PyAV (av): PyAV will run on decord's FFmpeg, and H.264 "
        "encodes (data_prep, svt-ray synth) can differ byte for byte from those of a process "
        "that imported them the other way round. Import svt_ray or av before decord."
    )
import av  # noqa: E402  (before decord: see the module docstring)

BACKENDS = ("decord", "pyav")


class VideoDecodeError(RuntimeError):
    """A clip could not be opened or a requested frame could not be decoded."""


class VideoReader(Protocol):
    """What every backend offers. Frames come back as uint8 RGB, shape (N, H, W, 3)."""

    num_frames: int
    fps: float
    height: int
    width: int

    def get_frames(self, indices: Sequence[int]) -> np.ndarray: ...

    def iter_frames(self) -> Iterator[np.ndarray]: ...

    def close(self) -> None: ...


def open_video(data: bytes, backend: str = "decord", num_threads: int = 1) -> VideoReader:
    """Open an encoded clip held in memory with the named backend."""
    if backend == "decord":
        return DecordReader(data, num_threads=num_threads)
    if backend == "pyav":
        return PyAVReader(data, num_threads=num_threads)
    raise ValueError(f"unknown video backend {backend!r}; choose one of {BACKENDS}")


def _check_indices(indices: Sequence[int], num_frames: int) -> np.ndarray:
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    if idx.size and (idx.min() < 0 or idx.max() >= num_frames):
        raise IndexError(
            f"frame indices must lie in [0, {num_frames}), got {idx.min()}..{idx.max()}"
        )
    return idx


def _unpadded_rgb(frames: np.ndarray) -> np.ndarray:
    """decord2 3.4 pads RGB rows to a multiple of 64 pixels and, where the padded row is a
    whole number of pixels' worth of bytes, reports that as channels: a 96-pixel-wide video
    comes back (n, h, 96, 4) holding rows of 128 RGB pixels (widths 16, 24, 32, 48, 96, 144
    and a few other small ones; the width it reports is right). Cut the rows back to RGB."""
    if frames.shape[-1] == 3:
        return frames
    count, height, width = frames.shape[:3]
    rows = np.ascontiguousarray(frames).reshape(count, height, -1)
    return np.ascontiguousarray(rows[:, :, : width * 3].reshape(count, height, width, 3))


class DecordReader:
    """decord.VideoReader over in-memory bytes.

    `width`/`height` > 0 make decord scale inside the decoder (used by data_prep, so a 4K source
    never materialises at full size). `fault_tol` follows decord: a value in (0, 1) raises once
    more than that fraction of frames had to be recovered (duplicated) after a decode error.
    """

    def __init__(
        self,
        data: bytes,
        num_threads: int = 1,
        width: int = -1,
        height: int = -1,
        fault_tol: float = -1,
    ) -> None:
        import decord

        try:
            self._reader = decord.VideoReader(
                io.BytesIO(data),
                ctx=decord.cpu(0),
                width=width,
                height=height,
                num_threads=num_threads,
                fault_tol=fault_tol,
            )
        except (*_decord_errors(), RuntimeError, AssertionError) as error:
            raise VideoDecodeError(f"decord cannot open the clip: {_first_line(error)}") from error
        self._data = data
        self.num_frames = len(self._reader)
        self.fps = float(self._reader.get_avg_fps())
        self._shape: tuple[int, int] | None = (height, width) if width > 0 and height > 0 else None

    @property
    def height(self) -> int:
        return self._frame_shape()[0]

    @property
    def width(self) -> int:
        return self._frame_shape()[1]

    def _frame_shape(self) -> tuple[int, int]:
        # decord has no shape query; the container header knows it without decoding a frame.
        if self._shape is None:
            self._shape = probe_frame_size(self._data)
        return self._shape

    def get_frames(self, indices: Sequence[int]) -> np.ndarray:
        import decord

        idx = _check_indices(indices, self.num_frames)
        try:
            try:
                frames = self._reader.get_batch(idx.tolist()).asnumpy()
            except decord.DECORDError as error:
                if "DECORDArrayCopyFromTo" not in str(error):
                    raise
                # decord2 3.4 cannot copy padded rows (see _unpadded_rgb) into a batch: one
                # frame at a time, as get_batch would (seek, decode), then stacked.
                frames = np.stack([self._reader[int(i)].asnumpy() for i in idx])
        except _decord_errors() as error:
            raise VideoDecodeError(
                f"decord failed to decode frames: {_first_line(error)}"
            ) from error
        # dmlc/decord#197: get_batch keeps decoder buffers alive; seeking back releases them.
        self._reader.seek(0)
        frames = _unpadded_rgb(frames)
        self._shape = frames.shape[1:3]
        return frames

    def iter_frames(self) -> Iterator[np.ndarray]:
        """Every frame in order, decoded strictly sequentially (no seeking).

        The safe way to read a source of unknown provenance: random access trusts the
        container's keyframe flags, which some files get wrong (docs/data.md).
        """
        self._reader.seek(0)
        for index in range(self.num_frames):
            try:
                frame = self._reader.next().asnumpy()
            except StopIteration:
                raise VideoDecodeError(
                    f"decord stopped at frame {index} of {self.num_frames}"
                ) from None
            except _decord_errors() as error:
                raise VideoDecodeError(
                    f"decord failed at frame {index}: {_first_line(error)}"
                ) from error
            frame = _unpadded_rgb(frame[None])[0]
            self._shape = frame.shape[:2]
            yield frame

    def close(self) -> None:
        self._reader = None


class PyAVReader:
    """Frame-accurate random access with PyAV: demux once, decode forward from keyframes."""

    def __init__(self, data: bytes, num_threads: int = 1) -> None:
        try:
            self._container = av.open(io.BytesIO(data), mode="r")
        except (av.FFmpegError, ValueError) as error:
            raise VideoDecodeError(f"PyAV cannot open the clip: {_first_line(error)}") from error
        if not self._container.streams.video:
            self._container.close()
            raise VideoDecodeError("the clip has no video stream")
        stream = self._container.streams.video[0]
        stream.thread_count = max(0, num_threads)
        stream.thread_type = "AUTO" if num_threads != 1 else "SLICE"
        self._stream = stream
        try:
            packets = [
                (packet.pts, packet.is_keyframe)
                for packet in self._container.demux(stream)
                if packet.size and packet.pts is not None
            ]
        except av.FFmpegError as error:
            raise VideoDecodeError(f"PyAV cannot demux the clip: {_first_line(error)}") from error
        if not packets:
            raise VideoDecodeError("the clip has no video frames")
        packets.sort()
        self._pts = [pts for pts, _ in packets]
        self._index_of_pts = {pts: i for i, pts in enumerate(self._pts)}
        self._keyframes = [i for i, (_, key) in enumerate(packets) if key] or [0]
        self.num_frames = len(self._pts)
        self.height = stream.codec_context.height
        self.width = stream.codec_context.width
        rate = stream.average_rate or stream.guessed_rate
        self.fps = float(rate) if rate else 0.0

    def get_frames(self, indices: Sequence[int]) -> np.ndarray:
        idx = _check_indices(indices, self.num_frames)
        wanted = set(idx.tolist())
        found: dict[int, np.ndarray] = {}
        next_index: int | None = None  # presentation index the decoder yields next
        frames: Iterable = iter(())
        try:
            for target in sorted(wanted):
                if target in found:
                    continue
                key = self._keyframes[bisect.bisect_right(self._keyframes, target) - 1]
                # Seek when going backwards or when a keyframe lies between here and the target.
                if next_index is None or target < next_index or key > next_index:
                    self._container.seek(
                        self._pts[key], stream=self._stream, backward=True, any_frame=False
                    )
                    frames = self._container.decode(self._stream)
                for frame in frames:
                    index = self._index_of_pts.get(frame.pts)
                    if index is None:
                        continue
                    next_index = index + 1
                    if index in wanted and index not in found:
                        found[index] = _to_rgb(frame)
                    if index >= target:
                        break
                if target not in found:
                    raise VideoDecodeError(f"PyAV could not decode frame {target}")
        except av.FFmpegError as error:
            raise VideoDecodeError(f"PyAV failed to decode frames: {_first_line(error)}") from error
        if not idx.size:
            return np.empty((0, self.height, self.width, 3), dtype=np.uint8)
        return np.stack([found[i] for i in idx.tolist()])

    def iter_frames(self) -> Iterator[np.ndarray]:
        """Every frame in presentation order, decoded sequentially from the start."""
        self._container.seek(self._pts[0], stream=self._stream, backward=True, any_frame=False)
        try:
            for frame in self._container.decode(self._stream):
                yield _to_rgb(frame)
        except av.FFmpegError as error:
            raise VideoDecodeError(f"PyAV failed to decode: {_first_line(error)}") from error

    def close(self) -> None:
        self._container.close()


def _to_rgb(frame) -> np.ndarray:
    """A decoded PyAV frame as uint8 RGB, converted on this thread: PyAV's default (threads=0)
    starts swscale threads for every frame, 0.5 ms of set-up that outweighs the conversion."""
    return frame.to_ndarray(format="rgb24", threads=1)


def decode_all_frames(data: bytes) -> np.ndarray:
    """Decode every frame sequentially with PyAV, in output order: the exactness reference."""
    with av.open(io.BytesIO(data), mode="r") as container:
        frames = [_to_rgb(f) for f in container.decode(video=0)]
    return np.stack(frames)


def probe_frame_size(data: bytes) -> tuple[int, int]:
    """(height, width) of the first video stream, read from the container header."""
    with av.open(io.BytesIO(data), mode="r") as container:
        context = container.streams.video[0].codec_context
        return context.height, context.width


# libx264's speed presets, fastest first.
X264_PRESETS = (
    "ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower",
    "veryslow", "placebo",
)  # fmt: skip


@dataclass(frozen=True)
class EncoderSettings:
    """H.264 settings of the project's one encoding path.

    A short GOP makes random access cheap: a frame costs at most `gop - 1` extra decodes.
    `bframes=0` keeps decode order equal to presentation order, which every decoder seeks
    exactly; B-frames save ~10% of bytes but cost seek accuracy in older decoders.
    """

    gop: int = 16
    crf: int = 23
    preset: str = "veryfast"
    bframes: int = 0
    threads: int = 1  # per encoder; parallelism comes from encoding many clips at once

    def __post_init__(self) -> None:
        if self.gop < 1:
            raise ValueError(f"gop must be >= 1, got {self.gop}")
        if not 0 <= self.crf <= 51:
            raise ValueError(f"crf must lie in [0, 51], got {self.crf}")
        if self.preset not in X264_PRESETS:
            raise ValueError(
                f"preset {self.preset!r} is not an x264 preset; choose from "
                f"{', '.join(X264_PRESETS)}"
            )


class H264Encoder:
    """Streaming H.264/mp4 encoder into memory: `write` RGB frames, then `finish` -> bytes.

    Width and height must be even (yuv420p). Timestamps are constant-rate `1/fps` unless
    `write` gets explicit `pts_s` seconds (variable frame rate; pass a fine `time_base`).
    """

    def __init__(
        self,
        width: int,
        height: int,
        fps: float,
        settings: EncoderSettings | None = None,
        time_base: Fraction | None = None,
    ) -> None:
        if width % 2 or height % 2 or width <= 0 or height <= 0:
            raise ValueError(f"H.264 yuv420p needs positive even sizes, got {width}x{height}")
        if not fps > 0:
            raise ValueError(f"fps must be positive, got {fps}")
        settings = settings or EncoderSettings()
        self._buffer = io.BytesIO()
        self._container = av.open(self._buffer, mode="w", format="mp4")
        self._rate = Fraction(fps).limit_denominator(1001)
        stream = self._container.add_stream("libx264", rate=self._rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        self._time_base = time_base or 1 / self._rate
        stream.codec_context.time_base = self._time_base
        stream.thread_count = settings.threads
        stream.codec_context.gop_size = settings.gop
        stream.options = {
            "preset": settings.preset,
            "crf": str(settings.crf),
            "bf": str(settings.bframes),
            # Fixed GOP: no scene-cut keyframes, so a frame is never more than gop-1 from one.
            "x264-params": f"keyint={settings.gop}:min-keyint={settings.gop}:scenecut=0",
        }
        self._stream = stream
        self._count = 0
        self._size = (height, width)

    def write(self, frame: np.ndarray, pts_s: float | None = None) -> None:
        if frame.shape != (*self._size, 3) or frame.dtype != np.uint8:
            raise ValueError(
                f"expected a uint8 frame of shape {(*self._size, 3)}, got {frame.dtype} {frame.shape}"
            )
        # Converted to yuv420p here, on this thread: a task holds one CPU, and PyAV's default
        # (threads=0) would start one swscale thread per core in every task.
        video_frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
        video_frame = video_frame.reformat(format="yuv420p", threads=1)
        if pts_s is None:
            video_frame.pts = self._count
        else:
            video_frame.pts = round(pts_s / self._time_base)
        video_frame.time_base = self._time_base
        for packet in self._stream.encode(video_frame):
            self._container.mux(packet)
        self._count += 1

    def finish(self) -> bytes:
        for packet in self._stream.encode():
            self._container.mux(packet)
        self._container.close()
        return self._buffer.getvalue()


def encode_h264(
    frames: Iterable[np.ndarray], fps: float, settings: EncoderSettings | None = None
) -> bytes:
    """Encode uint8 RGB frames (an (N, H, W, 3) array or any iterable of (H, W, 3)) to mp4 bytes."""
    encoder: H264Encoder | None = None
    for frame in frames:
        if encoder is None:
            encoder = H264Encoder(frame.shape[1], frame.shape[0], fps, settings)
        encoder.write(frame)
    if encoder is None:
        raise ValueError("no frames to encode")
    return encoder.finish()


def _decord_errors() -> tuple[type[Exception], ...]:
    """What decord raises: DECORDError, and DECORDLimitReachedError (too many corrupt frames
    under `fault_tol`), which is not a subclass of it."""
    import decord
    from decord._ffi import base

    return (decord.DECORDError, getattr(base, "DECORDLimitReachedError", decord.DECORDError))


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:300]

"""One source video -> one shard record: probe, check, decode with decord, re-encode to H.264.

Pure functions, no Ray: `prepare_video` either returns the record or raises `Rejected` with a
reason code (the `reason` field of rejects.jsonl) and a human-readable detail.

The probe demuxes with PyAV without decoding, which catches most bad inputs cheaply (not a
container, an image, audio only, one frame, missing or duplicate timestamps, fewer packets than
an mp4's header declares). Decoding then uses decord, scaled inside the decoder to the target
size, in chunks, streamed into the encoder, so a long 4K source never sits in memory at full
size.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from svt_ray.video import (
    DecordReader,
    EncoderSettings,
    H264Encoder,
    VideoDecodeError,
)

logger = logging.getLogger(__name__)

IMAGE_FORMATS = {
    "image2",
    "image2pipe",
    "png_pipe",
    "jpeg_pipe",
    "bmp_pipe",
    "webp_pipe",
    "tiff_pipe",
    "gif_pipe",
    "pgm_pipe",
    "ppm_pipe",
    "jpegls_pipe",
    "svg_pipe",
}


class Rejected(Exception):
    """A source video that cannot or should not be sharded."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class PrepOptions:
    """How every video is checked and re-encoded. Recorded in manifest.json."""

    short_side: int = 256
    """Target short side in pixels; smaller sources are not upscaled."""
    max_fps: float = 15.0
    """Frame-rate cap; a faster source is re-encoded at this rate, each output frame the source
    frame shown nearest its time by presentation timestamp (`kept_frames`; a source without
    timestamps is taken as evenly spaced). 0 disables the cap."""
    gop: int = 16
    crf: int = 23
    preset: str = "veryfast"
    min_frames: int = 16
    min_duration_s: float = 0.5
    min_side: int = 32
    max_side: int = 8192
    max_aspect: float = 4.0
    decode_threads: int = 1
    fault_tolerance: float = 0.05
    """Reject when decord had to recover (duplicate) more than this fraction of frames."""

    def __post_init__(self) -> None:
        if self.short_side < 16 or self.short_side % 2:
            raise ValueError(f"short_side must be even and >= 16, got {self.short_side}")
        if self.max_fps < 0:
            raise ValueError(f"max_fps must be >= 0 (0 disables the cap), got {self.max_fps}")
        if self.min_frames < 2:
            raise ValueError(f"min_frames must be >= 2, got {self.min_frames}")
        EncoderSettings(gop=self.gop, crf=self.crf, preset=self.preset)  # validates them

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Probe:
    container: str
    codec: str
    width: int
    height: int
    num_frames: int
    fps: float
    duration_s: float
    times: tuple[float, ...] = ()
    "Presentation times of the frames in order, seconds from the first."
    rotation: int = 0
    "Degrees counter-clockwise the player turns each frame (a phone's portrait video: 90)."


def probe(data: bytes) -> Probe:
    """Demux (no decoding) and check the container; raise Rejected for anything unusable."""
    import av

    if not data:
        raise Rejected("empty", "zero-byte file")
    try:
        container = av.open(io.BytesIO(data), mode="r")
    except (av.FFmpegError, ValueError, UnicodeDecodeError) as error:
        message = str(error)
        if data[4:8] == b"ftyp" and b"moov" not in data:
            raise Rejected("truncated", "mp4 without its index (moov atom): cut short") from error
        raise Rejected("not_video", f"not a readable media container: {_short(message)}") from error
    with container:
        format_name = container.format.name
        if set(format_name.split(",")) & IMAGE_FORMATS:
            raise Rejected("not_video", f"an image ({format_name}), not a video")
        if not container.streams.video:
            kinds = sorted({stream.type for stream in container.streams}) or ["no"]
            raise Rejected("no_video_stream", f"no video stream ({', '.join(kinds)} streams only)")
        stream = container.streams.video[0]
        context = stream.codec_context
        declared = stream.frames
        pts: list[int] = []
        missing_pts = discarded = 0
        try:
            for packet in container.demux(stream):
                if not packet.size:
                    continue
                if packet.is_discard:  # before an edit list's start (a cut): never shown
                    discarded += 1
                    continue
                if packet.pts is None:
                    missing_pts += 1
                else:
                    pts.append(packet.pts)
        except av.FFmpegError as error:
            raise Rejected(
                "truncated", f"demuxing stopped after {len(pts)} frames: {_short(str(error))}"
            ) from error
        num_frames = len(pts) + missing_pts
        time_base = stream.time_base
        rotation = _display_rotation(container, stream) if pts else 0
        codec = context.name if context else "unknown"
        width, height = context.width, context.height
    if num_frames == 0:
        raise Rejected("no_video_stream", "the video stream has no frames")
    if num_frames == 1:
        raise Rejected("single_frame", "a single frame (a still image in a video container)")
    # Only an mp4's header counts its frames exactly: AVI's counts the empty chunks of
    # dropped frames, which FFmpeg skips.
    if declared and num_frames + discarded < declared and "mp4" in format_name.split(","):
        raise Rejected(
            "truncated", f"{num_frames + discarded} of the {declared} frames the header declares"
        )
    if missing_pts:
        raise Rejected("timestamps", f"{missing_pts} of {num_frames} frames have no timestamp")
    unique = np.unique(np.asarray(pts))
    if unique.size < len(pts):
        raise Rejected(
            "timestamps", f"{len(pts) - unique.size} of {len(pts)} frames repeat a timestamp"
        )
    span = float((unique[-1] - unique[0]) * time_base) if time_base else 0.0
    if not span > 0:
        raise Rejected("timestamps", "all frames share one timestamp")
    fps = (num_frames - 1) / span
    if not 0.5 <= fps <= 1000:
        raise Rejected("timestamps", f"implausible frame rate {fps:.3g} fps")
    if not width or not height:
        raise Rejected("not_video", f"video stream without a frame size ({codec})")
    times = tuple(float((value - unique[0]) * time_base) for value in unique)
    if rotation in (90, 270):  # as shown: a portrait phone video is taller than wide
        width, height = height, width
    return Probe(
        format_name, codec, width, height, num_frames, fps, num_frames / fps, times, rotation
    )


def _display_rotation(container, stream) -> int:
    """The display matrix's rotation of the first frame, in 0/90/180/270 (counter-clockwise),
    0 where there is none or the frame does not decode (the decode itself then says why)."""
    import av

    try:
        container.seek(0, stream=stream)
        frame = next(container.decode(stream), None)
    except (av.FFmpegError, ValueError):
        return 0
    degrees = round(float(getattr(frame, "rotation", 0) or 0) / 90) * 90 % 360
    return int(degrees)


def output_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """(width, height) scaled so the short side is at most `short_side`, both even."""
    scale = min(1.0, short_side / min(width, height))
    return max(2, round(width * scale / 2) * 2), max(2, round(height * scale / 2) * 2)


def kept_frames(
    num_frames: int, fps: float, max_fps: float, times: Sequence[float] = ()
) -> tuple[np.ndarray, float]:
    """Source frame indices of the output frames and the output fps: at most `max_fps`, each
    output frame the source frame shown nearest its time. `times` (presentation times) keep a
    variable-frame-rate source's timing: a frame shown longer is repeated, frames close
    together are thinned. Without them the source's frames are taken as evenly spaced."""
    capped = bool(max_fps) and fps > max_fps * 1.01
    out_fps = max_fps if capped else fps
    count = max(1, math.floor(num_frames * out_fps / fps)) if capped else num_frames
    if len(times) < num_frames:  # evenly spaced: frame i at i / fps
        indices = np.round(np.arange(count) * fps / out_fps).astype(np.int64)
        return np.minimum(indices, num_frames - 1), out_fps
    shown = np.asarray(times[:num_frames], dtype=np.float64)
    wanted = np.arange(count) / out_fps
    after = np.clip(np.searchsorted(shown, wanted), 1, num_frames - 1)
    nearer_before = wanted - shown[after - 1] <= shown[after] - wanted
    return np.where(nearer_before, after - 1, after).astype(np.int64), out_fps


def prepare_video(data: bytes, options: PrepOptions) -> dict:
    """Check and re-encode one source; return the shard columns that come from the video."""
    info = probe(data)
    short, long = sorted((info.width, info.height))
    if short < options.min_side or long > options.max_side:
        raise Rejected(
            "resolution",
            f"{info.width}x{info.height} is outside "
            f"[{options.min_side}, {options.max_side}] pixels",
        )
    if long / short > options.max_aspect:
        raise Rejected(
            "resolution",
            f"{info.width}x{info.height}: aspect ratio "
            f"{long / short:.1f} exceeds {options.max_aspect}",
        )
    if info.num_frames < options.min_frames or info.duration_s < options.min_duration_s:
        raise Rejected(
            "too_short",
            f"{info.num_frames} frames / {info.duration_s:.2f}s, minimum "
            f"{options.min_frames} frames / {options.min_duration_s}s",
        )
    kept, kept_fps = kept_frames(info.num_frames, info.fps, options.max_fps, info.times)
    if len(kept) < options.min_frames:
        raise Rejected(
            "too_short",
            f"{len(kept)} frames at {kept_fps:g} fps under the frame-rate cap "
            f"({info.num_frames} at {info.fps:.3g} fps in the source), minimum {options.min_frames}",
        )
    width, height = output_size(info.width, info.height, options.short_side)
    encoded = None
    if "mpegts" not in info.container:  # decord mis-decodes MPEG-TS with B-frames, silently
        try:
            decoded = _decord_frames(data, info, width, height, options)
            encoded = _encode(decoded, info, width, height, options)
        except VideoDecodeError as error:
            logger.warning("decord failed (%s); decoding again with PyAV", error)
    if encoded is None:
        try:
            decoded = _pyav_frames(data, info, width, height)
            encoded = _encode(decoded, info, width, height, options)
        except VideoDecodeError as error:
            raise Rejected("decode_error", str(error)) from error
    encoder, indices, fps = encoded
    video = encoder.finish()
    return {
        "video": video,
        "num_frames": len(indices),
        "fps": float(fps),
        "width": width,
        "height": height,
        "duration_s": len(indices) / fps,
        "codec": "h264",
        "checksum": hashlib.sha256(video).hexdigest(),
        "source_checksum": hashlib.sha256(data).hexdigest(),
        "source_num_frames": info.num_frames,
        "source_fps": float(info.fps),
        "source_width": info.width,
        "source_height": info.height,
        "source_bytes": len(data),
    }


def _decord_frames(data: bytes, info: Probe, width: int, height: int, options: PrepOptions):
    """(frames in order, scaled inside the decoder, count): sequential decoding only, since
    random access trusts keyframe flags, which some sources (AVI with B-frames) get wrong."""
    reader = DecordReader(
        data,
        num_threads=options.decode_threads,
        width=width,
        height=height,
        fault_tol=options.fault_tolerance if options.fault_tolerance > 0 else -1,
    )
    count = min(reader.num_frames, info.num_frames)
    if reader.num_frames != info.num_frames:
        logger.warning(
            "decord counts %d frames, the container %d; keeping %d",
            reader.num_frames, info.num_frames, count,
        )  # fmt: skip

    def frames():
        try:
            yield from reader.iter_frames()
        finally:
            reader.close()

    return frames(), count


def _pyav_frames(data: bytes, info: Probe, width: int, height: int):
    """(frames in order, scaled after decoding, count): FFmpeg's own decoder, read from the
    start without seeking, for what decord gets wrong or fails on."""
    import av

    turns = info.rotation // 90  # counter-clockwise quarter turns, as np.rot90 makes them
    coded = (height, width) if turns % 2 else (width, height)

    def frames():
        with av.open(io.BytesIO(data), mode="r") as container:
            try:
                for frame in container.decode(video=0):
                    pixels = frame.to_ndarray(
                        format="rgb24", width=coded[0], height=coded[1], interpolation="AREA",
                        threads=1,
                    )  # fmt: skip
                    yield np.ascontiguousarray(np.rot90(pixels, turns)) if turns else pixels
            except av.FFmpegError as error:
                raise VideoDecodeError(f"PyAV failed to decode: {_short(str(error))}") from error

    return frames(), info.num_frames


def _encode(
    decoded, info: Probe, width: int, height: int, options: PrepOptions
) -> tuple[H264Encoder, np.ndarray, float]:
    """Re-encode the frames kept under the frame-rate cap: (encoder, kept indices, fps)."""
    frames, source_frames = decoded
    indices, fps = kept_frames(source_frames, info.fps, options.max_fps, info.times)
    encoder = H264Encoder(
        width, height, fps, EncoderSettings(gop=options.gop, crf=options.crf, preset=options.preset)
    )
    repeats = np.bincount(indices, minlength=source_frames)  # 0: dropped, 2+: shown longer
    written = 0
    for index, frame in enumerate(frames):
        if index >= source_frames:
            break
        for _ in range(repeats[index]):
            encoder.write(frame)
            written += 1
    if written != len(indices):
        raise VideoDecodeError(f"decoded {written} of {len(indices)} frames")
    return encoder, indices, fps


def _short(message: str) -> str:
    return (message.strip().splitlines() or ["?"])[0][:300]

"""Test videos made on the fly with PyAV: good ones of every GOP/rate kind, and bad ones."""

from __future__ import annotations

import io
import struct
from fractions import Fraction

import av
import numpy as np

from svt_ray.video import EncoderSettings, H264Encoder, decode_all_frames, encode_h264

REENCODE_TOLERANCE = 8
"""Mean absolute error (levels, per frame) within which two encodes show the same clip: libx264
here sometimes re-encodes the same frames differently (up to 4.1 levels seen); a different clip
is over 60 levels away (docs/data.md)."""


def frame_errors(video: bytes, reference: bytes) -> np.ndarray:
    """Per-frame mean absolute error between two encodes; raises if their shapes differ."""
    frames, reference_frames = decode_all_frames(video), decode_all_frames(reference)
    assert frames.shape == reference_frames.shape, (frames.shape, reference_frames.shape)
    return np.abs(frames.astype(np.int16) - reference_frames).mean(axis=(1, 2, 3))


def numbered_frames(count: int, height: int = 48, width: int = 64, seed: int = 0) -> np.ndarray:
    """Frames that differ strongly from their neighbours: a bar at a frame-specific position
    plus a frame-specific background level, so an off-by-one frame shows a large error."""
    rng = np.random.default_rng(seed)
    frames = np.empty((count, height, width, 3), dtype=np.uint8)
    base = rng.integers(0, 256, size=(count, 3))
    for i in range(count):
        frames[i] = (base[i] // 2 + 40).astype(np.uint8)
        x = (i * 7) % (width - 8)
        frames[i, :, x : x + 8] = 255 - frames[i, 0, 0]
        frames[i, (i * 5) % (height - 6) :][:6] = (i * 37) % 256
    return frames


def encode(frames: np.ndarray, fps: float = 15.0, gop: int = 16, bframes: int = 0) -> bytes:
    return encode_h264(frames, fps, EncoderSettings(gop=gop, bframes=bframes, crf=18))


def encode_vfr(frames: np.ndarray, gaps_s: list[float]) -> bytes:
    """Variable frame rate: frame i+1 follows frame i after gaps_s[i % len(gaps_s)] seconds."""
    height, width = frames.shape[1:3]
    encoder = H264Encoder(
        width, height, 30, EncoderSettings(gop=12, crf=18), time_base=Fraction(1, 1000)
    )
    t = 0.0
    for i, frame in enumerate(frames):
        encoder.write(frame, pts_s=t)
        t += gaps_s[i % len(gaps_s)]
    return encoder.finish()


def encode_to_file(path, frames: np.ndarray, fps: float = 15.0, faststart: bool = False) -> None:
    """Encode to a file (faststart puts the index first, needed to test mid-file truncation)."""
    options = {"movflags": "+faststart"} if faststart else {}
    with av.open(str(path), mode="w", format="mp4", options=options) as container:
        stream = container.add_stream("libx264", rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.options = {"crf": "23", "preset": "veryfast"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def audio_only_mp4(seconds: float = 1.0) -> bytes:
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("aac", rate=16000)
        samples = int(16000 * seconds)
        tone = (0.2 * np.sin(np.arange(samples) * 0.05)).astype(np.float32)
        for start in range(0, samples, 1024):
            chunk = tone[start : start + 1024][None, :]
            frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout="mono")
            frame.sample_rate = 16000
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def png_bytes(height: int = 48, width: int = 64) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(numbered_frames(1, height, width)[0]).save(buffer, format="PNG")
    return buffer.getvalue()


def zero_timestamps(data: bytes) -> bytes:
    """Break an mp4's timing: set every sample duration in its 'stts' box to 0."""
    data = bytearray(data)
    at = data.find(b"stts")
    if at < 0:
        raise ValueError("no stts box")
    entries = struct.unpack(">I", data[at + 8 : at + 12])[0]
    for k in range(entries):
        offset = at + 12 + 8 * k + 4  # (sample_count, sample_delta): zero the delta
        data[offset : offset + 4] = b"\0\0\0\0"
    return bytes(data)


def mux(frames: np.ndarray, container_format: str, codec: str, fps: float = 25.0, **options):
    """Encode with any PyAV codec into any container (AVI/mpeg4, WebM/VP9, MP4/AV1 ...)."""
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format=container_format) as container:
        stream = container.add_stream(codec, rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.options = {key.replace("_", "-"): str(value) for key, value in options.items()}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()

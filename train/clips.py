"""Video clips in a dataset: what a clip holds (``probe``), which frames a sample takes
(``pick_frames``), decoding just those (``decode_frames``), and writing clips (``write_clip``,
``reencode``: the tests' clips and ``pack --fit``).

PyAV (FFmpeg's libraries in a wheel; no system ffmpeg) and Pillow only: the client's packer uses
this module on laptops without torch or numpy.

Time is the clip's own: every frame's presentation time comes from its packet's timestamp, so a
variable-frame-rate clip (phones record those) is sampled at the times the frames were shown, not
by counting frames. Rotation is FFmpeg's display matrix (``VideoFrame.rotation``, degrees
counter-clockwise), applied to every decoded frame as a player would.

Hostile clips are refused before anything is decoded from the headers and the packet listing: a
frame over the pixel cap, more frames than ``max_frames``. Decoding stops after the last frame a
sample needs.
"""

from __future__ import annotations

import bisect
import fractions
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av
from av.error import FFmpegError
from av.video.stream import VideoStream
from PIL import Image

from .dataset_rules import MIN_IMAGE_SIDE, VideoRule

# How frames are drawn from a clip (the spec's ``video.sampling``): a window of consecutive frames at
# the target frame rate from the clip's start, or from a random place (a new one each epoch, from
# the seed), or the frames spread evenly over the whole clip (the frame rate is then the clip's
# length over the frame count).
SAMPLINGS = ("start", "random", "uniform")


class ClipError(ValueError):
    """The clip cannot be used (it is skipped and named with this reason)."""


class ClipRefused(ValueError):
    """The clip is unsafe to decode (a frame over the pixel cap, too many frames): the dataset is refused."""


@dataclass(frozen=True)
class ClipInfo:
    width: int  # as shown (rotation applied)
    height: int
    rotation: int  # degrees counter-clockwise the stored frames are turned to be shown
    times: tuple[float, ...]  # every frame's presentation time in seconds from the first, ascending
    frame_duration: float  # the last frame's duration (seconds)
    codec: str

    @property
    def frames(self) -> int:
        return len(self.times)

    @property
    def duration(self) -> float:
        return self.times[-1] + self.frame_duration

    @property
    def fps(self) -> float:
        return self.frames / self.duration if self.duration > 0 else 0.0

    @property
    def variable_rate(self) -> bool:
        """The frames are not evenly spaced (more than 10 % apart in duration)."""
        gaps = [b - a for a, b in zip(self.times, self.times[1:], strict=False)]
        return bool(gaps) and max(gaps) > 1.1 * min(gaps)

    def describe(self) -> str:
        rate = "variable" if self.variable_rate else f"{self.fps:.3g}"
        return f"{self.width}x{self.height}, {self.frames} frames, {self.duration:.2f} s, {rate} fps, {self.codec}"


def _open(path: Path):
    try:
        return av.open(str(path))
    except (FFmpegError, OSError, UnicodeDecodeError) as exc:
        raise ClipError(f"cannot be read as a video ({_why(exc)})") from None


def _why(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:200]


def _rotation(degrees: float | int | None) -> int:
    """A display-matrix angle as a multiple of 90 in 0..270 (other angles are shown unrotated)."""
    r = round(float(degrees or 0)) % 360
    return r if r in (0, 90, 180, 270) else 0


def probe(path: Path, max_pixels: int, max_frames: int) -> ClipInfo:
    """What a clip holds, from its headers, its packet timestamps and its first frame (for the
    rotation); nothing else is decoded. ``ClipRefused`` for a frame size over ``max_pixels`` or a
    packet count over ``max_frames``; ``ClipError`` for what cannot be used."""
    with _open(path) as container:
        if not container.streams.video:
            raise ClipError("holds no video stream")
        stream = container.streams.video[0]
        ctx = stream.codec_context
        width, height = ctx.width, ctx.height
        if width * height > max_pixels:
            raise ClipRefused(
                f"clip {Path(path).name!r}: {width}x{height} frames are over the cap of {max_pixels} pixels"
            )
        if not width or not height:
            raise ClipError("the video stream declares no frame size")
        stamps: list[int] = []
        last_duration = 0
        try:
            for packet in container.demux(stream):
                stamp = packet.pts if packet.pts is not None else packet.dts
                if stamp is None or packet.size == 0:
                    continue
                stamps.append(stamp)
                last_duration = max(last_duration, packet.duration or 0)
                if len(stamps) > max_frames:
                    raise ClipRefused(
                        f"clip {Path(path).name!r}: more than {max_frames} frames (the cap, dataset.max_clip_frames)"
                    )
        except FFmpegError as exc:
            raise ClipError(f"cannot be read as a video ({_why(exc)})") from None
        if not stamps:
            raise ClipError("the video stream holds no frames")
        base = float(stream.time_base or 0)
        if base <= 0:
            raise ClipError("the video stream has no time base")
        stamps.sort()
        times = tuple((s - stamps[0]) * base for s in stamps)
        gaps = [b - a for a, b in zip(times, times[1:], strict=False) if b > a]
        frame_duration = last_duration * base or (sum(gaps) / len(gaps) if gaps else 0.0)
        if not frame_duration and stream.average_rate:
            frame_duration = 1 / float(stream.average_rate)
        rotation = _first_frame_rotation(container, stream)
        codec = ctx.name
    if rotation in (90, 270):
        width, height = height, width
    return ClipInfo(width, height, rotation, times, frame_duration, codec)


def _first_frame_rotation(container, stream) -> int:
    try:
        container.seek(0, stream=stream)
        for frame in container.decode(stream):
            return _rotation(frame.rotation)
    except FFmpegError as exc:
        raise ClipError(f"its frames cannot be decoded ({_why(exc)})") from None
    raise ClipError("its frames cannot be decoded (no frame came out of the decoder)")


def window_seconds(count: int, fps: float) -> float:
    """How long a window of ``count`` frames at ``fps`` is, from its first frame's time to its last's."""
    return (count - 1) / fps


def longest_count(info: ClipInfo, counts: Sequence[int], fps: float, sampling: str) -> int | None:
    """The most frames of ``counts`` a sample of this clip can take (``uniform`` needs as many
    frames; the windowed samplings need the window's time span), or None when not even the fewest."""
    fits = [
        n
        for n in counts
        if (n <= info.frames if sampling == "uniform" else info.times[-1] + 1e-6 >= window_seconds(n, fps))
    ]
    return max(fits) if fits else None


def pick_frames(
    info: ClipInfo, count: int, fps: float, sampling: str, draw: random.Random | None = None
) -> list[int]:
    """The indices (into ``info.times``) of the ``count`` frames of one sample: at the times a
    player shows them, ``1 / fps`` apart from the window's start (``start``: the clip's first frame;
    ``random``: a time drawn by ``draw`` so the window fits), or ``uniform``: spread evenly from the
    first frame to the last. A frame shown over several sample times repeats (a clip slower than
    ``fps``). ``ClipError`` when the clip is too short for ``count``."""
    if sampling not in SAMPLINGS:
        raise ValueError(f"sampling {sampling!r}: use one of {', '.join(SAMPLINGS)}")
    if longest_count(info, [count], fps, sampling) is None:
        raise ClipError(too_short_reason(info, [count], fps, sampling))
    if count == 1:
        return [0]
    if sampling == "uniform":
        step = info.times[-1] / (count - 1)
        wanted = [i * step for i in range(count)]
    else:
        span = window_seconds(count, fps)
        start = 0.0
        if sampling == "random":
            assert draw is not None, "random sampling needs a random generator"
            start = draw.uniform(0.0, max(0.0, info.times[-1] - span))
        wanted = [start + i / fps for i in range(count)]
    # the frame on screen at time t: the last one whose time is at or before t
    return [max(0, bisect.bisect_right(info.times, t + 1e-6) - 1) for t in wanted]


def sample_frames_or_reason(info: ClipInfo, rule: VideoRule) -> tuple[int | None, str]:
    """(the frames a sample of this clip takes, "") or (None, why the clip is skipped): too small,
    longer than ``rule.max_seconds``, too short for the fewest frames. The staging and the packer
    both ask this, so they skip the same clips for the same reasons."""
    if min(info.width, info.height) < MIN_IMAGE_SIDE:
        return None, f"too small ({info.width}x{info.height}; at least {MIN_IMAGE_SIDE} px a side)"
    if info.duration > rule.max_seconds:
        return None, (
            f"{info.duration:.1f} s long, over the limit of {rule.max_seconds:g} s (dataset.max_clip_seconds)"
        )
    frames = longest_count(info, rule.frames, rule.fps, rule.sampling)
    if frames is None:
        return None, too_short_reason(info, rule.frames, rule.fps, rule.sampling)
    return frames, ""


def too_short_reason(info: ClipInfo, counts: Sequence[int], fps: float, sampling: str) -> str:
    fewest = min(counts)
    if sampling == "uniform":
        return f"too short: {info.frames} frames, and a sample takes at least {fewest}"
    return (
        f"too short: {info.duration:.2f} s ({info.frames} frames), and {fewest} frames at {fps:g} fps "
        f"span {window_seconds(fewest, fps) + 1 / fps:.2f} s"
    )


def decode_frames(path: Path, info: ClipInfo, indices: Iterable[int], max_pixels: int) -> list[Image.Image]:
    """The frames at ``indices`` (as ``pick_frames`` chose them; repeats allowed), as shown: 8-bit
    RGB, rotation applied. Decoding stops after the last one needed. ``ClipError`` when the decoder
    fails or ends before it; ``ClipRefused`` for a frame over the pixel cap (a stream that changes
    size mid-way)."""
    order = list(indices)
    wanted = set(order)
    last = max(wanted)
    got: dict[int, Image.Image] = {}
    seen = 0
    with _open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        try:
            for frame in container.decode(stream):
                index = seen
                seen += 1
                if index not in wanted:
                    if index > last:
                        break
                    continue
                if frame.width * frame.height > max_pixels:
                    raise ClipRefused(
                        f"clip {Path(path).name!r}: frame {index} is {frame.width}x{frame.height}, over the cap "
                        f"of {max_pixels} pixels"
                    )
                img = frame.to_image()
                turn = _rotation(frame.rotation) or info.rotation
                got[index] = img.rotate(turn, expand=True) if turn else img
                if len(got) == len(wanted):
                    break
        except FFmpegError as exc:
            raise ClipError(f"its frames cannot be decoded after frame {seen} ({_why(exc)})") from None
    if len(got) < len(wanted):
        raise ClipError(
            f"the decoder gave {seen} frames, and the sample needs frame {max(wanted - set(got))} "
            f"(of {info.frames} the container lists)"
        )
    return [got[i] for i in order]


# --------------------------------------------------------------------------------------------
# writing


def frame_strip(frames: Sequence[Image.Image], most: int = 8) -> Image.Image:
    """A row of up to ``most`` frames spread evenly over the clip (first and last included): the
    still the contact sheet, the scores and the model card use for a video."""
    n = len(frames)
    picks = [round(i * (n - 1) / (most - 1)) for i in range(most)] if n > most else list(range(n))
    w, h = frames[0].size
    strip = Image.new("RGB", (w * len(picks), h))
    for k, i in enumerate(picks):
        strip.paste(frames[i].convert("RGB"), (k * w, 0))
    return strip


def write_clip(
    path: Path,
    frames: Sequence[Image.Image],
    fps: float = 16.0,
    *,
    times: Sequence[float] | None = None,
    rotation: int = 0,
    crf: int = 18,
    codec: str = "libx264",
    audio: tuple[Any, int] | None = None,
) -> Path:
    """Write ``frames`` as a clip (H.264 in MP4 by default; the container follows the extension).
    ``times``: each frame's presentation time in seconds (a variable frame rate); default ``i / fps``.
    ``rotation``: the display matrix's angle (degrees counter-clockwise), as a phone writes it.
    ``audio``: a soundtrack, (samples as a (channels, n) float array in [-1, 1], sample rate), in AAC."""
    path = Path(path)
    width, height = frames[0].size
    base = fractions.Fraction(1, 90_000)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fractions.Fraction(fps).limit_denominator(1001))
        assert isinstance(stream, VideoStream)
        stream.width, stream.height = width - width % 2, height - height % 2
        stream.pix_fmt = "yuv420p"
        stream.time_base = base
        stream.codec_context.time_base = base
        if codec == "libx264":
            stream.options = {"crf": str(crf), "preset": "veryfast"}
        if rotation:
            stream.set_display_rotation(rotation)
        track = _audio_track(container, *audio) if audio is not None else None
        for i, img in enumerate(frames):
            frame = av.VideoFrame.from_image(img.convert("RGB").resize((stream.width, stream.height)))
            t = times[i] if times is not None else i / fps
            frame.pts, frame.time_base = round(t / base), base
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
        if track is not None:
            sound, frame = track
            container.mux(sound.encode(frame))
            container.mux(sound.encode())
    return path


def _audio_track(container: Any, samples: Any, rate: int) -> tuple[Any, Any]:
    """An AAC stream for ``samples`` ((channels, n) floats; mono or stereo), added before any packet
    is written, and its one frame from time 0 (the encoder cuts it into AAC's frames)."""
    import numpy as np  # (the trainer's: a render's soundtrack; the client never writes one)

    samples = np.ascontiguousarray(np.clip(np.asarray(samples, dtype=np.float32), -1.0, 1.0))
    layout = "stereo" if samples.shape[0] >= 2 else "mono"
    stream = container.add_stream("aac", rate=rate)
    stream.layout = layout
    frame = av.AudioFrame.from_ndarray(
        samples[: 2 if layout == "stereo" else 1], format="fltp", layout=layout
    )
    frame.sample_rate, frame.pts = rate, 0
    return stream, frame


def reencode(src: Path, dest: Path, max_side: int, crf: int) -> tuple[int, int]:
    """``src`` as H.264 at quality ``crf`` (higher is smaller), its longer side at most ``max_side``
    (never upscaled); frame times and rotation kept. Returns the stored (width, height)."""
    with _open(src) as source:
        if not source.streams.video:
            raise ClipError("holds no video stream")
        stream_in = source.streams.video[0]
        stream_in.thread_type = "AUTO"
        width, height = stream_in.codec_context.width, stream_in.codec_context.height
        scale = min(1.0, max_side / max(width, height))
        out_w, out_h = max(2, round(width * scale / 2) * 2), max(2, round(height * scale / 2) * 2)
        base = stream_in.time_base or fractions.Fraction(1, 90_000)
        rate = stream_in.average_rate or stream_in.guessed_rate or 16
        with av.open(str(dest), "w", format="mp4") as out:
            stream = out.add_stream("libx264", rate=rate)
            assert isinstance(stream, VideoStream)
            stream.width, stream.height, stream.pix_fmt = out_w, out_h, "yuv420p"
            stream.time_base = base
            stream.codec_context.time_base = base
            stream.options = {"crf": str(crf), "preset": "veryfast"}
            rotated = False
            try:
                for frame in source.decode(stream_in):
                    if not rotated:
                        turn = _rotation(frame.rotation)
                        if turn:
                            stream.set_display_rotation(turn)
                        rotated = True
                    img = frame.to_image().resize((out_w, out_h), Image.Resampling.LANCZOS)
                    new = av.VideoFrame.from_image(img)
                    new.pts, new.time_base = frame.pts, base
                    out.mux(stream.encode(new))
            except FFmpegError as exc:
                raise ClipError(f"its frames cannot be decoded ({_why(exc)})") from None
            out.mux(stream.encode())
    return out_w, out_h

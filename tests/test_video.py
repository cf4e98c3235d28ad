"""stvr.data.video: decoding, timestamp resampling, range seeking, clips, writing,
the clip cache and every bad-input case (tiny videos, lossless ffv1 where pixel
values must be exact)."""

from __future__ import annotations

import os
import pickle
import threading
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from stvr.data import decode
from stvr.data import video as V


def _indexed_frames(n: int, h: int = 16, w: int = 16) -> np.ndarray:
    """Frame i is a flat colour that encodes i exactly: (i % 256, i // 256 * 40, 255 - i % 256)."""
    i = np.arange(n)
    rgb = np.stack([i % 256, (i // 256) * 40, 255 - i % 256], axis=1).astype(np.uint8)
    return np.broadcast_to(rgb[:, None, None, :], (n, h, w, 3)).copy()


def _index_of(frames: np.ndarray) -> np.ndarray:
    """Inverse of :func:`_indexed_frames` for lossless decodes."""
    c = frames[:, 0, 0].astype(np.int64)
    return c[:, 0] + (c[:, 1] // 40) * 256


def _textured(n: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    """Smooth moving pattern (compresses well, changes every frame)."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    t = np.arange(n, dtype=np.float32)[:, None, None]
    r = 127 + 100 * np.sin(x / 8.0 + t * 0.3 + seed)
    g = 127 + 100 * np.cos(y / 9.0 - t * 0.2)
    b = 127 + 100 * np.sin((x + y) / 10.0 + t * 0.1)
    return np.stack([r + 0 * y, g + 0 * x, b], axis=-1).clip(0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def vids(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("videos")
    out = {}
    # 2 s, 24 fps, 48 x 64 (H x W), libx264
    out["mp4"] = V.write_video(d / "a.mp4", _textured(48, 48, 64), 24)
    # lossless sources at other rates
    out["f30"] = V.write_video(d / "f30.mkv", _indexed_frames(90), 30, codec="ffv1")
    out["f12"] = V.write_video(d / "f12.mkv", _indexed_frames(36), 12, codec="ffv1")
    out["f24"] = V.write_video(d / "f24.mkv", _indexed_frames(96), 24, codec="ffv1")
    # 6 s at 30 fps, libx264, key frame every second (for range seeking)
    out["long"] = V.write_video(d / "long.mp4", _textured(180, 32, 32, seed=1), 30)
    return out


# ----------------------------------------------------------------------------- basics


def test_write_probe_read_mp4(vids):
    info = V.probe(vids["mp4"])
    assert (info.width, info.height) == (64, 48)
    assert info.fps == pytest.approx(24.0)
    assert info.duration == pytest.approx(2.0, abs=1e-6)
    assert info.num_frames == 48
    assert info.codec == "h264"
    assert V.probe(vids["mp4"], exact=True).num_frames == 48
    frames = V.read_frames(vids["mp4"])
    assert frames.shape == (48, 48, 64, 3) and frames.dtype == np.uint8
    src = _textured(48, 48, 64).astype(np.float64)
    assert np.abs(frames.astype(np.float64) - src).mean() < 6.0  # crf 18 + 4:2:0 chroma round trip
    assert V.read_frames(vids["mp4"], size=32).shape == (48, 32, 32, 3)
    assert V.read_frames(vids["mp4"], 0.5, 1.0, size=(20, 30)).shape == (12, 20, 30, 3)
    # 3 clips per second
    assert V.frames_to_clips(frames, 8).shape == (6, 3, 8, 48, 64)


def test_probe_mkv_without_frame_count(vids):
    info = V.probe(vids["f30"])
    assert info.fps == pytest.approx(30.0)
    assert info.duration == pytest.approx(3.0, abs=0.01)
    assert info.num_frames == 90


# ----------------------------------------------------------------------------- resampling


@pytest.mark.parametrize("key,src_fps,n_src", [("f30", 30, 90), ("f12", 12, 36), ("f24", 24, 96)])
def test_resample_by_timestamp(vids, key, src_fps, n_src):
    out = V.read_frames(vids[key], fps=24)
    assert out.shape[0] == n_src * 24 // src_fps  # up to the end of the last frame
    k = np.arange(out.shape[0])
    expected = (k * src_fps) // 24  # latest source frame i with i / src <= k / 24 (exact rationals)
    np.testing.assert_array_equal(_index_of(out), expected)
    # a range: output times start + k / 24
    part = V.read_frames(vids[key], start=0.75, end=2.0, fps=24)
    assert part.shape[0] == 30
    exp = np.floor((Fraction(3, 4) + np.array([Fraction(int(j), 24) for j in range(30)])) * src_fps).astype(np.int64)
    np.testing.assert_array_equal(_index_of(part), exp)


def test_resample_variable_frame_rate(tmp_path):
    rng = np.random.default_rng(3)
    grid = np.arange(0, 3000, 1000 / 24)  # output times in ms
    times, t = [0], 0
    while t < 2500:
        t += int(rng.integers(8, 95))
        if np.abs(grid - t).min() > 1.5:  # keep clear of the 1 ms tolerance
            times.append(t)
    times = np.asarray(times, dtype=np.int64)
    assert np.diff(times).max() > 2 * np.diff(times).min()  # really irregular
    n = len(times)
    path = V.write_video(tmp_path / "vfr.mkv", _indexed_frames(n), 24, codec="ffv1", times=times / 1000.0)
    out = V.read_frames(path, 0.0, 2.0, fps=24)
    tk = np.arange(48) * 1000 / 24
    expected = np.searchsorted(times, tk, side="right") - 1
    np.testing.assert_array_equal(_index_of(out), expected)
    # same rule for a seeked range (ffv1: every frame is a key frame)
    part = V.read_frames(path, 1.0, 2.0, fps=24)
    np.testing.assert_array_equal(_index_of(part), expected[24:])
    # and through libx264 (lossy: identify frames by rounding the grey level)
    gray = (np.arange(n) % 50 * 5).astype(np.uint8)
    frames = np.broadcast_to(gray[:, None, None, None], (n, 16, 16, 3)).copy()
    p2 = V.write_video(tmp_path / "vfr.mp4", frames, 24, times=times / 1000.0, crf=0)
    got = V.read_frames(p2, 0.0, 2.0, fps=24)[:, 8, 8, 1].astype(np.int64)
    np.testing.assert_array_equal(np.round(got / 5).astype(np.int64) % 50, expected % 50)


# ----------------------------------------------------------------------------- ranges and clips


class _CountingContainer:
    def __init__(self, c, counter):
        self._c, self._counter = c, counter

    def decode(self, *args, **kwargs):
        for f in self._c.decode(*args, **kwargs):
            self._counter[0] += 1
            yield f

    def __getattr__(self, name):
        return getattr(self._c, name)


def test_range_equals_slice_of_full_decode(vids, monkeypatch):
    full = V.read_frames(vids["long"], size=24)
    assert full.shape == (144, 24, 24, 3)
    for a, b in [(0.5, 1.5), (2.0, 3.25), (4.875, 5.0), (1.0, 4.0), (5.5, 6.0)]:
        part = V.read_frames(vids["long"], a, b, size=24)
        i, j = int(round(a * 24)), int(round(b * 24))
        assert part.shape[0] == j - i
        np.testing.assert_array_equal(part, full[i:j])
    # seeking: a 1 s range near the end decodes about one GOP, not the file
    counter = [0]
    real_open = decode._open

    def counting_open(path):
        c, s = real_open(path)
        return _CountingContainer(c, counter), s

    monkeypatch.setattr(decode, "_open", counting_open)
    V.read_frames(vids["long"], 4.0, 5.0, size=24)
    assert 30 <= counter[0] <= 75  # 30 frames of the range + at most ~1 GOP before it + lookahead


def test_iter_clips_equals_frames_to_clips(vids):
    frames = V.read_frames(vids["long"], 0.5, None, fps=24, size=16)
    assert frames.shape[0] == 132  # (6 - 0.5) * 24
    chunks = list(V.iter_clips(vids["long"], 0.5, None, fps=24, size=16, clips_per_chunk=4))
    assert all(1 <= c.shape[0] <= 4 and c.shape[1:] == (8, 16, 16, 3) for c in chunks)
    clips = np.concatenate(chunks)
    assert clips.shape[0] == 132 // 8  # trailing 4 frames dropped
    np.testing.assert_array_equal(clips.reshape(-1, 16, 16, 3), frames[: clips.shape[0] * 8])
    t = V.frames_to_clips(frames)
    assert t.shape == (16, 3, 8, 16, 16)
    np.testing.assert_allclose(t.numpy(), (clips.astype(np.float32) / 127.5 - 1.0).transpose(0, 4, 1, 2, 3),
                               atol=1e-6)
    assert float(t.min()) >= -1.0 and float(t.max()) <= 1.0
    # bounded range
    c2 = np.concatenate(list(V.iter_clips(vids["long"], 1.0, 2.0, size=16, clips_per_chunk=2)))
    np.testing.assert_array_equal(c2.reshape(-1, 16, 16, 3), frames[12:36])
    with pytest.raises(ValueError, match="fewer than one clip"):
        next(V.iter_clips(vids["long"], 1.0, 1.2, size=16))


def test_frames_to_clips_values_and_checks():
    f = np.zeros((17, 4, 4, 3), np.uint8)
    f[:, :, :, 0] = 255
    c = V.frames_to_clips(f)
    assert c.shape == (2, 3, 8, 4, 4) and c.dtype.is_floating_point
    assert float(c[:, 0].min()) == 1.0 and float(c[:, 1].max()) == -1.0
    with pytest.raises(ValueError, match="uint8"):
        V.frames_to_clips(f.astype(np.float32))
    with pytest.raises(ValueError, match=r"\[F, H, W, 3\]"):
        V.frames_to_clips(f[..., 0])


# ----------------------------------------------------------------------------- end of video


def test_range_past_the_end(vids):
    path = vids["f24"]  # 96 frames = 4.0 s
    last = V.read_frames(path, 3.0, 4.0)[-1]
    past = V.read_frames(path, 3.5, 4.75)  # 0.75 s after the end: repeats the last frame
    assert past.shape[0] == 30
    np.testing.assert_array_equal(_index_of(past[:12]), np.arange(84, 96))
    assert (past[12:] == last).all()
    only_after = V.read_frames(path, 4.2, 4.9)
    assert (only_after == last).all() and only_after.shape[0] == 17
    with pytest.raises(V.VideoError, match=r"f24\.mkv.*ends at (4\.00\d|3\.99\d) s"):
        V.read_frames(path, 3.0, 5.5)
    with pytest.raises(V.VideoError, match="ends at"):
        V.read_frames(path, 6.0, 7.0)
    with pytest.raises(ValueError, match="greater than start"):
        V.read_frames(path, 2.0, 2.0)
    with pytest.raises(ValueError, match="start must be >= 0"):
        V.read_frames(path, -1.0, 1.0)


# ----------------------------------------------------------------------------- writing


def test_write_odd_size_gray_and_atomicity(tmp_path):
    frames = _textured(6, 33, 31)
    p = V.write_video(tmp_path / "odd.mp4", frames, 24)
    info = V.probe(p)
    assert (info.width, info.height) == (32, 34)  # padded to even for yuv420p
    back = V.read_frames(p)
    assert back.shape == (6, 34, 32, 3)
    assert np.abs(back[:, :33, :31].astype(float) - frames).mean() < 6.0
    # the padding repeats the last row / column
    assert np.abs(back[:, 33, :31].astype(float) - frames[:, 32]).mean() < 6.0
    assert np.abs(back[:, :33, 31].astype(float) - frames[:, :, 30]).mean() < 6.0
    # odd sizes stay odd with a codec that allows them; resizing from odd sizes
    p2 = V.write_video(tmp_path / "odd.mkv", frames, 24, codec="ffv1")
    np.testing.assert_array_equal(V.read_frames(p2), frames)
    assert V.read_frames(p2, size=16).shape == (6, 16, 16, 3)
    # grayscale input file -> RGB output with R == G == B
    gray = (np.arange(8)[:, None, None] * 30 + np.zeros((8, 10, 12), np.uint8)).astype(np.uint8)
    p3 = V.write_video(tmp_path / "gray.mkv", gray, 24, codec="ffv1", pix_fmt="gray")
    assert V.probe(p3).pix_fmt == "gray"
    g = V.read_frames(p3)
    assert g.shape == (8, 10, 12, 3)
    np.testing.assert_array_equal(g, np.repeat(gray[..., None], 3, axis=-1))
    # bad arguments; no temp files left behind
    with pytest.raises(ValueError, match="no frames"):
        V.write_video(tmp_path / "empty.mp4", np.zeros((0, 8, 8, 3), np.uint8), 24)
    with pytest.raises(ValueError, match="uint8"):
        V.write_video(tmp_path / "float.mp4", np.zeros((2, 8, 8, 3), np.float32), 24)
    with pytest.raises(ValueError, match="fps"):
        V.write_video(tmp_path / "fps.mp4", np.zeros((2, 8, 8, 3), np.uint8), 0)
    assert sorted(f.name for f in tmp_path.iterdir()) == ["gray.mkv", "odd.mkv", "odd.mp4"]
    assert V.default_codec() in ("libx264", "mpeg4")


def test_write_is_deterministic(tmp_path):
    frames = _textured(24, 32, 32)
    a = V.write_video(tmp_path / "a.mp4", frames, 24)
    b = V.write_video(tmp_path / "b.mp4", frames, 24)
    c = V.write_video(tmp_path / "c.mp4", frames, 24)
    assert a.read_bytes() == b.read_bytes() == c.read_bytes()


# ----------------------------------------------------------------------------- bad input


def _empty_video_stream(path: Path) -> Path:
    """A Matroska file whose video stream has no frames (an audio stream keeps it valid)."""
    c = av.open(str(path), "w")
    s = c.add_stream("mpeg4", rate=24)
    s.width, s.height, s.pix_fmt = 32, 32, "yuv420p"
    a = c.add_stream("pcm_s16le", rate=8000)
    c.start_encoding()
    fr = av.AudioFrame.from_ndarray(np.zeros((1, 8000), np.int16), format="s16", layout="mono")
    fr.sample_rate, fr.pts = 8000, 0
    for p in a.encode(fr):
        c.mux(p)
    for p in a.encode():
        c.mux(p)
    c.close()
    return path


def _audio_only(path: Path) -> Path:
    c = av.open(str(path), "w")
    a = c.add_stream("pcm_s16le", rate=8000)
    fr = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
    fr.sample_rate, fr.pts = 8000, 0
    for p in a.encode(fr):
        c.mux(p)
    for p in a.encode():
        c.mux(p)
    c.close()
    return path


def test_missing_file(tmp_path):
    p = tmp_path / "nope.mp4"
    for call in (lambda: V.read_frames(p), lambda: V.probe(p), lambda: next(V.iter_clips(p)),
                 lambda: V.ClipCache(tmp_path / "c", 16).frames("nope", p, 0, 1)):
        with pytest.raises(FileNotFoundError, match="nope.mp4"):
            call()


def test_corrupt_and_truncated_files(tmp_path, vids):
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    data = vids["mp4"].read_bytes()
    trunc = tmp_path / "trunc.mp4"  # moov atom at the end: the header is lost
    trunc.write_bytes(data[: len(data) // 2])
    for p in (garbage, empty, trunc):
        with pytest.raises(V.VideoError, match=p.name):
            V.read_frames(p)
        with pytest.raises(V.VideoError, match=p.name):
            V.probe(p)
    with pytest.raises(V.VideoError, match="not a regular file"):
        V.read_frames(tmp_path)
    # damaged in the middle (mp4): the decoder fails -> VideoError naming the file
    mid = tmp_path / "mid.mp4"
    n = len(data)
    mid.write_bytes(data[: n // 3] + bytes(n // 3) + data[2 * n // 3:])
    with pytest.raises(V.VideoError, match=r"mid\.mp4: decoding failed"):
        V.read_frames(mid)
    # truncated Matroska (header intact): the readable part decodes, the rest is an error
    mkv = vids["f24"].read_bytes()
    cut = tmp_path / "cut.mkv"
    cut.write_bytes(mkv[: len(mkv) // 3])
    with pytest.raises(V.VideoError, match=r"cut\.mkv: truncated or corrupt"):
        V.read_frames(cut)
    with pytest.raises(V.VideoError, match=r"cut\.mkv: requested \[0, 4\) s but the video ends"):
        V.read_frames(cut, 0.0, 4.0)
    head = V.read_frames(cut, 0.0, 0.5)
    np.testing.assert_array_equal(_index_of(head), np.arange(12))


def test_no_video_stream_and_zero_frames(tmp_path):
    wav = _audio_only(tmp_path / "sound.wav")
    with pytest.raises(V.VideoError, match=r"sound\.wav: no video stream \(streams: audio\)"):
        V.read_frames(wav)
    with pytest.raises(V.VideoError, match="no video stream"):
        V.probe(wav)
    zero = _empty_video_stream(tmp_path / "zero.mkv")
    with pytest.raises(V.VideoError, match=r"zero\.mkv: the video stream has no frames"):
        V.read_frames(zero)
    with pytest.raises(V.VideoError, match=r"zero\.mkv: the video stream has no frames"):
        V.read_frames(zero, 0.5, 1.0)
    with pytest.raises(V.VideoError, match="no frames"):
        V.probe(zero)
    with pytest.raises(V.VideoError, match="no frames"):
        V.ClipCache(tmp_path / "cache", 16).frames("zero", zero, 0, 1)


# ----------------------------------------------------------------------------- clip cache


def test_clip_cache_hit_miss_and_content(tmp_path, vids):
    cache = V.ClipCache(tmp_path / "cache", size=16, fps=24, chunk_seconds=2)
    path = vids["long"]  # 6 s
    a = cache.frames("long", path, 1, 4)
    assert a.shape == (72, 16, 16, 3) and a.dtype == np.uint8
    assert (cache.hits, cache.misses) == (0, 1)
    np.testing.assert_array_equal(a, V.read_frames(path, 1.0, 4.0, size=16))
    d = cache.entry_dir("long", path)
    assert sorted(p.name for p in d.glob("chunk_*.npy")) == ["chunk_000000.npy", "chunk_000001.npy"]
    b = cache.frames("long", path, 2, 4)
    assert (cache.hits, cache.misses) == (1, 1)
    np.testing.assert_array_equal(b, a[24:])
    b[:] = 0  # a writable copy, the cache is untouched
    np.testing.assert_array_equal(cache.frames("long", path, 2, 4), a[24:])
    c = cache.frames("long", path, 3, 6)  # one new chunk
    assert cache.misses == 2
    np.testing.assert_array_equal(c, V.read_frames(path, 3.0, 6.0, size=16))
    # pickles (DataLoader workers) and a fresh instance reads the same files without decoding
    other = pickle.loads(pickle.dumps(cache))
    other.hits = other.misses = 0
    np.testing.assert_array_equal(other.frames("long", path, 0, 6)[24:96], a)
    assert (other.hits, other.misses) == (1, 0)
    assert not list(d.glob("*.tmp*"))


def test_clip_cache_staleness(tmp_path):
    path = V.write_video(tmp_path / "v.mkv", _indexed_frames(48), 24, codec="ffv1")
    cache = V.ClipCache(tmp_path / "cache", size=8, fps=24)
    first = cache.frames("v", path, 0, 2)
    old_dir = cache.entry_dir("v", path)
    V.write_video(path, _indexed_frames(48)[::-1].copy(), 24, codec="ffv1")
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    new_dir = cache.entry_dir("v", path)
    assert new_dir != old_dir
    second = cache.frames("v", path, 0, 2)
    assert cache.misses == 2
    np.testing.assert_array_equal(second, first[::-1])
    assert not old_dir.exists()  # stale entry removed


def test_clip_cache_end_of_video(tmp_path, vids):
    cache = V.ClipCache(tmp_path / "cache", size=8, fps=24, chunk_seconds=2)
    path = vids["f24"]  # 4.0 s
    full = V.read_frames(path, 0.0, 4.0, size=8)
    a = cache.frames("f24", path, 3, 5)  # 1 s past the end: last frame repeated
    np.testing.assert_array_equal(a[:24], full[72:])
    assert (a[24:] == full[-1]).all()
    b = cache.frames("f24", path, 4, 5)  # entirely after the end, within the tolerance
    assert (b == full[-1]).all()
    with pytest.raises(V.VideoError, match=r"f24\.mkv.*ends at (4\.00\d|3\.99\d) s"):
        cache.frames("f24", path, 3, 6)
    with pytest.raises(ValueError, match="start_second < end_second"):
        cache.frames("f24", path, 2, 2)
    with pytest.raises(ValueError, match="integer number of seconds"):
        cache.frames("f24", path, 0.5, 2)


def test_clip_cache_on_a_full_disk_warns_once_and_serves_decoded_frames(tmp_path, vids, monkeypatch, caplog):
    from stvr.data import clip_cache

    def full_disk(*args, **kwargs):
        raise OSError("11796480 requested and 6291328 written")      # what np.save says on ENOSPC

    monkeypatch.setattr(clip_cache, "_save_array", full_disk)
    monkeypatch.setattr(clip_cache, "write_json", full_disk)
    cache = V.ClipCache(tmp_path / "cache", size=8, fps=24, chunk_seconds=2)
    path = vids["f24"]  # 4.0 s
    full = V.read_frames(path, 0.0, 4.0, size=8)
    with caplog.at_level("WARNING", logger="stvr.data.clip_cache"):
        np.testing.assert_array_equal(cache.frames("f24", path, 1, 4), full[24:])
        a = cache.frames("f24", path, 3, 5)            # past the end: the last frame repeated
        np.testing.assert_array_equal(a[:24], full[72:])
        assert (a[24:] == full[-1]).all()
        assert (cache.frames("f24", path, 4, 5) == full[-1]).all()
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "cannot be written" in warnings[0] and "requested and" in warnings[0]
    assert str(tmp_path / "cache") in warnings[0] and "MiB free" in warnings[0]
    assert not cache.writable and cache.misses == 3 and not list((tmp_path / "cache").rglob("*.npy"))
    # a cache folder that cannot even be created (read-only disk) works the same way
    monkeypatch.setattr(V.ClipCache, "_new_entry", lambda self, d, p: full_disk())
    other = V.ClipCache(tmp_path / "other", size=8, fps=24, chunk_seconds=2)
    np.testing.assert_array_equal(other.frames("f24", path, 0, 4), full)
    assert not other.writable and not (tmp_path / "other").exists()


def test_clip_cache_concurrent_fill(tmp_path, vids):
    cache = V.ClipCache(tmp_path / "cache", size=16, fps=24, chunk_seconds=3)
    results, errors = {}, []

    def work(i):
        try:
            results[i] = cache.frames("long", vids["long"], 0, 6)
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    ref = V.read_frames(vids["long"], 0.0, 6.0, size=16)
    for r in results.values():
        np.testing.assert_array_equal(r, ref)
    d = cache.entry_dir("long", vids["long"])
    assert sorted(p.name for p in d.iterdir()) == ["chunk_000000.npy", "chunk_000001.npy", "meta.json"]

"""The multi-stream pipeline's batching on the CPU (issue 17): the bounded batch wait (``max_wait_ms``), the NVDEC
feeds' producer logic with a fake decoder (grouped threads, chunked decode, pacing, drops), the batched GPU-letterbox
code path against per-frame letterboxing (run on CPU tensors), and the paced sweep's "largest N cameras" line."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from sidnet.runtime import bench_pipeline as bp
from sidnet.runtime.backends.torch import letterbox_into
from sidnet.runtime.decode import Pacing
from sidnet.runtime.errors import DeployError
from sidnet.runtime.pipeline import PipelineOptions, _check, submit_now


# ----------------------------------------------------------------------------------------------- bounded batch wait
def test_submit_now_waits_for_a_full_batch_only_within_the_budget():
    kw = {"batch_size": 8, "draining": False}
    assert not submit_now(size=0, busy=False, oldest_age_ms=1e9, max_wait_ms=1.0, **kw)  # nothing to send
    assert submit_now(size=8, busy=True, oldest_age_ms=0.0, max_wait_ms=None, **kw)  # full
    assert submit_now(size=3, busy=False, oldest_age_ms=0.0, max_wait_ms=None, **kw)  # GPU idle: partial goes
    assert not submit_now(size=3, busy=True, oldest_age_ms=1e6, max_wait_ms=None, **kw)  # no budget: keeps filling
    assert not submit_now(size=3, busy=True, oldest_age_ms=9.9, max_wait_ms=10.0, **kw)  # within the budget
    assert submit_now(size=3, busy=True, oldest_age_ms=10.0, max_wait_ms=10.0, **kw)  # over it: goes busy or not
    assert submit_now(size=3, busy=True, oldest_age_ms=0.0, max_wait_ms=None, batch_size=8, draining=True)


def test_max_wait_must_be_positive(tmp_path):
    with pytest.raises(DeployError, match="--max-wait-ms 0"):
        _check(PipelineOptions(out_dir=tmp_path, max_wait_ms=0.0), {})


def test_deploy_with_a_latency_budget_writes_the_same_records(tiny_onnx, shared_data, tmp_path):
    """--max-wait-ms changes when batches go, never what is detected: same records as without it."""
    from deploy.__main__ import main

    video = shared_data / "video" / "pedestrians_200.mp4"
    runs = {}
    for name, extra in (("plain", []), ("budget", ["--max-wait-ms", "0.5"])):
        out = tmp_path / name
        s = main([str(tiny_onnx), f"a={video}", f"b={video}", "--out", str(out), "--max-frames", "12", "--batch", "8",
                  "--conf", "0.02", "--no-video", "--no-progress", *extra])  # fmt: skip
        runs[name] = (s, {st: (out / f"{st}.jsonl").read_text() for st in ("a", "b")})
    assert runs["budget"][0]["max_wait_ms"] == 0.5 and runs["plain"][0]["max_wait_ms"] is None
    assert runs["budget"][1] == runs["plain"][1]


# --------------------------------------------------------------------------------- NVDEC feeds, fake decoder (CPU)
class FakeDecoder:
    """``get_batch_frames(n)``: up to n frames (H, W, 3) uint8 whose pixels all equal their index, then []."""

    def __init__(self, frames: int, *, size=(6, 4), fail_at: int | None = None) -> None:
        self.n, self.pos, self.size, self.fail_at, self.calls = frames, 0, size, fail_at, []

    def get_batch_frames(self, n: int):
        if self.fail_at is not None and self.pos >= self.fail_at:
            raise RuntimeError("bitstream error")
        k = min(n, self.n - self.pos)
        self.calls.append(k)
        out = [np.full((self.size[1], self.size[0], 3), self.pos + i, np.uint8) for i in range(k)]
        self.pos += k
        return out


class FakeSource:
    def __init__(self, fps: float = 25.0) -> None:
        self.size, self.fps, self.path = (6, 4), fps, "fake.mp4"


def _feeds(n_streams: int, *, frames: int, slots: int, threads: int, pacing=None, max_frames=None, fail_at=None,
           fps: float = 25.0):  # fmt: skip
    from sidnet.runtime.nvdec import NvdecFeeds

    decoders = {}

    def opener(src, *, device, stream):
        assert stream is None  # no CUDA stream on a CPU device
        decoders[len(decoders)] = FakeDecoder(frames, fail_at=fail_at)
        return decoders[len(decoders) - 1]

    files = {f"s{i}": FakeSource(fps) for i in range(n_streams)}
    feeds = NvdecFeeds(files, device=torch.device("cpu"), slots=slots, max_frames=max_frames, pacing=pacing,
                       threads=threads, opener=opener)  # fmt: skip
    return feeds, decoders


def _drain(feeds, *, hold: int = 0, timeout: float = 10.0) -> dict[str, list[int]]:
    """Poll every feed to its end, releasing slots (all but the last ``hold`` frames taken per stream); returns the
    frame values seen per stream (each checked against its index)."""
    seen: dict[str, list[int]] = {n: [] for n in feeds.feeds}
    held: dict[str, list] = {n: [] for n in feeds.feeds}
    end = time.monotonic() + timeout
    done: set[str] = set()
    while len(done) < len(feeds.feeds):  # as the pipeline does: finished counts after a poll that gave nothing
        assert time.monotonic() < end, "the feeds did not finish"
        for name, feed in feeds.feeds.items():
            got = feed.poll(4)
            for f in got:
                assert f.stream == name and (f.image == f.index).all()
                seen[name].append(f.index)
                held[name].append(f)
            if len(held[name]) > hold:
                feed.release(held[name][: len(held[name]) - hold])
                held[name] = held[name][len(held[name]) - hold :]
            if not got and feed.finished:
                done.add(name)
        time.sleep(0.001)
    return seen


def test_nvdec_feeds_decode_every_frame_in_order_through_a_few_threads():
    feeds, decoders = _feeds(5, frames=21, slots=3, threads=2)
    try:
        assert len(feeds.threads) == 2  # 5 streams dealt over 2 threads, not a thread per stream
        seen = _drain(feeds)
    finally:
        feeds.close()
    assert all(v == list(range(21)) for v in seen.values()), seen
    for d in decoders.values():  # calls of up to 8 frames, never more than the 3 free slots, then the end
        assert sum(d.calls) == 21 and max(d.calls) <= 3 and d.calls[-1] == 0, d.calls
    assert all(f.dropped == f.late == 0 and f.decoded == 21 for f in feeds.feeds.values())


def test_nvdec_feed_waits_for_free_slots_and_stops_at_max_frames():
    """Unpaced: a ring of 2 slots held by the consumer stops the producer (nothing dropped); max_frames ends it."""
    feeds, decoders = _feeds(1, frames=50, slots=2, threads=1, max_frames=10)
    feed = feeds.feeds["s0"]
    try:
        time.sleep(0.1)
        taken = feed.poll(10)
        assert [f.index for f in taken] == [0, 1] and feed.poll(10) == []  # the ring is full: the decoder waits
        feed.release(taken)
        seen = _drain(feeds)
    finally:
        feeds.close()
    assert seen["s0"] == list(range(2, 10)) and feed.dropped == 0
    assert decoders[0].pos <= 12 and max(decoders[0].calls) <= 2  # no decoding ahead of the ring


def test_nvdec_feed_decodes_chunks_of_8_when_the_ring_has_room():
    feeds, decoders = _feeds(2, frames=20, slots=16, threads=1)
    try:
        seen = _drain(feeds, hold=0)
    finally:
        feeds.close()
    assert all(v == list(range(20)) for v in seen.values())
    assert all(d.calls[:2] == [8, 8] and sum(d.calls) == 20 for d in decoders.values()), decoders


def test_paced_nvdec_feed_drops_what_the_pipeline_cannot_take():
    """Paced at 200 fps with one slot the consumer never gives back: every later due frame is dropped and counted,
    and frames handed over + dropped + late = the frames of the run."""
    feeds, _ = _feeds(2, frames=30, slots=1, threads=1, pacing=Pacing(time.monotonic() + 0.05), fps=200.0)
    try:
        end = time.monotonic() + 5
        while not all(f._ended for f in feeds.feeds.values()):
            assert time.monotonic() < end
            time.sleep(0.01)
        got = {n: f.poll(100) for n, f in feeds.feeds.items()}
    finally:
        feeds.close()
    for name, feed in feeds.feeds.items():
        assert [f.index for f in got[name]] == [0], got[name]
        pacing = feeds.feeds[name].pacing  # the stream's clock starts at its first frame, not before t0
        assert got[name][0].capture == pytest.approx(pacing.starts[name]) and pacing.starts[name] >= pacing.t0
        assert len(got[name]) + feed.dropped + feed.late == 30 and feed.dropped > 0


def test_nvdec_feeds_decode_their_first_chunk_when_opened():
    """The decoder's start-up is paid at open (a camera's connection): the first chunk is decoded before the feeds'
    threads run, and its frames' capture time is when the feed starts, not when it was opened."""
    from sidnet.runtime.nvdec import NvdecFeed

    class SlowStart(FakeDecoder):
        def get_batch_frames(self, n: int):
            if not self.calls:
                time.sleep(0.2)  # an NVDEC session's first call
            return super().get_batch_frames(n)

    dec = SlowStart(12)
    feed = NvdecFeed("s0", decoder=dec, ring=torch.zeros((4, 4, 6, 3), dtype=torch.uint8), fps=25.0, max_frames=None,
                     pacing=None)  # fmt: skip
    feed.prime()
    assert dec.calls == [4] and len(feed.pending) == 4  # no more than the ring's free slots
    t_start = time.monotonic()
    while feed.step() == 0.0 and feed.k < 4:
        pass
    frames = feed.poll(10)
    assert [f.index for f in frames] == [0, 1, 2, 3] and all(f.capture >= t_start for f in frames)


def test_pacing_starts_each_streams_clock_with_its_decoder():
    """A decoder that starts late (a slow process start) shifts its own stream's clock instead of counting the frames
    due before it was up as late; no stream starts before t0."""
    t0 = time.monotonic() + 0.2
    pacing = Pacing(t0, fps=10.0)
    assert pacing.due(0, 25.0, stream="early") == t0  # asked before t0: starts at t0
    assert pacing.due(3, 25.0, stream="early") == pytest.approx(t0 + 0.3)  # the override fps, its own clock
    time.sleep(0.3)
    late_start = pacing.due(0, 25.0, stream="late")
    assert late_start > t0 + 0.05 and pacing.due(2, 25.0, stream="late") == pytest.approx(late_start + 0.2)
    assert pacing.due(1, 25.0, stream="early") == pytest.approx(t0 + 0.1)  # the first stream's clock is unchanged


def test_nvdec_decoder_error_is_raised_by_the_feed():
    feeds, _ = _feeds(2, frames=30, slots=4, threads=1, fail_at=8)
    try:
        with pytest.raises(RuntimeError, match="bitstream error"):
            _drain(feeds)
    finally:
        feeds.close()


# ------------------------------------------------------------------- batched letterbox = per-frame letterbox (CPU)
def test_batched_letterbox_equals_per_frame_letterbox_on_cpu():
    """The GPU path letterboxes the stacked (B, H, W, 3) uint8 batch in one go (one resize for all frames): on CPU
    tensors it must give exactly the tensors of letterboxing each frame alone, and the stacked gather that the NVDEC
    path uses (torch.stack into the batch buffer) exactly the per-frame copies."""
    g = torch.Generator().manual_seed(0)
    for h, w in ((576, 768), (1080, 1920), (100, 60)):
        frames = [torch.randint(0, 256, (h, w, 3), dtype=torch.uint8, generator=g) for _ in range(5)]
        u8 = torch.zeros((8, h, w, 3), dtype=torch.uint8)
        torch.stack(frames, out=u8[:5])
        per = torch.zeros_like(u8)
        for j, f in enumerate(frames):
            per[j].copy_(f)
        assert torch.equal(u8, per)
        batched = torch.empty((8, 3, 128, 128))
        info = letterbox_into(u8, batched, size=128)
        for j, f in enumerate(frames):
            one = torch.empty((1, 3, 128, 128))
            assert letterbox_into(f[None], one, size=128) == info
            assert torch.equal(batched[j], one[0]), (h, w, j)


def test_batched_letterbox_matches_opencv_letterbox():
    from sidnet.letterbox import letterbox

    rng = np.random.default_rng(1)
    frames = rng.integers(0, 256, (3, 576, 768, 3), dtype=np.uint8)
    out = torch.empty((3, 3, 416, 416))
    info = letterbox_into(torch.from_numpy(frames), out, size=416)
    for j, f in enumerate(frames):
        ref, _, ref_info = letterbox(f, np.zeros((0, 4)), size=416)
        assert ref_info == info
        diff = np.abs(out[j].numpy().transpose(1, 2, 0) - ref.astype(np.float32) / 255.0)
        assert diff.max() <= 1.01 / 255.0, diff.max()  # OpenCV rounds to uint8 after resizing; this does not


# ------------------------------------------------------------------------------ paced sweep: the largest N kept up
def _row(n, kept_up, **kw):
    return {"streams": n, "clip": "1080p-h264", "decode": "nvdec", "backend": "torch", "realtime_fps": 30.0,
            "resolution": "1920x1080", "kept_up": kept_up, **kw}  # fmt: skip


def test_realtime_cases_sweep_each_case_from_the_smallest_count():
    cases = bp.realtime_cases([96, 32, 64], ["576p:process", "1080p-h264:nvdec:torch"], backend="onnxruntime",
                              fps=30.0)  # fmt: skip
    assert [(c.streams, c.clip, c.decode, c.backend) for c in cases] == [
        (32, "576p", "process", "onnxruntime"), (64, "576p", "process", "onnxruntime"),
        (96, "576p", "process", "onnxruntime"), (32, "1080p-h264", "nvdec", "torch"),
        (64, "1080p-h264", "nvdec", "torch"), (96, "1080p-h264", "nvdec", "torch")]  # fmt: skip
    assert all(c.realtime_fps == 30.0 for c in cases)
    with pytest.raises(DeployError, match="CLIP:DECODE"):
        bp.realtime_cases([32], ["1080p-h264"], backend="torch", fps=30.0)


def test_cameras_kept_up_names_the_largest_count_below_the_first_that_fell_behind():
    lines = bp.cameras_kept_up([_row(32, True), _row(64, True), _row(96, False), _row(128, True)])
    assert len(lines) == 1 and "**64**" in lines[0] and "96 fell behind" in lines[0], lines
    assert "1920x1080 nvdec torch at 30 fps" in lines[0]
    assert "none of those tried" in bp.cameras_kept_up([_row(32, False)])[0]
    err = {"streams": 64, "clip": "1080p-h264", "decode": "nvdec", "backend": "torch", "realtime_fps": 30.0,
           "error": "RuntimeError: out of memory"}  # fmt: skip
    line = bp.cameras_kept_up([_row(32, True), err])[0]
    assert "**32**" in line and "64 failed (RuntimeError: out of memory)" in line
    assert bp.cameras_kept_up([{**_row(32, True), "realtime_fps": None}]) == []  # unpaced rows: no line


def test_paced_sweep_stops_at_the_first_count_that_falls_behind(monkeypatch, tmp_path):
    ran = []

    def fake_run_case(case, detector, clip, **kw):
        ran.append((case.clip, case.streams))
        kept = case.streams <= (64 if case.clip == "576p" else 32)
        return {**_row(case.streams, kept), "clip": "file.mp4", "decode": case.decode, "decode_used": case.decode,
                "precision": "fp16", "frames_per_s": 30.0 * case.streams, "latency_ms": {"p50": 1, "p99": 2},
                "mean_batch": 8, "detections_per_frame": 0, "dropped": 0 if kept else 5,
                "stages_s": {"gather": 1.0}}  # fmt: skip

    monkeypatch.setattr(bp, "run_case", fake_run_case)
    monkeypatch.setattr(bp, "network_img_s", lambda det, batch: 1000.0)
    cases = [bp.Case(32, "576p", "process", "torch")]  # unpaced rows are never stopped
    cases += bp.realtime_cases([32, 64, 96, 128], ["576p:process", "1080p-h264:nvdec"], backend="torch", fps=30.0)
    rows, lines = bp.pipeline_rows(cases=cases, detectors={"torch": None}, clips={"576p": None, "1080p-h264": None},
                                   batch=32, max_frames=None, work_dir=tmp_path)  # fmt: skip
    assert ran == [("576p", 32), ("576p", 32), ("576p", 64), ("576p", 96), ("1080p-h264", 32), ("1080p-h264", 64)]
    assert [r["streams"] for r in rows if "not_run" in r] == [128, 96, 128]
    kept = [x for x in lines if x.startswith("Largest N")]
    assert len(kept) == 2 and "**64**" in kept[0] and "not run: 128" in kept[0]
    assert "**32**" in kept[1] and "64 fell behind" in kept[1] and "not run: 96, 128" in kept[1]
    assert any("not run: 96 streams already fell behind" in x for x in lines)

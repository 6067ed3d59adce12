"""The window stream (``FluxMusicPipeline.generate_stream``, behind gRPC GenerateStream and the Triton BLS's
decoupled mode) reports what the non-streaming path reports: ``cfg_evaluations`` per waveform (summed over the
windows) and, through the gRPC scheduler, the kept region's SNR of a long-form request with given audio."""

from __future__ import annotations

import numpy as np
import pytest

SR = 16000


def _wave(seconds: float = 3.0) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    return (0.3 * np.sin(2 * np.pi * 330 * t)).astype(np.float32)


@pytest.mark.parametrize("interval", [None, (0.0, 0.5)])
def test_stream_chunks_carry_cfg_evaluations(tiny_pipe, interval, one_torch_thread):
    opts = dict(steps=3, seed=2, guidance_interval=interval)
    one = tiny_pipe.generate(tiny_pipe.request("slow piano", duration=2.0, **opts))
    assert one.cfg_evaluations > 0
    if interval is not None:  # steps outside the interval run the conditional half only: 0.5 each
        assert one.cfg_evaluations < 3.0 and one.cfg_evaluations % 0.5 == 0
    (chunk,) = tiny_pipe.generate_stream(tiny_pipe.request("slow piano", duration=2.0, **opts))
    assert chunk.cfg_evaluations == one.cfg_evaluations  # one window: the same count as generate()

    long = tiny_pipe.request("slow piano", duration=14.0, **opts)
    chunks = list(tiny_pipe.generate_stream(long))
    assert len(chunks) == 2
    # cumulative over the windows, as evaluations are; every window solves the same steps and interval
    assert [c.cfg_evaluations for c in chunks] == [one.cfg_evaluations, 2 * one.cfg_evaluations]
    joined = tiny_pipe.generate(long)
    assert joined.windows == 2 and joined.cfg_evaluations == 2 * one.cfg_evaluations
    assert joined.evaluations == chunks[-1].evaluations


def test_on_chunk_sees_each_window_before_the_joined_result(tiny_pipe, one_torch_thread):
    seen = []
    result = tiny_pipe.generate(tiny_pipe.request("slow piano", duration=14.0, steps=1, seed=1), on_chunk=seen.append)
    assert [(c.window, c.windows) for c in seen] == [(0, 2), (1, 2)]
    np.testing.assert_array_equal(np.concatenate([c.audio[0] for c in seen]), result.audio[0])
    short = []
    tiny_pipe.generate(tiny_pipe.request("slow piano", duration=1.0, steps=1, seed=1), on_chunk=short.append)
    assert short == []  # one window: no window events (the result is the audio)


def test_grpc_scheduler_reports_long_form_kept_snr(tiny_pipe, one_torch_thread):
    """A long-form request with given audio through the gRPC scheduler: its kept-region SNR is the pipeline's (the
    window path used to hand the model's own decoding SNR instead) and its audio is the joined windows."""
    from fluxmusic.runtime.scheduler import BatchScheduler, Job
    from fluxmusic.runtime.validation import RequestSpec

    request = tiny_pipe.request("slow piano", audio=_wave(), keep="0:2", duration=13.0, steps=1, seed=5)
    ref = tiny_pipe.generate(request)
    assert ref.windows == 2 and ref.kept_snr_db[0] != ref.decoded_kept_snr_db[0]
    windows = []
    scheduler = BatchScheduler(tiny_pipe).start()
    try:
        job = Job(RequestSpec(request, "wav"), on_chunk=windows.append)
        scheduler.submit(job)
        assert job.done.wait(120) and job.code == "OK", job.message
    finally:
        scheduler.stop()
    assert job.kept_snr_db == ref.kept_snr_db
    np.testing.assert_array_equal(job.audio[0], ref.audio[0])
    assert [c.window for c in windows] == [0, 1] and windows[-1].cfg_evaluations == ref.cfg_evaluations == 2.0

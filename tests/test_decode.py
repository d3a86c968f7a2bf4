"""The device-position frame loop (what a GPU captures as one CUDA graph per frame) against the eager reference loop:
the slow step at a device position, whole frame sequences with sampling and RAS, stopping, budgets, progress; and
on a GPU the captured graph against the same loop run eagerly."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from runtime import decode, engine
from runtime.engine import GenerationConfig, generate
from runtime.loader import load_model
from runtime.sampling import SamplingParams
from test_model import frames_sequence

CUDA = torch.cuda.is_available()


@pytest.fixture()
def model64(tiny_checkpoint):
    """The tiny model in float64: the two loops' attention sums differ in rounding only, far below a float32 ulp of
    the logits that sampling reads, so their draws must agree exactly."""
    return load_model(tiny_checkpoint, torch.device("cpu"), torch.float64).model


def frame_loop(monkeypatch) -> None:
    """Make generate() take the device-position loop (FrameLoop; not captured on the CPU)."""
    monkeypatch.setattr(engine, "graph_decoding", lambda model, config: True)


def test_slow_step_at_a_device_position_equals_the_int_position(tiny_model):
    model = tiny_model.model
    tokens = frames_sequence(model.config, 9, 3, seed=4)
    with torch.inference_mode():
        model.setup_caches(64, torch.float32, "cpu")
        model.forward_slow(tokens[..., :10], 0)
        by_int = model.forward_slow(tokens[..., 10:11], 10)
        k_int = model.layers[0].attention.kv_cache.k.clone()
        model.setup_caches(64, torch.float32, "cpu")
        model.forward_slow(tokens[..., :10], 0)
        by_tensor = model.forward_slow(tokens[..., 10:11], torch.tensor([10]))
        k_tensor = model.layers[0].attention.kv_cache.k
        wrong_place = model.forward_slow(tokens[..., 10:11], torch.tensor([11]))  # negative control
    torch.testing.assert_close(by_tensor, by_int, atol=1e-6, rtol=1e-6)
    assert torch.equal(k_tensor[:, :, :11], k_int[:, :, :11]) and not k_int[:, :, 11:].any()
    assert (wrong_place - by_int).abs().max() > 1e-3


def test_decode_step_reads_text_rows_from_the_head(model64):
    """A generated frame's text row comes from the head's copy of the legal rows (so a table kept in host RAM is
    never read while decoding): the same rows as the table's, <|im_end|> included, and a poisoned table unread."""
    c = model64.config
    frames = frames_sequence(c, 0, 6, seed=5)  # [1, 11, 6]: semantic tokens and their codes
    frames[0, :, 2] = 0
    frames[0, 0, 2] = c.im_end_id
    with torch.inference_mode():
        from_table = model64.embed(frames)
        from_head = model64.embed(frames, legal_only=True)
        model64.embeddings.weight.fill_(float("nan"))
        assert torch.equal(model64.embed(frames, legal_only=True), from_head)
        assert model64.embed(frames).isnan().all()  # negative control: the plain path reads the table
    assert torch.equal(from_head, from_table)


@pytest.mark.parametrize("sampling", [SamplingParams(0.8, 0.8, 30), SamplingParams(1.0, 0.9, 5)], ids=str)
def test_frame_loop_decodes_what_the_eager_loop_decodes(model64, monkeypatch, sampling):
    """Same seed, same frames: the semantic draws with RAS, the window kept on the device, the 10 fast draws."""
    prompt = frames_sequence(model64.config, 6, 3, seed=2)[0]
    cfg = GenerationConfig(max_new_tokens=24, sampling=sampling, seed=3)
    eager = generate(model64, prompt, cfg)
    frame_loop(monkeypatch)
    device_loop = generate(model64, prompt, cfg)
    other_seed = generate(model64, prompt, GenerationConfig(max_new_tokens=24, sampling=sampling, seed=4))
    assert eager.codes.shape[1] >= 8
    assert torch.equal(device_loop.codes, eager.codes) and device_loop.stopped == eager.stopped
    assert not torch.equal(other_seed.codes, eager.codes)


@pytest.mark.parametrize("budget, stop_at", [(30, 5), (7, None), (30, 0)])
def test_frame_loop_stops_at_im_end_and_reports_each_frame(model64, monkeypatch, budget, stop_at):
    """<|im_end|> at frame `stop_at` (checked every 4 frames: frames decoded after it are dropped) or the budget;
    progress reported for the same frames as the eager loop, and the codes handed over as the host learns them."""
    model = model64
    real_head = model.head_logits
    calls = {"n": 0}

    def head(hidden):
        logits = real_head(hidden)
        logits[..., 0] = 1e4 if calls["n"] == stop_at else -1e4
        calls["n"] += 1
        return logits

    monkeypatch.setattr(model, "head_logits", head)
    prompt = frames_sequence(model.config, 5, 0)[0]
    cfg = GenerationConfig(max_new_tokens=budget, seed=0)
    runs = {}
    for name in ("eager", "frame loop"):
        if name == "frame loop":
            frame_loop(monkeypatch)
            monkeypatch.setattr(engine.FrameLoop, "check_every", 4)
        calls["n"], seen, pieces = 0, [], []
        result = generate(model, prompt, cfg, on_frame=seen.append, on_codes=lambda c: pieces.append(c.clone()))
        runs[name] = result, seen, pieces
    (eager, eager_seen, eager_pieces), (loop, loop_seen, loop_pieces) = runs["eager"], runs["frame loop"]
    expected = budget if stop_at is None else stop_at
    assert loop.codes.shape == eager.codes.shape == (10, expected)
    assert loop.stopped == eager.stopped == (stop_at is not None)
    assert loop_seen == eager_seen == list(range(expected + (stop_at is not None)))
    assert torch.equal(loop.codes, eager.codes)
    # the codes as they come: every frame eagerly; in the loop after frames 1, 2, 4, then every check_every (4)
    assert [p.shape[1] for p in eager_pieces] == [1] * expected
    bounds = sorted({0, *(b for b in (1, 2, *range(4, budget, 4)) if b < budget), budget})  # the host checks
    assert [p.shape[1] for p in loop_pieces] == [min(b, expected) - a for a, b in zip(bounds, bounds[1:])
                                                 if a < expected]
    for pieces in (eager_pieces, loop_pieces):
        assert torch.equal(torch.cat(pieces, dim=1) if pieces else eager.codes, eager.codes)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_captured_graph_replays_the_frame_loop(tiny_checkpoint, monkeypatch):
    """On a GPU: one graph replay per frame decodes the frames the same loop decodes eagerly (greedy, in fp32: no
    draw to differ and no ties for topk to break either way), and seeded runs repeat."""
    model = load_model(tiny_checkpoint, torch.device("cuda"), torch.float32).model
    prompt = frames_sequence(model.config, 6, 3, seed=2)[0]
    greedy = GenerationConfig(max_new_tokens=40, sampling=SamplingParams(top_k=1), seed=0)
    replayed = generate(model, prompt, greedy)
    with monkeypatch.context() as patch:  # a new loop, every frame eagerly: "replay" runs the step
        patch.setattr(engine.FrameLoop, "capture", lambda loop: SimpleNamespace(replay=loop.step))
        model.frame_loop = None
        eager = generate(model, prompt, greedy)
    captured_runs = [generate(model, prompt, GenerationConfig(max_new_tokens=40, seed=s)) for s in (1, 1, 2)]
    assert replayed.codes.shape[1] == 40 and torch.equal(replayed.codes, eager.codes)
    assert torch.equal(captured_runs[0].codes, captured_runs[1].codes)
    assert not torch.equal(captured_runs[0].codes, captured_runs[2].codes)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_reused_captured_and_eager_first_graphs_draw_the_same_frames(tiny_checkpoint, monkeypatch):
    """On a GPU, one request (another prompt length, state and seed than the model's last) three ways: replaying the
    last request's graph (no capture), a new loop capturing before its first frame, and a new loop whose first frame
    runs eagerly before the capture: the same frames."""
    model = load_model(tiny_checkpoint, torch.device("cuda"), torch.float32).model
    captures = []
    real_capture = engine.FrameLoop.capture
    monkeypatch.setattr(engine.FrameLoop, "capture", lambda loop: captures.append(loop) or real_capture(loop))
    generate(model, frames_sequence(model.config, 6, 3, seed=2)[0], GenerationConfig(max_new_tokens=40, seed=1))
    prompt, config = frames_sequence(model.config, 9, 5, seed=5)[0], GenerationConfig(max_new_tokens=40, seed=4)
    runs = {"reused": generate(model, prompt, config).codes}
    assert len(captures) == 1
    model.frame_loop = None
    runs["captured first"] = generate(model, prompt, config).codes
    model.frame_loop = None
    decode._stepped.clear()
    runs["eager first"] = generate(model, prompt, config).codes
    assert len(captures) == 3 and runs["reused"].shape == (10, 40)
    assert torch.equal(runs["reused"], runs["captured first"]) and torch.equal(runs["reused"], runs["eager first"])


@pytest.mark.parametrize("budget, captures", [(1, 0), (5, 1)])
def test_one_graph_per_request_and_none_for_a_single_frame(model64, monkeypatch, budget, captures):
    """The loop captures once, after its first (eager) frame, and not at all when that frame is the whole budget.
    On the CPU the "graph" is the step itself; the capture calls are counted."""
    calls = []

    def fake_capture(loop):
        calls.append(loop)
        return SimpleNamespace(replay=loop.step)

    monkeypatch.setattr(engine.FrameLoop, "capture", fake_capture)
    model64.setup_caches(64, torch.float64, "cpu")
    hidden = torch.randn(1, model64.config.dim, dtype=torch.float64)
    loop = engine.FrameLoop(model64, hidden, 20, budget, SamplingParams(), torch.Generator().manual_seed(0))
    with torch.inference_mode():
        columns, _ = loop.run(None, capture=True)
    assert len(calls) == captures and columns.shape[1] <= budget


def test_a_later_request_of_the_same_configuration_captures_before_its_first_frame(model64, monkeypatch):
    """The first request of a (capacity, dtype, device, sampling) configuration steps eagerly once (compiling and
    first-call choices happen there), then captures; the next one of that configuration captures first; another
    sampling configuration (a new top_k specializes the draw kernel) or cache capacity steps eagerly first again.
    On the CPU the "graph" is the step itself; steps and captures are logged in order."""
    events = []
    real_step = engine.FrameLoop.step

    def step(loop):
        events.append("step")
        real_step(loop)

    def fake_capture(loop):
        events.append("capture")
        return SimpleNamespace(replay=loop.step)

    monkeypatch.setattr(engine.FrameLoop, "step", step)
    monkeypatch.setattr(engine.FrameLoop, "capture", fake_capture)

    def run(capacity: int, params: SamplingParams, budget: int = 3) -> list[str]:
        if model64.capacity != capacity:
            model64.setup_caches(capacity, torch.float64, "cpu")
        events.clear()
        # a fixed hidden state: a random one lets the model emit <|im_end|> early now and then, ending the log sooner
        hidden = torch.randn(1, model64.config.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
        loop = engine.FrameLoop(model64, hidden, 20, budget, params, torch.Generator().manual_seed(0))
        with torch.inference_mode():
            loop.run(None, capture=True)
        return list(events)

    eager_first, capture_first = ["step", "capture", "step", "step"], ["capture", "step", "step", "step"]
    assert run(64, SamplingParams()) == eager_first
    assert run(64, SamplingParams()) == capture_first
    assert run(64, SamplingParams(top_k=5)) == eager_first
    assert run(64, SamplingParams(top_k=5)) == capture_first
    assert run(64, SamplingParams(), budget=1) == ["step"]  # a single frame: nothing to capture
    assert run(128, SamplingParams()) == eager_first  # new caches, other kernel specializations


def test_a_later_request_reuses_the_loop_and_decodes_as_a_fresh_one(model64, monkeypatch):
    """The next request of the same configuration gets the model's last loop (and with it its graph) set to its own
    prompt length, hidden state and seed: it decodes what a fresh loop decodes, and what the eager loop decodes.
    Other sampling settings or new caches get a new loop. Codes returned earlier are copies, not the buffer."""
    frame_loop(monkeypatch)
    cfg = GenerationConfig(max_new_tokens=20, seed=3)
    first = generate(model64, frames_sequence(model64.config, 6, 3, seed=2)[0], cfg)
    kept = first.codes.clone()
    loop = model64.frame_loop
    other_prompt = frames_sequence(model64.config, 9, 5, seed=5)[0]  # another length, state and seed
    other_cfg = GenerationConfig(max_new_tokens=20, seed=4)
    reused = generate(model64, other_prompt, other_cfg)
    assert model64.frame_loop is loop and torch.equal(first.codes, kept)
    model64.frame_loop = None
    fresh = generate(model64, other_prompt, other_cfg)
    assert model64.frame_loop is not loop and torch.equal(reused.codes, fresh.codes)
    monkeypatch.setattr(engine, "graph_decoding", lambda model, config: False)
    eager = generate(model64, other_prompt, other_cfg)
    assert reused.codes.shape[1] >= 8 and torch.equal(reused.codes, eager.codes)
    loop = model64.frame_loop
    hidden = torch.randn(1, model64.config.dim, dtype=torch.float64)
    with torch.inference_mode():  # as generate() runs: the loop's buffers are inference tensors
        again = engine.FrameLoop.for_request(model64, hidden, 7, 5, SamplingParams(),
                                             torch.Generator().manual_seed(9))
    assert again is loop and torch.equal(again.hidden, hidden) and again.budget == 5  # every request's state set
    assert int(again.start) == 7 and int(again.count) == 0 and not again.window.any()
    assert again.generator.initial_seed() == 9
    frame_loop(monkeypatch)
    generate(model64, other_prompt, GenerationConfig(max_new_tokens=20, sampling=SamplingParams(top_k=5), seed=4))
    assert model64.frame_loop is not loop
    loop = model64.frame_loop
    model64.setup_caches(model64.capacity, torch.float64, "cpu")  # new cache tensors: the graph's are gone
    generate(model64, other_prompt, GenerationConfig(max_new_tokens=20, sampling=SamplingParams(top_k=5), seed=4))
    assert model64.frame_loop is not loop

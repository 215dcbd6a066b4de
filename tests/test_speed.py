"""Speed paths stay correct: graph replay and torch.compile equal eager, autobatch's fit, the threaded video
reader/writer (order, early stop, errors, bounded memory), channels_last training steps."""
from __future__ import annotations

import logging
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from helpers import limit, seeded_tiny_checkpoint
from utils.general import UserError

NAMES = ["a", "b", "c"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny():
    from models.yolo import DetectionModel
    torch.manual_seed(0)
    return DetectionModel("gelan-t.yaml", nc=len(NAMES)).eval().fuse()


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    return seeded_tiny_checkpoint(tmp_path_factory.mktemp("w") / "tiny.pt", NAMES)


def make_video(path: Path, n: int, w: int = 96, h: int = 64, fourcc: str = "mp4v") -> Path:
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), 10, (w, h))
    rng = np.random.default_rng(0)
    for i in range(n):
        im = np.full((h, w, 3), 60, np.uint8)
        cv2.circle(im, (10 + 7 * i % (w - 20), h // 2), 8 + i % 5, tuple(int(c) for c in rng.integers(0, 255, 3)), -1)
        vw.write(im)
    vw.release()
    return path


# ---------------------------------------------------------------- graph replay / compile

def test_graph_runner_matches_eager_caches_shapes_lru(tiny):
    from utils.engine.graphs import GraphRunner, eager_capture, main_output
    fn = main_output(tiny)
    runner = GraphRunner(fn, max_shapes=2, capture_after=2, capture=eager_capture)
    g = torch.Generator().manual_seed(0)
    A, B, C = (1, 3, 64, 64), (1, 3, 64, 96), (2, 3, 32, 64)
    seq = [A, A, B, A, B, C, A, C, B]
    outs = []
    with torch.no_grad():
        for shape in seq:
            x = torch.rand(shape, generator=g)
            y = runner(x)
            outs.append((y, fn(x)))
        for y, ref in outs:  # earlier results are not overwritten by later replays (no aliasing)
            assert torch.allclose(y, ref, atol=1e-5, rtol=0)
    # A: 1st eager, 2nd captured; B: 1st eager, 2nd captured; C: 1st eager; A replayed (LRU order B, A);
    # C 2nd captured -> B evicted; B again: counted from 1 -> eager
    assert runner.captures == 3 and runner.eager_calls == 4 and runner.replays == 5
    assert list(runner.graphs) == [GraphRunner.key(torch.zeros(A)), GraphRunner.key(torch.zeros(C))]


def test_graph_runner_copies_each_input_into_the_static_buffer():
    from utils.engine.graphs import GraphRunner, eager_capture
    runner = GraphRunner(lambda x: x * 2 + 1, capture_after=1, capture=eager_capture)
    for v in (1.0, 5.0, -3.0):
        assert torch.equal(runner(torch.full((2, 2), v)), torch.full((2, 2), 2 * v + 1))
    assert runner.captures == 1 and runner.replays == 3


def test_cuda_graph_off_cuda_warns_once_and_runs_eager(weights, caplog):
    from utils.engine import graphs
    from utils.engine.predict.predictor import Predictor
    graphs._warned.clear()
    im = np.full((80, 120, 3), 90, np.uint8)
    cv2.circle(im, (40, 40), 20, (0, 0, 255), -1)
    ref = Predictor(weights, device="cpu", imgsz=128, conf_thres=0.1).predict(im)
    with caplog.at_level(logging.WARNING):
        p = Predictor(weights, device="cpu", imgsz=128, conf_thres=0.1, cuda_graph="capture")
        Predictor(weights, device="cpu", imgsz=128, conf_thres=0.1, cuda_graph="compile")
    assert p.backend.graph is None
    assert sum("--cuda-graph needs a CUDA device" in r.message for r in caplog.records) == 1
    r = p.predict(im)
    assert len(ref) > 0 and np.allclose(r.boxes, ref.boxes, atol=1e-3) and np.array_equal(r.class_ids, ref.class_ids)
    with pytest.raises(UserError, match="--cuda-graph"):
        graphs.check_mode("fast")


def test_torch_compile_matches_eager_on_cpu():
    """The real inductor path on a minimal conv block (a whole detector takes minutes to compile on CPU)."""
    from models.common import Conv
    from utils.engine.graphs import CompiledForward
    torch.manual_seed(0)
    m = torch.nn.Sequential(Conv(3, 8, 3, 2), Conv(8, 4, 1, 1)).eval()
    f = CompiledForward(m)
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        y = f(x)
        assert f.active  # compiled, not fallen back
        assert torch.allclose(y, m(x), atol=1e-5)


def test_compile_failure_warns_and_runs_eager(caplog):
    from utils.engine import graphs

    def broken_backend(gm, example_inputs):
        raise RuntimeError("no compiler on this machine")

    graphs._warned.clear()
    m = torch.nn.Linear(4, 2)
    f = graphs.CompiledForward(m, backend=broken_backend)
    x = torch.rand(3, 4)
    with caplog.at_level(logging.WARNING):
        y = f(x)
        y2 = f(x)
    assert torch.equal(y, m(x)) and torch.equal(y2, m(x)) and not f.active
    assert sum("torch.compile failed" in r.message for r in caplog.records) == 1


# ---------------------------------------------------------------- autobatch

GIB = 1024 ** 3


def test_autobatch_fits_line_to_fake_memory():
    from utils.engine.train.autobatch import fit_batch_size
    calls = []

    def mem(b):  # 0.5 GiB fixed + 0.1 GiB per image, small noise
        calls.append(b)
        return (0.5 + 0.1 * b + (0.004 if b % 2 else -0.004)) * GIB

    res = fit_batch_size(mem, 10 * GIB, fraction=0.6)
    assert calls == [1, 2, 4, 8, 16]
    assert abs(res.slope_gib - 0.1) < 0.01 and abs(res.intercept_gib - 0.5) < 0.05
    assert res.batch == int((6.0 - res.intercept_gib) / res.slope_gib) and 53 <= res.batch <= 57
    s = res.summary()
    assert "60% of 10.0 GiB" in s and "b16=" in s and f"batch {res.batch}" in s


def test_autobatch_stops_below_a_probe_that_ran_out_of_memory():
    from utils.engine.train.autobatch import fit_batch_size

    def mem(b):
        if b >= 8:
            raise MemoryError
        return (1.0 + 0.01 * b) * GIB  # the line says hundreds fit, but b8 did not

    res = fit_batch_size(mem, 80 * GIB, fraction=0.6)
    assert res.failed_at == 8 and res.batch == 7 and "out of memory at b8" in res.summary()
    one = fit_batch_size(lambda b: (_ for _ in ()).throw(MemoryError) if b > 1 else GIB, 10 * GIB)
    assert one.batch == 1 and "too few" in one.note
    big = fit_batch_size(lambda b: (2 + 3.0 * b) * GIB, 8 * GIB, fraction=0.6)  # budget 4.8: only b=0.9 fits
    assert big.batch == 1 and "exceeds" in big.note


def test_autobatch_needs_cuda(caplog):
    from utils.engine.train.autobatch import auto_batch_size
    with caplog.at_level(logging.WARNING):
        assert auto_batch_size(torch.nn.Linear(1, 1), 64, torch.device("cpu")) == 16
    assert any("needs a CUDA device" in r.message for r in caplog.records)
    with pytest.raises(UserError, match="single GPU"):
        auto_batch_size(torch.nn.Linear(1, 1), 64, torch.device("cpu"), world_size=2)


def test_train_batch_size_flag():
    import train_dual
    assert train_dual.parse_opt(["--batch-size", "-1"]).batch_size == -1
    with pytest.raises(SystemExit):
        train_dual.parse_opt(["--batch-size", "-3"])


@pytest.mark.parametrize("cfg", ["gelan-t.yaml", "yolov9-t-MMQA.yaml"])
def test_channels_last_training_step_matches_contiguous(cfg):
    """The trainer converts model and images to channels_last (CPU and CUDA); losses and gradients, through
    the Mobile MQA attention too, must not change."""
    from benchmarks.harness import random_targets
    from models.yolo import DetectionModel
    from utils.loss import DetectionLoss
    torch.manual_seed(0)
    m = DetectionModel(cfg, nc=3).train()
    loss_fn = DetectionLoss(m, {"box": 7.5, "cls": 0.5, "dfl": 1.5})
    x, t = torch.rand(2, 3, 128, 128), random_targets(2, 3)  # at 64 px train-mode BN amplifies float noise
    l1 = loss_fn(m(x), t)[0]
    l1.backward()
    params = [p for p in m.parameters() if p.grad is not None]
    g1 = [p.grad.clone() for p in params]
    m.zero_grad()
    m = m.to(memory_format=torch.channels_last)
    assert m.model[0].conv.weight.is_contiguous(memory_format=torch.channels_last)
    l2 = loss_fn(m(x.contiguous(memory_format=torch.channels_last)), t)[0]
    l2.backward()
    assert torch.allclose(l1, l2, rtol=1e-4)
    a, b = torch.cat([g.flatten() for g in g1]), torch.cat([p.grad.flatten() for p in params])
    assert float((a - b).norm() / a.norm()) < 1e-2  # float reordering only (measured 7e-4)


def test_backend_runs_channels_last_with_the_same_predictions(weights):
    """The shared loader (val, detect, track) puts .pt models in NHWC; outputs equal the NCHW model's."""
    from utils.checkpoint import load_model
    from utils.engine.backend import Backend
    b = Backend(weights, device="cpu", fuse=True)
    conv_w = next(p for p in b.model.parameters() if p.dim() == 4)
    assert conv_w.is_contiguous(memory_format=torch.channels_last)
    ref = load_model(weights, fuse=True)
    assert next(p for p in ref.parameters() if p.dim() == 4).is_contiguous()
    x = torch.rand(2, 3, 96, 160)  # non-square
    with torch.no_grad():
        y, y_ref = b.model(x)[0], ref(x)[0]
    assert y.shape == y_ref.shape == (2, 4 + len(NAMES), 12 * 20 + 6 * 10 + 3 * 5)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-3)


# ---------------------------------------------------------------- threaded video path

@pytest.mark.parametrize("stride", [1, 3])
def test_threaded_reader_same_frames_in_order(tmp_path, stride):
    from utils.engine.sources import LoadSources
    video = make_video(tmp_path / "v.mp4", 11)
    img = tmp_path / "z.png"
    cv2.imwrite(str(img), np.full((20, 30, 3), 7, np.uint8))
    seq = list(LoadSources(str(tmp_path), vid_stride=stride, threaded=False))
    thr = list(LoadSources(str(tmp_path), vid_stride=stride, threaded=True, buffer=2))
    assert [f.frame for f in thr] == [f.frame for f in seq] == list(range(1, 12, stride)) + [None]
    assert [f.path for f in thr] == [str(video)] * len(range(1, 12, stride)) + [str(img)]
    assert all(np.array_equal(a.im0, b.im0) for a, b in zip(seq, thr))


def test_reader_stops_cleanly_when_consumer_stops_early(tmp_path):
    from utils.engine.sources import LoadSources, Prefetcher
    ds = LoadSources(make_video(tmp_path / "v.mp4", 30), buffer=2)
    it = iter(ds)
    assert next(it).frame == 1
    it.close()  # what a `break` out of the for loop does
    assert ds.reader is not None and not ds.reader.alive

    released = threading.Event()

    def endless():
        try:
            i = 0
            while True:
                yield i
                i += 1
        finally:
            released.set()  # the producer closed its iterator (a capture would be released here)

    pf = Prefetcher(endless(), maxsize=3)
    assert [next(pf) for _ in range(5)] == [0, 1, 2, 3, 4]
    pf.close()
    assert not pf.alive and released.is_set()


def test_reader_memory_is_bounded():
    from utils.engine.sources import Prefetcher
    produced = []

    def items():
        for i in range(200):
            produced.append(i)
            yield np.zeros(10)

    pf = Prefetcher(items(), maxsize=4)
    consumed = 0
    for _ in pf:
        consumed += 1
        assert len(produced) - consumed <= 4 + 1  # buffer + the one item the producer holds
    assert consumed == 200 and pf.high_water <= 4


def test_reader_reports_errors_in_order():
    from utils.engine.sources import Prefetcher

    def items():
        yield from range(3)
        raise ValueError("bad frame data")

    pf = Prefetcher(items(), maxsize=1)
    got = []
    with pytest.raises(ValueError, match="bad frame data"):
        for v in pf:
            got.append(v)
    assert got == [0, 1, 2] and not pf.alive


def test_truncated_video_decode_stop_is_reported(tmp_path, caplog):
    from utils.engine.sources import LoadSources
    full = make_video(tmp_path / "full.avi", 20, fourcc="MJPG")
    cut = tmp_path / "cut.avi"
    data = full.read_bytes()
    cut.write_bytes(data[: len(data) * 6 // 10])  # header still says 20 frames
    with caplog.at_level(logging.WARNING):
        ds = LoadSources(cut)
        frames = list(ds)
    assert 0 < len(frames) < 20
    assert ds.incomplete and f"stopped at frame {len(frames)} of 20" in ds.incomplete[0][1]
    assert any("decoding stopped" in r.message for r in caplog.records)
    ok = LoadSources(full)
    assert len(list(ok)) == 20 and not ok.incomplete


def test_background_calls_keep_order_and_raise():
    from utils.engine.sources import BackgroundCalls
    out = []
    bg = BackgroundCalls(maxsize=2)
    for i in range(50):
        bg.submit(out.append, i)
    bg.close()
    assert out == list(range(50))

    def fail(_):
        raise OSError("disk full")

    bg = BackgroundCalls(maxsize=2)
    bg.submit(fail, 0)
    with pytest.raises(OSError, match="disk full"):
        for i in range(10):
            bg.submit(out.append, i)
        bg.close()


def test_detect_threaded_equals_sequential(weights, tmp_path):
    """Whole detect_dual.py video path: same labels per frame, same number of written frames."""
    import detect_dual
    from utils.engine.predict.predictor import run
    video = make_video(tmp_path / "clip.mp4", 8, w=160, h=96)
    outs = {}
    for threaded in (False, True):
        opt = detect_dual.parse_opt(["--weights", str(weights), "--source", str(video), "--imgsz", "128",
                                     "--conf-thres", "0.1", "--save-txt", "--save-conf", "--project", str(tmp_path),
                                     "--name", f"t{int(threaded)}", "--device", "cpu"])
        opt.threaded = threaded
        d = run(opt)
        labels = {p.name: p.read_text() for p in sorted((d / "labels").glob("*.txt"))}
        cap = cv2.VideoCapture(str(d / "clip.mp4"))
        frames = []
        while (ok_im := cap.read())[0]:
            frames.append(ok_im[1])
        outs[threaded] = (labels, int(cap.get(cv2.CAP_PROP_FRAME_COUNT)), frames)
        cap.release()
    assert outs[True][0] and outs[True][:2] == outs[False][:2]
    assert outs[True][1] == 8 == len(outs[True][2])
    # boxes drawn in the writer thread (threaded) are the pixels the inline path draws
    assert all(np.array_equal(a, b) for a, b in zip(outs[True][2], outs[False][2]))


def test_outputs_compared_by_dtype_tolerance_and_detections_by_iou():
    """fp16 moves a box at 100-160 px by ~0.06-0.12 px, far above a raw atol of 1e-3: the GPU comparisons take
    a tolerance that follows the dtype (coordinates within a share of the image size, or IoU per box)."""
    from benchmarks.gpu_check import compare_outputs, match_detections
    ref = torch.tensor([[[20.0, 70.0], [20.0, 50.0], [20.0, 40.0], [20.0, 20.0], [0.3, 0.6]]])  # [1, 4+1, 2] xywh
    fp16_like = ref.clone()
    fp16_like[0, 0] += 0.12  # 0.12 px at 160 px: 7.5e-4 of the image
    assert not torch.allclose(ref, fp16_like, atol=1e-3)  # what the old check demanded
    assert compare_outputs(ref, fp16_like, "fp16", imgsz=160)["ok"]
    off = fp16_like.clone()
    off[0, 2, 0] += 3.0  # a 3 px wider box: IoU 20/23, far beyond either tolerance
    c = compare_outputs(ref, off, "fp16", imgsz=160)
    assert not c["ok"] and c["min_iou"] == pytest.approx(20 / 23, abs=1e-4) and c["max_px"] == pytest.approx(3.0)
    scores = ref.clone()
    scores[0, 4, 1] += 0.05
    assert not compare_outputs(ref, scores, "fp16", imgsz=160)["ok"]
    assert not compare_outputs(ref, ref[..., :1], "fp32")["ok"]  # a different anchor count never passes
    # detections after NMS (validation runs): matched one to one by class and IoU
    boxes = (np.array([[10, 10, 30, 30], [50, 40, 90, 60]], float), np.array([1, 2]))
    shifted = (boxes[0] + [0.1, 0, 0.1, 0], boxes[1])  # IoU 19.9*20 / (400 + 400 - 398) = 0.99005 for box 0
    m = match_detections(boxes, shifted, 0.99)
    assert m["matched"] == 2 and m["unmatched"] == 0 and m["min_iou"] == pytest.approx(398 / 402, abs=1e-5)
    assert match_detections(boxes, shifted, 0.999)["matched"] == 0
    assert match_detections(boxes, (boxes[0], np.array([1, 3])), 0.99) == {"matched": 1, "unmatched": 2, "min_iou": 1.0}
    assert match_detections(boxes, (np.zeros((0, 4)), np.zeros(0)), 0.99)["unmatched"] == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run by benchmarks/run_gpu_speed.sh)")
@pytest.mark.parametrize("mode", ["capture", "compile"])
def test_cuda_graph_predictions_equal_eager_on_gpu(weights, mode):
    from benchmarks.gpu_check import compare_outputs
    from utils.engine.predict.predictor import Predictor
    rng = np.random.default_rng(0)
    ims = [np.full((96, 160, 3), 90, np.uint8) for _ in range(4)]
    for im in ims:
        cv2.circle(im, (int(rng.integers(20, 140)), 48), 20, (0, 0, 255), -1)
    for half in (False, True):
        ref = Predictor(weights, device="0", imgsz=160, conf_thres=0.1, half=half)
        fast = Predictor(weights, device="0", imgsz=160, conf_thres=0.1, half=half, cuda_graph=mode)
        assert fast.backend.graph is not None
        for im in ims + ims:  # second pass replays the captured graphs
            x = ref.preprocess(im)[0]
            c = compare_outputs(ref.inference(x), fast.inference(x), "fp16" if half else "fp32")
            assert c["ok"], c
            fast.predict(im)  # the whole path too (letterbox, graph, NMS)
        assert fast.backend.graph.active if mode == "compile" else fast.backend.graph.replays > 0


def test_val_cuda_graph_flag_on_cpu_runs_eager(weights, tmp_path):
    import val_dual
    from utils.data import generate_shapes
    generate_shapes(tmp_path / "ds", n_train=1, n_val=4, seed=0)
    data = tmp_path / "d.yaml"
    data.write_text(f"path: {tmp_path / 'ds'}\ntrain: images/train\nval: images/val\nnames: [a, b, c]\n")
    common = ["--weights", str(weights), "--data", str(data), "--img", "96", "--device", "cpu", "--workers", "0",
              "--project", str(tmp_path), "--exist-ok", "--task", "speed", "--conf-thres", "0.1"]
    a = val_dual.main(common + ["--name", "eager"])
    b = val_dual.main(common + ["--name", "graph", "--cuda-graph"])  # the flag reaches the backends: warns, eager
    assert a.seen == b.seen > 0
    assert (a.mp, a.mr, a.map50, a.map) == (b.mp, b.mr, b.map50, b.map)


def test_predictor_drops_auxiliary_branch_same_boxes(tmp_path):
    from models.yolo import DetectionModel
    from utils.checkpoint import make_checkpoint, save_checkpoint
    from utils.engine.predict.predictor import Predictor
    torch.manual_seed(0)
    dual = DetectionModel("yolov9-t.yaml", nc=3)
    for box, cls in zip(dual.head.cv4, dual.head.cv5):  # main-branch head: varied boxes above a low threshold
        box[-1].bias.data = torch.randn(box[-1].bias.shape, generator=torch.Generator().manual_seed(1)) * 3
        cls[-1].bias.data[:] = -1.0
    w = save_checkpoint(make_checkpoint(dual, names=NAMES), tmp_path / "dual.pt")
    im = np.full((100, 140, 3), 80, np.uint8)
    cv2.rectangle(im, (20, 20), (70, 60), (0, 200, 0), -1)
    old = Predictor(w, device="cpu", imgsz=128, conf_thres=0.05, main_only=False)
    new = Predictor(w, device="cpu", imgsz=128, conf_thres=0.05)
    assert old.backend.model.is_dual and not new.backend.model.is_dual
    a, b = old.predict(im), new.predict(im)
    assert len(a) > 0 and np.array_equal(a.class_ids, b.class_ids) and np.allclose(a.boxes, b.boxes, atol=1e-3)
    assert sum(p.numel() for p in new.backend.model.parameters()) < sum(p.numel() for p in old.backend.model.parameters())


def test_onnx_backend_uses_optimised_session(weights, tmp_path):
    import shutil

    import onnxruntime as ort

    import export
    from utils.engine.backend import Backend
    w = Path(shutil.copy(weights, tmp_path / "tiny.pt"))
    onnx = export.run(w, include=("onnx",), imgsz=(64, 96))["onnx"]
    b = Backend(onnx)
    so = b.runner.session.get_session_options()
    assert so.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert so.intra_op_num_threads == torch.get_num_threads() == 1 and so.inter_op_num_threads == 1
    x = torch.rand(1, 3, 64, 96)
    assert torch.allclose(b(x), Backend(w)(x), atol=1e-3, rtol=1e-4)


# ---------------------------------------------------------------- frames in flight

def test_ordered_map_keeps_input_order_when_later_items_finish_first():
    from utils.engine.predict.stream import ordered_map
    done = {i: threading.Event() for i in range(13)}
    pulled, handed = [], []

    def fn(i):
        if i % 2 == 0 and i + 1 < 12:  # an even item finishes only after the next (odd) one has
            assert done[i + 1].wait(timeout=limit(60))
        done[i].set()
        return i * 10

    def items():
        for i in range(12):
            pulled.append(i)
            assert len(pulled) - len(handed) <= 3  # depth = workers + 1: memory stays flat
            yield i

    for i, r in ordered_map(fn, items(), workers=2):
        handed.append(i)
        assert r == i * 10
    assert handed == list(range(12))


def test_ordered_map_raises_in_turn_and_stops_its_threads():
    from utils.engine.predict.stream import ordered_map

    def fn(i):
        if i == 3:
            raise ValueError("bad frame 3")
        return i

    got = []
    with pytest.raises(ValueError, match="bad frame 3"):
        for i, _ in ordered_map(fn, range(10), workers=2):
            got.append(i)
    assert got == [0, 1, 2]

    def failing_source():
        yield from range(5)
        raise OSError("stream dropped")

    got = []
    with pytest.raises(OSError, match="stream dropped"):
        for i, r in ordered_map(lambda i: i * 2, failing_source(), workers=2):
            got.append(r)
    assert got == [0, 2, 4, 6, 8]  # every item before the source failed is handed back first
    gen = ordered_map(lambda i: i, range(1000), workers=3)
    assert [next(gen)[0] for _ in range(4)] == [0, 1, 2, 3]
    gen.close()  # what a `break` out of the consumer does
    assert not [t for t in threading.enumerate() if t.name.startswith("frame-worker")]


def test_stream_in_flight_equals_one_by_one_and_splits_threads(weights, tmp_path):
    from utils.engine.predict.predictor import Predictor
    from utils.engine.sources import LoadSources
    frames = list(LoadSources(make_video(tmp_path / "v.mp4", 6, w=160, h=96), threaded=False))
    pred = Predictor(weights, device="cpu", imgsz=128, conf_thres=0.1)
    one = [r for _, r in pred.stream(frames, workers=0)]  # 1 thread (module fixture), in this thread
    calls = []
    infer = pred.inference

    def recording(x):
        calls.append((threading.current_thread().name, torch.get_num_threads()))
        return infer(x)

    pred.inference = recording
    torch.set_num_threads(2)
    try:
        two = list(pred.stream(frames, workers=2))
        assert torch.get_num_threads() == 2  # this thread's count is back
    finally:
        torch.set_num_threads(1)
    assert [f.frame for f, _ in two] == [1, 2, 3, 4, 5, 6]
    assert {n for n, _ in calls} <= {"frame-worker_0", "frame-worker_1"} and {t for _, t in calls} == {1}
    assert sum(len(r) for r in one) > 0
    for a, (_, b) in zip(one, two):  # same single-thread forward per frame: the same boxes
        assert np.array_equal(a.boxes, b.boxes) and np.array_equal(a.scores, b.scores)
        assert np.array_equal(a.class_ids, b.class_ids) and a.input_shape == b.input_shape == (96, 128)
    assert pred.seen == 12 and pred.last_shape == (96, 128)


def test_frame_workers_policy(weights, monkeypatch):
    from utils.engine.predict.predictor import Predictor
    pred = Predictor(weights, device="cpu", imgsz=64)
    for threads, expect in ((1, 1), (2, 2), (3, 3), (16, 4)):
        monkeypatch.setattr(torch, "get_num_threads", lambda t=threads: t)
        assert pred.frame_workers() == expect
    with pytest.raises(UserError, match="workers=-1"):
        Predictor(weights, device="cpu", imgsz=64, workers=-1)
    pred.workers = 0
    assert pred.frame_workers() == 0
    pred.workers = None
    monkeypatch.setattr(pred.backend, "pt", False)  # an exported file: one call at a time, on one worker ...
    assert pred.frame_workers() == 1
    asked = []
    pred.backend.concurrent_runs = lambda n: asked.append(n) or 2  # ... unless its runtime takes several
    assert pred.frame_workers() == 2 and asked == [4]
    pred.device = torch.device("cuda")  # GPUs: in the calling thread, as before
    assert pred.frame_workers() == 0


def test_video_compiles_the_runtime_once_for_its_frame_shape_before_the_first_inference(weights, tmp_path):
    """A fixed-size source tells the runner (Backend.prepare_input_shape -> Runner.set_input_shape) its letterboxed
    frame shape once, before any frame reaches it; a folder of images of varying shapes tells it nothing."""
    from utils.deploy.formats import Runner
    from utils.engine.predict.predictor import Predictor
    from utils.engine.sources import LoadSources
    pred = Predictor(weights, device="cpu", imgsz=128)
    events = []

    class Recording(Runner):  # an exported file's runner, computing with the .pt model
        meta = {}

        def __init__(self, model):
            self.model = model

        def set_input_shape(self, h, w):
            events.append(("shape", (h, w)))
            return True

        def __call__(self, im):
            events.append(("run", tuple(im.shape[2:])))
            out = self.model(im)
            return out[0] if isinstance(out, (tuple, list)) else out

    pred.backend.runner = Recording(pred.backend.model)
    results = [r for _, r in pred.stream(LoadSources(make_video(tmp_path / "v.mp4", 4, w=160, h=96)), workers=2)]
    assert events == [("shape", (96, 128))] + [("run", (96, 128))] * 4 and results[0].input_shape == (96, 128)
    events.clear()
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, (h, w) in enumerate(((40, 60), (70, 50))):  # a folder: shapes vary, nothing is announced
        cv2.imwrite(str(folder / f"{i}.png"), np.full((h, w, 3), 90, np.uint8))
    list(pred.stream(LoadSources(folder)))
    assert [e[0] for e in events] == ["run", "run"]


def test_letterbox_tensor_is_the_reference_preprocessing():
    from utils.engine.sources import letterbox_tensor, preprocess_image
    im = np.random.default_rng(0).integers(0, 256, (75, 131, 3), dtype=np.uint8)
    img, ratio_pad = preprocess_image(im, 128, 32, auto=True)
    ref = torch.from_numpy(img)[None].float() / 255
    for cl in (False, True):
        x, rp = letterbox_tensor(im, 128, 32, auto=True, channels_last=cl)
        assert torch.equal(x, ref) and rp == ratio_pad and x.shape == (1, 3, 96, 128)
        assert x.is_contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)


def test_detection_starts_without_torchvision_and_its_nms_kernel_agrees():
    """torchvision's Python package imports torch._dynamo (~1.3 s of start-up); detection loads only its kernel."""
    import subprocess
    import sys
    code = """
import sys, torch
import detect_dual, utils.engine.predict.predictor, utils.engine.track.sequence
from utils.nms import non_max_suppression
from utils.vision_ops import batched_nms
g = torch.Generator().manual_seed(0)
xy = torch.rand(800, 2, generator=g) * 300
boxes = torch.cat([xy, xy + 8 + torch.rand(800, 2, generator=g) * 60], 1)
scores, cls = torch.rand(800, generator=g), torch.randint(0, 5, (800,), generator=g)
ours = batched_nms(boxes, scores, cls, 0.5)
pred = torch.cat([torch.rand(1, 4, 300, generator=g) * 100 + 10, torch.rand(1, 3, 300, generator=g)], 1)
assert len(non_max_suppression(pred, 0.3, 0.5)[0]) > 5
assert 'torchvision' not in sys.modules and 'scipy' not in sys.modules, 'imported at start-up'
import torchvision.ops as tv
assert len(ours) > 50 and sorted(ours.tolist()) == sorted(tv.batched_nms(boxes, scores, cls, 0.5).tolist())
print('OK')
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                       text=True, timeout=limit(120))
    assert r.returncode == 0 and r.stdout.strip() == "OK", r.stderr[-2000:]

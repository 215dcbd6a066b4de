"""CUDA-only code paths, checked on CPU: the logic around each CUDA call runs here with the CUDA calls
replaced by recording stand-ins (or torch.cuda functions monkeypatched), so what these tests exercise is
what runs on a GPU. benchmarks/run_gpu_speed.sh checks the same paths on a real GPU."""
from __future__ import annotations

import contextlib
import logging
import random
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn

from helpers import FailingBackward, perturb_bn, seeded_tiny_checkpoint, shapes_yaml
from utils.general import UserError

pytestmark = pytest.mark.usefixtures("one_thread")
GIB = 1024 ** 3


@pytest.fixture
def two_fake_gpus(monkeypatch):
    """torch.cuda reporting two GPUs; set_device and synchronize calls are recorded, not made."""
    calls: dict[str, list] = {"set_device": [], "synchronize": [], "memory_reserved": []}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda d: SimpleNamespace(name="Fake GPU", total_memory=16 * GIB))
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls["set_device"].append(torch.device(d)))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda d=None: calls["synchronize"].append(d))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda d=None: calls["memory_reserved"].append(d) or 3e9)
    return calls


# ---------------------------------------------------------------- devices

def test_select_device_makes_the_chosen_gpu_current(two_fake_gpus):
    from utils.torch_utils import select_device
    assert select_device("1") == torch.device("cuda", 1)
    assert select_device(torch.device("cuda", 1)) == torch.device("cuda", 1)  # Predictor(device=torch.device)
    assert select_device("cuda:1") == torch.device("cuda", 1)
    assert two_fake_gpus["set_device"] == [torch.device("cuda", 1)] * 3
    assert select_device("cpu").type == "cpu" and len(two_fake_gpus["set_device"]) == 3


def test_sync_and_memory_helpers_act_on_the_given_gpu(two_fake_gpus):
    from utils.torch_utils import cuda_memory_gb, time_sync
    gpu1 = torch.device("cuda", 1)
    time_sync(gpu1)
    time_sync(torch.device("cpu"))  # nothing to wait for
    assert two_fake_gpus["synchronize"] == [gpu1]
    assert cuda_memory_gb(gpu1) == pytest.approx(3.0) and two_fake_gpus["memory_reserved"] == [gpu1]
    assert cuda_memory_gb(torch.device("cpu")) == 0.0


def test_torchrun_local_rank_maps_onto_the_listed_gpus(monkeypatch):
    from utils.engine.distributed import rank_device
    assert [rank_device("2,3", r, 2) for r in (0, 1)] == ["2", "3"]
    assert [rank_device("", r, 2) for r in (0, 1)] == ["0", "1"]  # no list: GPU = LOCAL_RANK
    assert rank_device("cuda:1", 0, 1) == "1" and rank_device("cpu", 1, 2) == "cpu"
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(UserError, match=r"--device 2,3 names 2 GPU\(s\) but torchrun started 4 process\(es\)") as e:
        rank_device("2,3", 0, 4)
    assert "\n" not in str(e.value) and "--nproc-per-node 2" in str(e.value)
    monkeypatch.setenv("RANK", "1")  # every rank finds the same mistake (the cli wrapper prints it from rank 0)
    with pytest.raises(UserError, match=r"--device 2,3 names 2 GPU"):
        rank_device("2,3", 1, 4)


def test_process_device_under_torchrun_uses_and_selects_the_mapped_gpu(two_fake_gpus, monkeypatch):
    from utils.engine import distributed as ddp
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(ddp, "init_distributed", lambda dev: dev)  # the process group is not the point here
    assert ddp.process_device("0,1") == torch.device("cuda", 1)
    assert two_fake_gpus["set_device"] == [torch.device("cuda", 1)]


def test_onnx_runtime_runs_on_the_chosen_gpu():
    from utils.deploy.formats.onnx import providers as ort_providers
    available = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert ort_providers(torch.device("cuda", 1), available) == [("CUDAExecutionProvider", {"device_id": 1}),
                                                                 "CPUExecutionProvider"]
    assert ort_providers(torch.device("cuda", 1), ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    assert ort_providers(torch.device("cpu"), available) == ["CPUExecutionProvider"]


# ---------------------------------------------------------------- CUDA-graph capture arguments

class RecordingCuda:
    """torch.cuda stand-in for CudaCapture: records the device guard, streams, pools and graph() arguments;
    the 'capture' runs eagerly on CPU."""

    def __init__(self):
        self.log: list[tuple] = []
        self.made_streams: list = []
        self.made_pools: list = []

    @contextlib.contextmanager
    def device(self, d):
        self.log.append(("device", d))
        yield

    def Stream(self, device=None):  # noqa: N802 -- torch.cuda's name
        s = SimpleNamespace(device=device, wait_stream=lambda other: None)
        self.made_streams.append(s)
        return s

    def current_stream(self, d=None):
        self.log.append(("current_stream", d))
        return SimpleNamespace(wait_stream=lambda other: None)

    @contextlib.contextmanager
    def stream(self, s):
        yield

    def graph_pool_handle(self):
        self.made_pools.append(object())
        return self.made_pools[-1]

    def CUDAGraph(self):  # noqa: N802
        return SimpleNamespace(replay=lambda: self.log.append(("replay",)))

    @contextlib.contextmanager
    def graph(self, g, pool=None, stream=None, capture_error_mode="global"):
        self.log.append(("graph", pool, stream, capture_error_mode))
        yield


def test_capture_guards_the_input_device_shares_one_pool_and_stream_thread_local():
    from utils.engine.graphs import CudaCapture, GraphRunner
    cuda = RecordingCuda()
    runner = GraphRunner(lambda x: x * 2, capture_after=1, capture=CudaCapture(cuda), warmup=2)
    a, b = torch.ones(1, 3, 4, 4), torch.ones(2, 3, 4, 8)
    runner(a)
    runner(b)
    runner(a)  # replay, no new capture
    graphs = [e for e in cuda.log if e[0] == "graph"]
    assert len(graphs) == 2 and runner.captures == 2
    assert len(cuda.made_pools) == 1 and len(cuda.made_streams) == 1  # one pool, one side stream per device
    side = cuda.made_streams[0]
    assert side.device == a.device
    for _, pool, stream, mode in graphs:
        assert pool is cuda.made_pools[0] and stream is side and mode == "thread_local"
    # every stream/device call is about the input's device, under a guard for it
    assert [e[1] for e in cuda.log if e[0] in ("device", "current_stream")] == [a.device] * 6
    assert sum(e[0] == "replay" for e in cuda.log) == 3


# ---------------------------------------------------------------- torch.compile paths

def static_buffer_compile(monkeypatch):
    """torch.compile stand-in imitating reduce-overhead's CUDA graphs: every compiled function writes its result
    into a static buffer (one per output shape, shared by all of them like cudagraph trees' per-device pool)
    that the next call overwrites. Returns the list of (shape) calls that went through a 'compiled' function."""
    buffers: dict[tuple, torch.Tensor] = {}
    calls: list[tuple] = []

    def compile_(fn, mode=None, backend=None, dynamic=None):
        def run(x):
            y = fn(x)
            calls.append(tuple(x.shape))
            buf = buffers.setdefault(tuple(y.shape), torch.empty_like(y))
            return buf.copy_(y)
        return run

    monkeypatch.setattr(torch, "compile", compile_)
    return calls


def test_compiled_ensemble_members_do_not_overwrite_each_other(monkeypatch):
    from models.yolo import DetectionModel
    from utils.engine.backend import Backend
    from utils.engine.graphs import CompiledForward, main_output
    from utils.engine.validator import Ensemble
    static_buffer_compile(monkeypatch)
    backends = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        b = Backend(perturb_bn(DetectionModel("gelan-t.yaml", nc=3), seed), device="cpu")
        b.graph = CompiledForward(main_output(b.model), mode="reduce-overhead")  # what --cuda-graph compile builds
        backends.append(b)
    x = torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        ref = torch.cat([main_output(b.model)(x) for b in backends], 2)
        y = Ensemble(backends)(x)
    a = ref.shape[2] // 2
    assert (ref[..., :a] - ref[..., a:]).abs().max() > 1  # two clearly different models
    assert torch.equal(y, ref)


def test_warmup_never_captures_or_compiles_a_shape():
    from models.yolo import DetectionModel
    from utils.engine.backend import Backend
    b = Backend(DetectionModel("gelan-t.yaml", nc=3), device="cpu")
    calls = []
    b.graph = lambda x: calls.append(tuple(x.shape))
    b.warmup((1, 3, 64, 64))
    assert calls == [] and b.graph is not None


def test_compile_runs_new_shapes_eager_past_its_limit_with_one_warning(monkeypatch, caplog):
    from utils.engine import graphs
    calls = static_buffer_compile(monkeypatch)
    graphs._warned.clear()
    f = graphs.CompiledForward(lambda x: x + 1, mode="reduce-overhead", max_shapes=2)
    shapes = [(1, 2), (1, 3), (1, 2), (1, 4), (1, 4), (1, 3)]
    with caplog.at_level(logging.WARNING):
        outs = [f(torch.zeros(s)) for s in shapes]
    assert all(torch.equal(o, torch.ones(s)) for o, s in zip(outs, shapes))
    assert calls == [(1, 2), (1, 3), (1, 2), (1, 3)]  # (1, 4) ran eager, both times
    assert sum("more than 2 input shapes" in r.message for r in caplog.records) == 1


def test_backward_that_fails_to_compile_falls_back_to_eager_once(caplog):
    """Real torch.compile: AOTAutograd compiles the backward lazily, at the first backward(); a backend whose
    backward compiler fails must cost one warning and give the eager gradients."""
    from torch._dynamo.backends.common import aot_autograd

    from utils.engine import graphs

    def no_backward(gm, example_inputs):
        raise RuntimeError("backward compiler unavailable")

    graphs._warned.clear()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.SiLU(), nn.Conv2d(4, 2, 1))
    f = graphs.CompiledForward(model, backend=aot_autograd(fw_compiler=lambda gm, ex: gm, bw_compiler=no_backward))
    x = torch.rand(2, 3, 8, 8)

    def step(forward):
        loss = forward(x).square().mean()
        loss.backward()
        return loss.detach()

    with caplog.at_level(logging.WARNING):
        loss = f.with_fallback(step)
        grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        loss2 = f.with_fallback(step)
    model.zero_grad()
    ref = step(model)
    assert not f.active and torch.equal(loss, ref) and torch.equal(loss2, ref)
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))  # no doubled partial grads
    assert sum("torch.compile failed" in r.message for r in caplog.records) == 1


def test_trainer_compile_survives_a_backward_failure(tmp_path, monkeypatch, caplog):
    """train_dual.py --compile: a compiled forward whose backward fails (stand-in for inductor's lazy backward
    compile) trains the step eagerly with one warning, instead of ending the run at backward()."""
    from utils.engine import graphs
    from utils.engine.config import TrainConfig
    from utils.engine.train.trainer import Trainer

    def compile_(fn, **kw):
        return lambda x: [FailingBackward.apply(t) for t in fn(x)]

    monkeypatch.setattr(torch, "compile", compile_)
    graphs._warned.clear()
    data = shapes_yaml(tmp_path, n_train=4, n_val=2)
    cfg = TrainConfig(data=str(data), cfg="gelan-t.yaml", epochs=1, batch_size=2, imgsz=64, device="cpu",
                      workers=0, project=str(tmp_path), name="c", noplots=True, tensorboard=False, compile=True)
    t = Trainer(cfg)
    t.setup()
    t.nw, t.last_opt_step, t.nonfinite = -1, -1, 0  # what run() sets before the first epoch
    imgs, targets, paths, _ = next(iter(t.train_loader))
    with caplog.at_level(logging.WARNING):
        for ni in range(2):
            assert t.train_step(ni, 0, imgs.float() / 255, targets, paths) is not None
    assert not t.forward.active
    assert sum("torch.compile failed" in r.message for r in caplog.records) == 1
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in t.model.parameters())


def test_compile_probe_tries_once_and_without_fallback_a_failure_is_an_error(monkeypatch):
    """DDP's side of --compile: `probe` runs one step through the compiled forward with no eager retry (the
    trainer agrees on its outcome across ranks), and once the ranks agreed (fallback off) a failure is raised as
    one clear error instead of a step redone eagerly outside the other ranks' collectives."""
    from utils.engine import graphs

    monkeypatch.setattr(torch, "compile", lambda fn, **kw: lambda x: FailingBackward.apply(fn(x)))
    graphs._warned.clear()
    model = nn.Conv2d(3, 2, 1)
    x = torch.rand(1, 3, 4, 4)
    calls = []

    def step(forward):
        calls.append(forward)
        forward(x).sum().backward()

    f = graphs.CompiledForward(model)
    assert f.probe(step) is False and len(calls) == 1 and not f.active  # tried once, now eager
    g = graphs.CompiledForward(model)
    g.fallback = False
    with pytest.raises(UserError, match="train without --compile") as e:
        g.with_fallback(step)
    assert "\n" not in str(e.value) and len(calls) == 2  # no eager retry


def test_validation_in_amp_training_runs_under_autocast_and_the_ema_keeps_its_buffers(tmp_path):
    """AMP training validates its EMA model under autocast (bf16 on CPU stands in for CUDA's fp16), never by
    model.half(): that replaces BatchNorm buffers with new tensors, and the EMA, which caches references to its
    tensors, would from then on average into the old ones (its BN statistics frozen for good)."""
    from utils.engine.config import TrainConfig
    from utils.engine.train.trainer import Trainer
    data = shapes_yaml(tmp_path, n_train=4, n_val=2)
    cfg = TrainConfig(data=str(data), cfg="gelan-t.yaml", epochs=1, batch_size=2, imgsz=64, device="cpu",
                      workers=0, project=str(tmp_path), name="v", noplots=True, tensorboard=False)
    t = Trainer(cfg)
    t.setup()
    t.amp_dtype = torch.bfloat16  # what AMP sets (float16 on CUDA)
    ema = t.ema.ema
    t.ema.update(t.model)  # as in training: the EMA has averaged (and cached its tensors) before validating
    seen = []
    hook = ema.register_forward_pre_hook(
        lambda m, a: seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"))))
    t._validate(ema)
    hook.remove()
    assert seen and all(s == (True, torch.bfloat16) for s in seen)
    assert all(v.dtype == torch.float32 for v in ema.state_dict().values() if v.is_floating_point())
    bn_ema = next(m for m in ema.modules() if isinstance(m, nn.BatchNorm2d))
    bn_model = next(m for m in t.model.modules() if isinstance(m, nn.BatchNorm2d))
    before = bn_ema.running_mean.clone()
    with torch.no_grad():
        bn_model.running_mean += 1.0
    t.ema.update(t.model)
    assert (bn_ema.running_mean - before).abs().min() > 0  # the EMA still averages into the buffers it validates with


# ---------------------------------------------------------------- TorchScript export

def test_torchscript_export_has_no_device_constants_and_runs_on_another_device(tmp_path):
    """The exported anchor grid must follow the input's device: a trace that recorded the export device
    (torch.arange(device=...)) fails when the file runs on another one ('meta' stands in for cuda:0)."""
    import export
    from utils.checkpoint import load_model
    from utils.deploy.export import export_mode
    from utils.deploy.formats.torchscript import trace as trace_torchscript
    w = seeded_tiny_checkpoint(tmp_path / "tiny.pt", ["a", "b", "c"])
    f = export.run(w, include=("torchscript",), imgsz=(64, 96), dynamic=True)["torchscript"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = str(torch.jit.load(str(f), map_location="cpu").inlined_graph)
    assert "Device = prim::Constant" not in graph and 'value="cpu"' not in graph
    model = load_model(w, "cpu", fuse=True)
    with export_mode(model):
        ts = trace_torchscript(model, torch.zeros(1, 3, 64, 96))  # what export.run saved
    x = torch.rand(2, 3, 96, 64)  # another batch and a transposed size
    y_cpu = ts(x)
    y = ts.to("meta")(x.to("meta"))
    assert y.device.type == "meta" and y.shape == y_cpu.shape == (2, 7, 12 * 8 + 6 * 4 + 3 * 2)


def test_anchor_grid_is_unchanged_by_the_device_free_form():
    from utils.boxes import make_anchors
    feats = [torch.zeros(1, 2, 3, 5), torch.zeros(1, 2, 2, 1)]
    pts, strides = make_anchors(feats, [8.0, 16.0])
    gy, gx = torch.meshgrid(torch.arange(3.0), torch.arange(5.0), indexing="ij")
    first = torch.stack((gx.flatten(), gy.flatten()), -1) + 0.5
    assert torch.equal(pts, torch.cat([first, torch.tensor([[0.5, 0.5], [0.5, 1.5]])]))
    assert torch.equal(strides.flatten(), torch.tensor([8.0] * 15 + [16.0] * 2))
    half = make_anchors([torch.zeros(1, 1, 3, 2048, dtype=torch.float16)], [8.0])[0]  # same rounding as arange
    assert half.dtype == torch.float16 and torch.equal(half[:2048, 0], torch.arange(2048, dtype=torch.float16) + 0.5)


# ---------------------------------------------------------------- autobatch

class FakeCudaMemory:
    """torch.cuda memory calls for cuda_batch_size on CPU: peak = 0.5 GiB + 0.01 GiB per image per 64x64 pixels;
    6 GiB free of 80, 2 GiB already held by this process. Records cudnn.benchmark at each probe."""

    def __init__(self):
        self.images = 0
        self.benchmark_during_probes: list[bool] = []

    def synchronize(self, d=None):
        pass

    def empty_cache(self):
        pass

    def mem_get_info(self, d=None):
        return 6 * GIB, 80 * GIB

    def memory_reserved(self, d=None):
        return 2 * GIB

    def reset_peak_memory_stats(self, d=None):
        self.benchmark_during_probes.append(torch.backends.cudnn.benchmark)

    def max_memory_allocated(self, d=None):
        return (0.5 + 0.01 * self.images) * GIB


def test_autobatch_leaves_the_model_untouched_and_budgets_free_memory(monkeypatch):
    from models.yolo import DetectionModel
    from utils.engine.train.autobatch import cuda_batch_size
    from utils.loss import DetectionLoss
    torch.manual_seed(0)
    model = DetectionModel("gelan-t.yaml", nc=3).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fake = FakeCudaMemory()
    seen_sizes, autocast = [], []
    loss = DetectionLoss(model, {})

    def loss_fn(pred, targets):
        fake.images = pred[0].shape[0] * (pred[0].shape[-1] * 8 // 64) ** 2  # images x (64 px squares)
        seen_sizes.append(pred[0].shape[-1] * 8)
        autocast.append(torch.is_autocast_enabled("cpu"))
        return loss(pred, targets)

    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    res = cuda_batch_size(model, 128, torch.device("cpu"), 0.6, amp=False, loss_fn=loss_fn, cuda=fake)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BN running statistics
    assert not model.training and all(p.grad is None for p in model.parameters())
    assert seen_sizes == [128] * 5 and autocast == [False] * 5  # the size and precision it was given
    assert fake.benchmark_during_probes == [False] * 5 and torch.backends.cudnn.benchmark is True
    # budget: 60% of (6 GiB free + 2 GiB held) = 4.8 GiB; 128 px = 4 squares: 0.5 + 0.04 b <= 4.8 -> 107
    assert res.total_gib == pytest.approx(8.0) and res.batch == 107
    assert "80.0 GiB on the device" in res.summary()


def test_multi_scale_top_size_is_the_largest_random_size():
    from utils.data import max_random_imgsz, random_imgsz
    random.seed(0)
    for imgsz in (640, 100, 160):
        draws = {random_imgsz(imgsz, 32) for _ in range(3000)}
        assert max(draws) == max_random_imgsz(imgsz, 32)
    assert max_random_imgsz(640, 32) == 960


# ---------------------------------------------------------------- trainer decisions

def test_batch_larger_than_the_dataset_scales_decay_and_accumulation_by_the_batch_used(tmp_path):
    from utils.engine.config import TrainConfig
    from utils.engine.train.trainer import Trainer, load_hyp
    data = shapes_yaml(tmp_path, n_train=8, n_val=2)
    cfg = TrainConfig(data=str(data), cfg="gelan-t.yaml", epochs=1, batch_size=256, imgsz=64, device="cpu",
                      workers=0, project=str(tmp_path), name="b", noplots=True, tensorboard=False, optimizer="SGD")
    t = Trainer(cfg)
    t.setup()
    wd = load_hyp(t.cfg.hyp)["weight_decay"]
    assert t.train_loader.batch_size == 8 and t.cfg.batch_size == 8
    assert t.accumulate == 8  # nominal 64 / 8
    assert t.optimizer.param_groups[1]["weight_decay"] == pytest.approx(wd * 8 * 8 / 64)  # not 256 / 64 = 4x


# ---------------------------------------------------------------- fixed shapes for graphs at scale

def test_plan_fixed_shapes_covers_every_batch_with_few_shapes():
    from utils.engine.graphs import fixed_shape_for, plan_fixed_shapes
    wide = [(384, 672)] * 3 + [(416, 672)] * 2 + [(480, 672)] * 2 + [(672, 672)] * 3
    tall = [(672, 480)] * 2 + [(672, 352)] * 2
    plan = plan_fixed_shapes(wide + tall, 4)
    assert plan == [(384, 672), (480, 672), (672, 480), (672, 672)]
    for h, w in wide + tall:
        fh, fw = fixed_shape_for(h, w, plan)
        assert fh >= h and fw >= w
    assert fixed_shape_for(416, 672, plan) == (480, 672)  # the smallest that fits
    assert plan_fixed_shapes(wide + tall, 1) == [(672, 672)]
    assert fixed_shape_for(700, 10, plan) is None


def test_val_under_graphs_pads_rect_batches_to_the_planned_shapes(tmp_path):
    """val_dual.py --cuda-graph: rectangular batches reach the graph runner in at most 4 shapes; boxes keep
    their coordinates (the padding is bottom/right)."""
    from utils.data import create_dataloader
    from utils.engine.backend import Backend
    from utils.engine.graphs import GraphRunner, eager_capture, main_output
    from utils.engine.validator import ValOptions, Validator, _fix_graph_shapes
    from utils.data import generate_shapes
    rng = np.random.default_rng(0)
    generate_shapes(tmp_path / "ds", n_train=1, n_val=12, seed=0)
    import cv2
    for i, p in enumerate(sorted((tmp_path / "ds" / "images" / "val").iterdir())):  # 12 different aspect ratios
        im = cv2.imread(str(p))
        cv2.imwrite(str(p), cv2.resize(im, (int(rng.integers(40, 160)), int(rng.integers(40, 160)))))
    w = seeded_tiny_checkpoint(tmp_path / "tiny.pt", ["a", "b", "c", "d", "e"])
    loader, _ = create_dataloader(tmp_path / "ds" / "images" / "val", 128, 2, 32, rect=True, pad=0.5, workers=0)
    distinct = {tuple(int(v) for v in s) for s in loader.dataset.batch_shapes}
    assert len(distinct) > 4
    eager = Validator(ValOptions(training=False)).run(Backend(w), loader)
    b = Backend(w)
    seen = []
    fn = main_output(b.model)
    b.graph = GraphRunner(lambda x: seen.append(tuple(x.shape[-2:])) or fn(x), capture=eager_capture)
    _fix_graph_shapes([b], loader.dataset)
    assert 1 < len(b.graph_shapes) <= 4
    padded = Validator(ValOptions(training=False)).run(b, loader)
    assert set(seen) <= set(b.graph_shapes) and padded.seen == eager.seen == 12
    assert abs(padded.map50 - eager.map50) < 0.05


def test_fp32_torchscript_with_half_on_cuda_runs_in_its_own_precision(tmp_path, monkeypatch, caplog):
    """--half with an fp32 TorchScript file on CUDA: the traced weights are fp32, so inputs must stay fp32 (fp16
    input into fp32 weights failed at warm-up); one warning says why --half does not apply. torch.jit.load
    loads onto the CPU here in place of the GPU."""
    import export
    from utils.engine.backend import Backend
    w = seeded_tiny_checkpoint(tmp_path / "tiny.pt", ["a", "b", "c"])
    f = export.run(w, include=("torchscript",), imgsz=64)["torchscript"]
    real_load = torch.jit.load
    monkeypatch.setattr(torch.jit, "load", lambda p, map_location=None, **k: real_load(p, map_location="cpu", **k))
    with caplog.at_level(logging.WARNING, logger="yolov9mqa"):
        b = Backend(f, device="cuda", half=True)
    assert b.dtype == torch.float32 and not b.half and b.precision == "f32"
    lines = [r.getMessage() for r in caplog.records if "--half" in r.getMessage()]
    assert len(lines) == 1 and "fp32" in lines[0]
    b.device = b.runner.device = torch.device("cpu")  # run the CPU copy: fp32 in, fp32 weights
    x = torch.rand(1, 3, 64, 64)
    torch.testing.assert_close(b(x.to(b.dtype)), Backend(w)(x), atol=1e-4, rtol=1e-4)

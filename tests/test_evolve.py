"""train_dual.py --evolve: Optuna search space, study outputs, resume after an interruption, pruning, errors."""
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import pandas as pd
import pytest
import torch
import yaml

from helpers import limit, shapes_yaml

optuna = pytest.importorskip("optuna")

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(cfg="gelan-t.yaml", imgsz=64, batch_size=8, workers=0, seed=1, epochs=1)
UPSTREAM_KEYS = ("box", "cls", "dfl", "lr0", "lrf", "momentum", "weight_decay", "warmup_epochs", "warmup_momentum",
                 "warmup_bias_lr", "hsv_h", "hsv_s", "hsv_v", "degrees", "translate", "scale", "shear",
                 "perspective", "flipud", "fliplr", "mosaic", "mixup", "copy_paste")


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Many tiny trainings: one intra-op thread each (see conftest)."""


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return shapes_yaml(tmp_path_factory.mktemp("shapes"), n_train=16, n_val=8)


def _cfg(data, project, **kw):
    from utils.engine.config import TrainConfig
    return TrainConfig.from_args({**TINY, "data": str(data), "project": str(project), "name": "evo",
                                  "exist_ok": True, **kw})


def _base_hyp():
    return yaml.safe_load((ROOT / "data/hyps/hyp.scratch-high.yaml").read_text())


class InterruptAt:
    """Trainer callback that plays Ctrl-C in one trial folder: at the end of its first epoch, or while the
    trial finishes (after its final validation)."""

    def __init__(self, folder: str, finishing: bool = False):
        self.folder, self.finishing = folder, finishing

    def on_epoch_end(self, trainer, epoch, row):
        if trainer.save_dir.name == self.folder and not self.finishing:
            raise KeyboardInterrupt

    def on_train_end(self, trainer, result):
        if trainer.save_dir.name == self.folder and self.finishing:
            raise KeyboardInterrupt


def test_space_baseline_and_sampling():
    from utils.engine.train.evolve import SPACE, baseline_params, sample_hyp
    from utils.engine.train.trainer import HYP_KEYS, HYP_OPTIONAL_KEYS
    assert set(SPACE) == set(UPSTREAM_KEYS) and set(SPACE) <= set(HYP_KEYS + HYP_OPTIONAL_KEYS)
    assert all(r.low < r.high for r in SPACE.values())
    base = {**_base_hyp(), "lr0": 0.5, "degrees": -3.0}
    params = baseline_params(base)
    assert params["lr0"] == SPACE["lr0"].high and params["degrees"] == SPACE["degrees"].low  # clipped into range
    assert params["scale"] == 0.9 and params["box"] == 7.5  # in range: kept
    # a fixed trial answers suggest_float with given values: sampled keys replaced, the others kept from base
    drawn = {k: r.low + 0.123456789 * (r.high - r.low) for k, r in SPACE.items()}
    hyp = sample_hyp(optuna.trial.FixedTrial(drawn), base)
    assert set(hyp) == set(base)
    assert hyp["cls_pw"] == base["cls_pw"]
    for k, v in drawn.items():
        assert hyp[k] == pytest.approx(v, rel=1e-4) and SPACE[k].low <= hyp[k] <= SPACE[k].high


def _frozen(number_value_state, hyp):
    value, state, attrs = number_value_state
    return optuna.trial.create_trial(state=state, value=value if state.name == "COMPLETE" else None,
                                     params={"lr0": hyp["lr0"]},
                                     distributions={"lr0": optuna.distributions.FloatDistribution(1e-5, 0.1, log=True)},
                                     user_attrs={"hyp": hyp, "seed": 7, **attrs})


def test_outputs_pick_the_best_finished_trial(tmp_path):
    from utils.engine.train.evolve import write_outputs
    from utils.engine.train.trainer import load_hyp
    S = optuna.trial.TrialState
    study = optuna.create_study(direction="maximize")
    base = _base_hyp()
    cases = [(0.2, S.COMPLETE, {}), (0.5, S.COMPLETE, {}), (None, S.PRUNED, {"fitness": 0.9}),
             (0.3, S.COMPLETE, {}), (None, S.FAIL, {"note": "interrupted"})]
    hyps = [{**base, "lr0": 0.001 * (i + 1), "mosaic": 0.1 * i} for i in range(len(cases))]
    for case, hyp in zip(cases, hyps):
        study.add_trial(_frozen(case, hyp))
    write_outputs(study, tmp_path)
    df = pd.read_csv(tmp_path / "evolve.csv")
    assert list(df["trial"]) == [0, 1, 2, 3, 4]
    assert list(df["state"]) == ["COMPLETE", "COMPLETE", "PRUNED", "COMPLETE", "FAIL"]
    assert list(df["fitness"][:4]) == pytest.approx([0.2, 0.5, 0.9, 0.3]) and pd.isna(df["fitness"][4])
    assert list(df["lr0"]) == pytest.approx([h["lr0"] for h in hyps]) and list(df["seed"]) == [7] * 5
    # the best FINISHED trial (not the pruned one with a higher partial fitness) becomes hyp_evolve.yaml
    best = yaml.safe_load((tmp_path / "hyp_evolve.yaml").read_text())
    assert best == hyps[1]
    assert "trial 1" in (tmp_path / "hyp_evolve.yaml").read_text().splitlines()[0]
    assert load_hyp(tmp_path / "hyp_evolve.yaml") == pytest.approx(hyps[1])  # usable with --hyp
    im = cv2.imread(str(tmp_path / "evolve.png"))
    assert im is not None and im.shape[0] > 500 and im.shape[1] > 1000


def _until(cond, timeout: float = 60.0, poll: float = 0.1, what=lambda: ""):
    """Wait for cond() to return something truthy (checked, never a fixed sleep); returns it."""
    t0 = time.time()
    while time.time() - t0 < limit(timeout):
        got = cond()
        if got:
            return got
        time.sleep(poll)
    raise AssertionError(f"condition not met within {limit(timeout)} s\n{what()}")


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")  # the test asks trials by hand
def test_only_trials_without_heartbeat_are_queued_again(tmp_path):
    from utils.engine.train.evolve import Heartbeat, open_study, requeue_unfinished
    S = optuna.trial.TrialState
    db = tmp_path / "study.db"
    study, storage = open_study(db, seed=0, heartbeat=1, grace=6)
    done = study.ask()
    done.suggest_float("lr0", 1e-5, 0.1, log=True)
    study.tell(done, 0.4)
    live, dead = study.ask(), study.ask()
    live.suggest_float("lr0", 1e-5, 0.1, log=True)
    lr0 = dead.suggest_float("lr0", 1e-5, 0.1, log=True)
    beat = Heartbeat(study, storage, live)  # this process keeps training trial 1
    Heartbeat(study, storage, dead).stop()  # trial 2's process beat once, then died
    try:
        study, storage = open_study(db, seed=0, heartbeat=1, grace=6)  # a second process opens the same file
        assert requeue_unfinished(study, storage) == []  # within the grace period both may be alive
        assert _until(lambda: requeue_unfinished(study, storage)) == [2]  # 6 s without a heartbeat: dead
        assert [t.state for t in study.trials] == [S.COMPLETE, S.RUNNING, S.FAIL, S.WAITING]  # trial 1 untouched
    finally:
        beat.stop()
    assert study.trials[3].user_attrs["retry_of"] == 2
    again = study.ask()
    assert again.number == 3 and again.suggest_float("lr0", 1e-5, 0.1, log=True) == lr0  # same hyperparameters
    study.tell(again, 0.5)
    assert requeue_unfinished(study, storage) == []  # queued once only
    # a study written before heartbeats (one process at a time): its RUNNING trials are all dead
    old, old_storage = open_study(tmp_path / "old.db", seed=0)
    old.ask().suggest_float("lr0", 1e-5, 0.1, log=True)
    assert requeue_unfinished(old, old_storage, legacy=True) == [0]
    from utils.general import UserError
    (tmp_path / "not_a.db").write_text("these are not SQLite pages\n")
    with pytest.raises(UserError, match="not_a.db: cannot open the study"):
        open_study(tmp_path / "not_a.db", seed=0)


# Test harness only: every trial's training waits until the file $EVOLVE_GO exists, so the test can start the
# second process while the first one's trial is still RUNNING (a real trial may finish before it starts).
HOLD_LAUNCHER = """
import os, runpy, sys, time
from pathlib import Path
from utils.engine.train import trainer
run = trainer.Trainer.run
def held(self):
    print(f"HARNESS holding {self.cfg.name}", flush=True)
    while not Path(os.environ["EVOLVE_GO"]).exists():
        time.sleep(0.05)
    return run(self)
trainer.Trainer.run = held
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


class _Lines:
    """A process's merged output, read line by line in a thread (a test waits for a line to appear)."""

    def __init__(self, p: subprocess.Popen):
        self.lines: list[str] = []
        self.thread = threading.Thread(target=lambda: self.lines.extend(p.stdout), daemon=True)
        self.thread.start()

    def text(self) -> str:
        return "".join(self.lines)


def test_two_processes_share_one_study(tiny_data, tmp_path):
    """Two `train_dual.py --evolve 2` processes on one study (the second with --exist-ok, as for a second GPU):
    each trains its own trial, neither fails the other's, both end with rc 0."""
    launcher = tmp_path / "hold.py"
    launcher.write_text(HOLD_LAUNCHER)
    go = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "EVOLVE_GO": str(go)}
    cmd = [sys.executable, str(launcher), str(ROOT / "train_dual.py"), "--evolve", "2", "--cfg", "gelan-t.yaml",
           "--data", str(tiny_data), "--epochs", "1", "--imgsz", "64", "--batch-size", "8", "--workers", "0",
           "--project", str(tmp_path), "--name", "evo", "--exist-ok"]
    procs, outs = [], []
    try:
        for trial in ("trial_0", "trial_1"):  # the second starts while the first one's trial 0 is RUNNING
            procs.append(subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True))
            outs.append(_Lines(procs[-1]))
            held = _until(lambda: f"HARNESS holding {trial}" in outs[-1].text() or procs[-1].poll() is not None, 240,
                          what=lambda: outs[-1].text()[-3000:])
            assert procs[-1].poll() is None and held, outs[-1].text()[-3000:]
        go.touch()
        for p in procs:
            p.wait(timeout=limit(400))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for o in outs:
        o.thread.join(timeout=limit(60))
    texts = [o.text() for o in outs]
    assert [p.returncode for p in procs] == [0, 0], [t[-2000:] for t in texts]
    assert all("Traceback" not in t for t in texts)
    study = optuna.load_study(study_name="evolve", storage=f"sqlite:///{tmp_path / 'evo' / 'study.db'}")
    trials = study.trials
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
    assert [t.user_attrs["worker"].split(":")[-1] for t in trials] == [str(p.pid) for p in procs]
    assert "Trial 0 finished" in texts[0] and "Trial 1 finished" in texts[1]
    assert "Trial 1 (seed" not in texts[0] and "Trial 0 (seed" not in texts[1]
    kept = sorted(p.relative_to(tmp_path / "evo").as_posix() for p in (tmp_path / "evo").rglob("*.pt"))
    assert kept == [f"trials/trial_{study.best_trial.number}/weights/best.pt"]


def _weights(out):
    return sorted(p.relative_to(out).as_posix() for p in out.rglob("*.pt"))


def test_three_trials_interrupt_resume_and_best_hyp_trains(tiny_data, tmp_path, caplog):
    from utils.engine.train.evolve import SPACE, evolve
    from utils.engine.train.trainer import Trainer
    from utils.general import UserError
    S = optuna.trial.TrialState
    caplog.set_level("INFO")
    cfg = _cfg(tiny_data, tmp_path)
    out = tmp_path / "evo"
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C while the third trial finishes (its epoch is trained)
        evolve(cfg, 3, callbacks=[InterruptAt("trial_2", finishing=True)])
    # the one command that continues is printed; no --resume hint for a trial's last.pt, which evolve deletes
    assert not [r.getMessage() for r in caplog.records if "--resume" in r.getMessage()]
    assert "Continue with the same command plus --exist-ok" in caplog.text
    df = pd.read_csv(out / "evolve.csv")
    assert list(df["state"]) == ["COMPLETE", "COMPLETE", "FAIL"] and df["note"][2] == "interrupted"
    assert list(df["epochs"]) == [1, 1, 1]  # the interrupted trial did train its epoch
    # disk: the best finished trial keeps its (stripped) best.pt; the others, the interrupted one too, no weights
    best0 = int(df.loc[df["state"] == "COMPLETE", "fitness"].idxmax())
    assert _weights(out) == [f"trials/trial_{best0}/weights/best.pt"]
    assert torch.load(out / _weights(out)[0], weights_only=True)["optimizer"] is None
    assert f"MB on disk (weights kept: best.pt of trial {best0}" in caplog.text
    assert df["note"][0] == "baseline"
    # --optimizer auto (the default) is decided once for the study: this tiny run is short, so AdamW, and
    # the baseline trial starts from auto's lr0 / momentum / warmup_bias_lr, every other value the hyp file's
    auto = {**_base_hyp(), "lr0": 0.002, "momentum": 0.9, "warmup_bias_lr": 0.0}
    assert df.loc[0, list(SPACE)].tolist() == pytest.approx([auto[k] for k in SPACE])
    trial0 = yaml.safe_load((out / "trials/trial_0/hyp.yaml").read_text())  # the trial trains them as given
    assert (trial0["lr0"], trial0["momentum"]) == pytest.approx((0.002, 0.9))
    assert yaml.safe_load((out / "trials/trial_0/opt.yaml").read_text())["optimizer"] == "AdamW"
    stamps = {i: (out / f"trials/trial_{i}/results.csv").stat().st_mtime_ns for i in (0, 1)}

    study = evolve(cfg, 3)  # the same command again: only the interrupted trial is trained (again)
    trials = study.trials
    assert [t.state for t in trials] == [S.COMPLETE, S.COMPLETE, S.FAIL, S.COMPLETE]
    assert trials[3].user_attrs["retry_of"] == 2 and trials[3].params == trials[2].params
    assert {i: (out / f"trials/trial_{i}/results.csv").stat().st_mtime_ns for i in (0, 1)} == stamps
    assert sorted(p.name for p in (out / "trials").iterdir()) == ["trial_0", "trial_1", "trial_2", "trial_3"]
    assert [t.user_attrs["seed"] for t in trials] == [1, 2, 3, 4]  # base seed + trial number
    df = pd.read_csv(out / "evolve.csv")
    assert list(df["trial"]) == [0, 1, 2, 3] and list(df["seed"]) == [1, 2, 3, 4]
    done = df[df["state"] == "COMPLETE"]
    assert done["fitness"].tolist() == pytest.approx(
        (0.1 * done["metrics/mAP_0.5"] + 0.9 * done["metrics/mAP_0.5:0.95"]).tolist(), abs=1e-9)
    for _, row in done.iterrows():  # the csv holds the hyperparameters each trial really trained with
        trained = yaml.safe_load((out / f"trials/trial_{row['trial']}/hyp.yaml").read_text())
        assert [row[k] for k in SPACE] == pytest.approx([trained[k] for k in SPACE])
        assert not (out / f"trials/trial_{row['trial']}/results.png").exists()  # trials plot nothing by default
        assert not list((out / f"trials/trial_{row['trial']}").glob("events.out.tfevents.*"))
    assert cv2.imread(str(out / "evolve.png")) is not None
    assert (out / "study.db").is_file()
    best = max((t for t in trials if t.state == S.COMPLETE), key=lambda t: t.value)
    assert _weights(out) == [f"trials/trial_{best.number}/weights/best.pt"]

    assert len(evolve(cfg, 3).trials) == 4  # already 3 finished trials: nothing more to train
    with pytest.raises(UserError, match="epochs"):  # continuing needs the same settings
        evolve(cfg.replace(epochs=2), 5)

    # hyp_evolve.yaml is the best finished trial's full hyp file and trains as --hyp
    written = yaml.safe_load((out / "hyp_evolve.yaml").read_text())
    assert written == best.user_attrs["hyp"]
    trainer = Trainer(cfg.replace(hyp=str(out / "hyp_evolve.yaml"), project=str(tmp_path), name="again",
                                  noplots=True, tensorboard=False))
    result = trainer.run()
    assert result is not None and trainer.hyp == pytest.approx(written)
    assert yaml.safe_load((tmp_path / "again/hyp.yaml").read_text()) == pytest.approx(written)


def test_pruned_trial_stops_cleanly_and_prune_off_trains_on(tiny_data, tmp_path):
    from utils.engine.train.evolve import evolve
    S = optuna.trial.TrialState
    always = optuna.pruners.ThresholdPruner(lower=1.5)  # fitness <= 1: prunes at the first report
    seen = {}

    class AtTrainEnd:  # the trial's weights as its training ends, before the study deletes them
        def on_train_end(self, trainer, result):
            seen["last"] = torch.load(trainer.wdir / "last.pt", weights_only=True)
            seen["best"] = torch.load(trainer.wdir / "best.pt", weights_only=True)

    study = evolve(_cfg(tiny_data, tmp_path, epochs=2), 1, pruner=always, callbacks=[AtTrainEnd()])
    (trial,) = study.trials
    assert trial.state == S.PRUNED
    run = tmp_path / "evo" / "trials" / "trial_0"
    rows = pd.read_csv(run / "results.csv")
    assert list(rows["epoch"]) == [0]  # stopped after epoch 0 of 2
    assert trial.intermediate_values == pytest.approx(
        {0: 0.1 * rows["metrics/mAP_0.5"][0] + 0.9 * rows["metrics/mAP_0.5:0.95"][0]}, abs=1e-6)
    assert seen["last"]["epoch"] == 0 and seen["last"]["optimizer"] is not None  # checkpoint of the last epoch
    assert seen["best"]["optimizer"] is None  # finish() ran
    assert not (run / "weights").exists()  # a pruned trial keeps no weights
    df = pd.read_csv(tmp_path / "evo" / "evolve.csv")
    assert list(df["state"]) == ["PRUNED"] and df["note"][0] == "pruned after epoch 0"
    assert not (tmp_path / "evo" / "hyp_evolve.yaml").exists()  # no finished trial to recommend

    study = evolve(_cfg(tiny_data, tmp_path, epochs=2, name="off"), 1, prune=False, pruner=always)
    assert [t.state for t in study.trials] == [S.COMPLETE] and not study.trials[0].intermediate_values
    assert list(pd.read_csv(tmp_path / "off/trials/trial_0/results.csv")["epoch"]) == [0, 1]


def test_diverged_trial_scores_zero(tiny_data, tmp_path, monkeypatch):
    from utils.engine.train import trainer as trainer_mod
    from utils.engine.train.evolve import evolve
    real = trainer_mod.DetectionLoss

    class NaNLoss(real):  # every training step's loss is NaN: 10 in a row stop the run (2 steps per epoch)
        def __call__(self, preds, targets):
            loss, items = super().__call__(preds, targets)
            return (loss * float("nan") if torch.is_grad_enabled() else loss), items

    monkeypatch.setattr(trainer_mod, "DetectionLoss", NaNLoss)
    study = evolve(_cfg(tiny_data, tmp_path, epochs=5, noval=True), 1)  # returns: no error escapes
    assert [(t.state.name, t.value, t.user_attrs["note"]) for t in study.trials] == [
        ("COMPLETE", 0.0, "loss not finite")]
    df = pd.read_csv(tmp_path / "evo" / "evolve.csv")
    assert list(df["note"]) == ["loss not finite"] and list(df["fitness"]) == [0.0]


def _errors(stderr):
    return [ln for ln in stderr.splitlines() if ln.strip()]


def test_bad_hyp_files_are_one_line_errors(tiny_data, tmp_path, capsys):
    import train_dual
    base = _base_hyp()
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text(yaml.safe_dump({**base, "mosiac": 0.5}))
    args = ["--cfg", "gelan-t.yaml", "--data", str(tiny_data), "--epochs", "1", "--imgsz", "64",
            "--project", str(tmp_path), "--workers", "0"]
    r = subprocess.run([sys.executable, str(ROOT / "train_dual.py"), *args, "--hyp", str(unknown), "--evolve", "2"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=limit(120),
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 1 and _errors(r.stderr) == [
        f"ERROR: {unknown}: unknown hyperparameter(s) mosiac (mosiac: did you mean mosaic?)"]
    assert not list(tmp_path.glob("evo*"))  # nothing started
    malformed = tmp_path / "malformed.yaml"
    malformed.write_text("lr0: [0.01\n")
    not_numbers = tmp_path / "text.yaml"
    not_numbers.write_text(yaml.safe_dump({**base, "lr0": "fast"}))
    for hyp, words in ((malformed, "invalid YAML"), (not_numbers, "non-numeric hyperparameter(s) lr0"),
                       (unknown, "unknown hyperparameter(s) mosiac")):
        for extra in (["--evolve"], []):  # the search and a plain training say the same
            with pytest.raises(SystemExit) as e:
                train_dual.main([*args, "--hyp", str(hyp), *extra])
            err = _errors(capsys.readouterr().err)
            assert e.value.code == 1 and len(err) == 1 and err[0].startswith("ERROR: ") and words in err[0], err
    for extra, words in ((["--evolve", "0"], "positive integer"), (["--evolve", "--resume"], "--exist-ok")):
        with pytest.raises(SystemExit):
            train_dual.main([*args, *extra])
        err = _errors(capsys.readouterr().err)
        assert len(err) == 1 and words in err[0], err


def test_full_disk_evolve_outputs_are_one_line_and_intact(tmp_path, capfd):
    """evolve.csv and hyp_evolve.yaml are written whole or not at all: on a full disk one UserError line,
    the files of the last successful write unchanged, no temp files."""
    from helpers import disk_full_after
    from utils.engine.train.evolve import write_outputs
    from utils.general import UserError
    S = optuna.trial.TrialState
    study = optuna.create_study(direction="maximize")
    base = _base_hyp()
    study.add_trial(_frozen((0.2, S.COMPLETE, {}), {**base, "lr0": 0.001}))
    write_outputs(study, tmp_path)
    before = {f: (tmp_path / f).read_bytes() for f in ("evolve.csv", "hyp_evolve.yaml")}
    for i in range(40):  # a longer table and a new best trial
        study.add_trial(_frozen((0.3 + i / 100, S.COMPLETE, {}), {**base, "lr0": 0.002 + i / 1000}))
    capfd.readouterr()
    limit = min(len(b) for b in before.values()) + 64  # fits neither new file
    with disk_full_after(limit), pytest.raises(UserError, match="could not write \\(File too large\\); the "
                                                              "previous file is unchanged"):
        write_outputs(study, tmp_path)
    assert {f: (tmp_path / f).read_bytes() for f in before} == before
    assert not [p.name for p in tmp_path.iterdir() if ".tmp" in p.name]


def test_auto_optimizer_counts_the_images_training_keeps(tmp_path, monkeypatch):
    """--evolve decides --optimizer auto once, from the training images that survive verification (a corrupt
    file is dropped by training, so it must not be counted)."""
    from utils.engine.train import evolve as evolve_mod
    data = shapes_yaml(tmp_path, n_train=6, n_val=2)
    (tmp_path / "ds" / "images" / "train" / "broken.jpg").write_bytes(b"not a jpeg")
    counted = []

    class Decided(Exception):
        pass

    def spy(name, n_images, *args, **kwargs):
        counted.append(n_images)
        raise Decided

    monkeypatch.setattr(evolve_mod, "choose_optimizer", spy)
    with pytest.raises(Decided):
        evolve_mod.evolve(_cfg(data, tmp_path), 1)
    assert counted == [6]

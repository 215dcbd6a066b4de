"""train_dual.py --evolve: Optuna search space, study outputs, resume after an interruption, pruning, errors."""
import os
import subprocess
import sys
from pathlib import Path

import cv2
import pandas as pd
import pytest
import torch
import yaml

from helpers import shapes_yaml

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
    """Trainer callback that plays Ctrl-C at the end of the first epoch of one trial folder."""

    def __init__(self, folder: str):
        self.folder = folder

    def on_epoch_end(self, trainer, epoch, row):
        if trainer.save_dir.name == self.folder:
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


def test_running_trial_of_a_dead_process_is_queued_again(tmp_path):
    from utils.engine.train.evolve import open_study, requeue_unfinished
    S = optuna.trial.TrialState
    db = tmp_path / "study.db"
    study, _ = open_study(db, seed=0)
    done = study.ask()
    done.suggest_float("lr0", 1e-5, 0.1, log=True)
    study.tell(done, 0.4)
    lost = study.ask()  # this process "dies" while the trial trains: it stays RUNNING in the file
    lr0 = lost.suggest_float("lr0", 1e-5, 0.1, log=True)
    study, storage = open_study(db, seed=0)  # a new process opens the same file
    assert [t.state for t in study.trials] == [S.COMPLETE, S.RUNNING]
    assert requeue_unfinished(study, storage) == [1]
    trials = study.trials
    assert [t.state for t in trials] == [S.COMPLETE, S.FAIL, S.WAITING]
    assert trials[2].user_attrs["retry_of"] == 1
    again = study.ask()
    assert again.number == 2 and again.suggest_float("lr0", 1e-5, 0.1, log=True) == lr0  # same hyperparameters
    study.tell(again, 0.5)
    assert requeue_unfinished(study, storage) == []  # queued once only
    assert [t.state for t in study.trials] == [S.COMPLETE, S.FAIL, S.COMPLETE]
    from utils.general import UserError
    (tmp_path / "not_a.db").write_text("these are not SQLite pages\n")
    with pytest.raises(UserError, match="not_a.db: cannot open the study"):
        open_study(tmp_path / "not_a.db", seed=0)


def test_three_trials_interrupt_resume_and_best_hyp_trains(tiny_data, tmp_path):
    from utils.engine.train.evolve import SPACE, evolve
    from utils.engine.train.trainer import Trainer
    from utils.general import UserError
    S = optuna.trial.TrialState
    cfg = _cfg(tiny_data, tmp_path)
    out = tmp_path / "evo"
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C during the third trial
        evolve(cfg, 3, callbacks=[InterruptAt("trial_2")])
    df = pd.read_csv(out / "evolve.csv")
    assert list(df["state"]) == ["COMPLETE", "COMPLETE", "FAIL"] and df["note"][2] == "interrupted"
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
        assert (out / f"trials/trial_{row['trial']}/weights/best.pt").is_file()
        assert not (out / f"trials/trial_{row['trial']}/results.png").exists()  # trials plot nothing by default
        assert not list((out / f"trials/trial_{row['trial']}").glob("events.out.tfevents.*"))
    assert cv2.imread(str(out / "evolve.png")) is not None
    assert (out / "study.db").is_file()

    assert len(evolve(cfg, 3).trials) == 4  # already 3 finished trials: nothing more to train
    with pytest.raises(UserError, match="epochs"):  # continuing needs the same settings
        evolve(cfg.replace(epochs=2), 5)

    # hyp_evolve.yaml is the best finished trial's full hyp file and trains as --hyp
    best = max((t for t in trials if t.state == S.COMPLETE), key=lambda t: t.value)
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
    study = evolve(_cfg(tiny_data, tmp_path, epochs=2), 1, pruner=always)
    (trial,) = study.trials
    assert trial.state == S.PRUNED
    run = tmp_path / "evo" / "trials" / "trial_0"
    rows = pd.read_csv(run / "results.csv")
    assert list(rows["epoch"]) == [0]  # stopped after epoch 0 of 2
    assert trial.intermediate_values == pytest.approx(
        {0: 0.1 * rows["metrics/mAP_0.5"][0] + 0.9 * rows["metrics/mAP_0.5:0.95"][0]}, abs=1e-6)
    last = torch.load(run / "weights/last.pt", weights_only=True)
    assert last["epoch"] == 0 and last["optimizer"] is not None  # resumable checkpoint of the last epoch
    assert torch.load(run / "weights/best.pt", weights_only=True)["optimizer"] is None  # finish() ran
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
                       cwd=tmp_path, capture_output=True, text=True, timeout=120,
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

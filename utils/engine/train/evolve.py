"""Hyperparameter search behind `train_dual.py --evolve [N]`, on Optuna.

Each trial is one full training (the given epochs) with hyperparameters drawn from `SPACE` (upstream's evolve
limits); its objective is the run's final fitness (0.1 mAP50 + 0.9 mAP50-95). The study lives in an SQLite file
in the evolve folder, so running the same command again (same --project/--name, --exist-ok) with a larger N
continues it: finished trials are kept, a trial that was interrupted or failed is trained again with the same
hyperparameters. A median pruner stops trials whose per-epoch fitness trails the others' (`--evolve-prune off`).

Several processes may work on one study at once (one per GPU: the same command with --exist-ok and its own
--device): each claims its own trials. While a trial trains, its process writes a heartbeat into study.db every
HEARTBEAT_S seconds; a RUNNING trial without one for GRACE_S seconds belongs to a process that died, and only
then is it marked failed and queued again. Short sections (claiming a trial, tidying, writing outputs) hold a
file lock on study.lock so two processes never claim, queue or write the same thing.

Outputs beside study.db, rewritten after every trial: evolve.csv (one row per trial), hyp_evolve.yaml (the best
trial's full hyp file, usable with --hyp), evolve.png (fitness against each searched hyperparameter).
Each trial trains in trials/trial_<n> with plots and TensorBoard off unless `trial_plots` is set. Disk: only the
best finished trial keeps its weights (best.pt, stripped); a trial keeps last.pt only while it trains, and the
weights of finished, pruned, failed or interrupted trials are deleted (a gelan-t trial wrote ~35 MB before).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import yaml

from utils.data import load_data_config
from utils.data.verify import scan_dataset
from utils.engine.config import TrainConfig
from utils.engine.train.optim import choose_optimizer
from utils.engine.train.trainer import LOCAL_RANK, MAX_NONFINITE, WORLD_SIZE, Callback, Trainer, load_hyp
from utils.general import LOGGER, UserError, increment_path, write_atomic

STUDY_NAME = "evolve"
DEFAULT_TRIALS = 300  # upstream's --evolve default (generations)
HEARTBEAT_S = 20  # a process training a trial records a heartbeat this often
GRACE_S = 120  # a RUNNING trial with no heartbeat for this long belongs to a dead process


@dataclass(frozen=True)
class Range:
    """Search interval of one hyperparameter; log=True samples evenly in log space (spans many decades)."""

    low: float
    high: float
    log: bool = False


# Upstream YOLOv5/YOLOv9 evolve limits, written out here. The loss gains follow YOLOv9's scale (box 7.5,
# dfl 1.5): upstream's table still carries YOLOv5's box range (0.02-0.2) and no dfl, which would not fit these
# losses, so box/dfl use the ranges of the later anchor-free tuner (box 1-20, dfl 0.4-6).
SPACE: dict[str, Range] = {
    "lr0": Range(1e-5, 1e-1, log=True),  # initial learning rate
    "lrf": Range(0.01, 1.0),  # final learning rate as a fraction of lr0
    "momentum": Range(0.6, 0.98),  # SGD momentum / Adam beta1
    "weight_decay": Range(0.0, 0.001),
    "warmup_epochs": Range(0.0, 5.0),
    "warmup_momentum": Range(0.0, 0.95),
    "warmup_bias_lr": Range(0.0, 0.2),
    "box": Range(1.0, 20.0),  # loss gains
    "cls": Range(0.2, 4.0),
    "dfl": Range(0.4, 6.0),
    "hsv_h": Range(0.0, 0.1),  # augmentation (fractions, degrees, probabilities)
    "hsv_s": Range(0.0, 0.9),
    "hsv_v": Range(0.0, 0.9),
    "degrees": Range(0.0, 45.0),
    "translate": Range(0.0, 0.9),
    "scale": Range(0.0, 0.9),
    "shear": Range(0.0, 10.0),
    "perspective": Range(0.0, 0.001),
    "flipud": Range(0.0, 1.0),
    "fliplr": Range(0.0, 1.0),
    "mosaic": Range(0.0, 1.0),
    "mixup": Range(0.0, 1.0),
    "copy_paste": Range(0.0, 1.0),
}
# settings that must match when a study is continued (else fitness values are not comparable)
STUDY_SETTINGS = ("data", "cfg", "weights", "epochs", "imgsz", "batch_size", "optimizer", "single_cls", "schedule")
METRICS = {"metrics/precision": "mp", "metrics/recall": "mr", "metrics/mAP_0.5": "map50",
           "metrics/mAP_0.5:0.95": "map", "val/box_loss": "box", "val/cls_loss": "cls", "val/dfl_loss": "dfl"}


def _optuna():
    try:
        import optuna
    except ImportError:
        raise UserError("--evolve needs Optuna: pip install optuna") from None
    return optuna


def sample_hyp(trial, base: dict[str, float]) -> dict[str, float]:
    """The trial's full hyp dict: searched keys drawn (5 significant digits), every other key from `base`."""
    drawn = {k: float(f"{trial.suggest_float(k, r.low, r.high, log=r.log):.5g}") for k, r in SPACE.items()}
    return {**base, **drawn}


def baseline_params(base: dict[str, float]) -> dict[str, float]:
    """The base hyp file's values clipped into SPACE: trial 0 of a new study trains them (as upstream does)."""
    return {k: min(max(float(base.get(k, r.low)), r.low), r.high) for k, r in SPACE.items()}


def make_pruner(prune: bool, epochs: int):
    """Median pruner: once 5 trials finished, stop a trial whose epoch-fitness is below the median of the
    others at that epoch; never in the first third of training (warmup makes early epochs noisy)."""
    optuna = _optuna()
    if not prune:
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=epochs // 3)


def open_study(db: Path, seed: int, pruner=None, heartbeat: int = HEARTBEAT_S, grace: int = GRACE_S):
    """Create or load the study in `db` (SQLite); returns (study, storage). Heartbeats on: a RUNNING trial
    whose process stopped beating for `grace` seconds is failed by `requeue_unfinished`. The sampler is
    re-seeded for every trial (`claim_trial`), so `seed` seeds the first one."""
    optuna = _optuna()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeat arguments
            storage = optuna.storages.RDBStorage(
                f"sqlite:///{db.resolve()}", heartbeat_interval=heartbeat, grace_period=grace,
                engine_kwargs={"connect_args": {"timeout": 60}})  # another process's write: wait, not fail
    except Exception as e:  # not an SQLite file, or a study of an incompatible Optuna version
        raise UserError(f"{db}: cannot open the study ({str(e).splitlines()[0]})") from None
    study = optuna.create_study(study_name=STUDY_NAME, storage=storage, pruner=pruner, direction="maximize",
                                sampler=optuna.samplers.TPESampler(seed=seed), load_if_exists=True)
    return study, storage


@contextlib.contextmanager
def study_lock(folder: Path) -> Iterator[None]:
    """Exclusive lock on folder/study.lock between the processes of one study (POSIX flock; the kernel drops it
    when a process dies). Where flock does not exist (Windows), run one process per study."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(folder / "study.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class Heartbeat:
    """Records the trial's heartbeat in the study now and every `storage.heartbeat_interval` seconds until
    stopped (a thread: training keeps the main thread busy). Other processes read it to tell a live trial from
    the trial of a dead process."""

    def __init__(self, study, storage, trial):
        self.storage, self.stop_event = storage, threading.Event()
        self.trial_id = _trial_id(study, storage, trial)
        storage.record_heartbeat(self.trial_id)
        self.thread = threading.Thread(target=self._beat, name="evolve-heartbeat", daemon=True)
        self.thread.start()

    def _beat(self) -> None:
        while not self.stop_event.wait(self.storage.get_heartbeat_interval()):
            try:
                self.storage.record_heartbeat(self.trial_id)
            except Exception as e:  # a locked or unreachable db: try again next time
                LOGGER.warning(f"WARNING: evolve heartbeat not recorded ({str(e).splitlines()[0][:120]})")

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join()


def _trial_id(study, storage, trial) -> int:
    return storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(study.study_name),
                                                           trial.number)


def requeue_unfinished(study, storage, legacy: bool = False) -> list[int]:
    """Fail the RUNNING trials of dead processes (no heartbeat for the grace period; in a `legacy` study,
    written before heartbeats and by one process at a time, every RUNNING trial), then queue every FAIL trial
    again with the same hyperparameters, once each. Returns the numbers queued."""
    optuna = _optuna()
    state = optuna.trial.TrialState
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    trials = study.get_trials(deepcopy=False)
    if legacy:
        for t in trials:
            if t.state == state.RUNNING:
                storage.set_trial_state_values(_trial_id(study, storage, t), state.FAIL)
        trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get("retry_of") for t in trials}
    queued = []
    for t in trials:
        if t.state == state.FAIL and t.number not in retried and t.params:
            study.enqueue_trial(dict(t.params), user_attrs={"retry_of": t.number})
            queued.append(t.number)
    return queued


def claim_trial(study, storage, seed: int):
    """Ask the study for this process's next trial (a queued one first). Call under `study_lock`: the sampler is
    seeded with seed + the number of trials so far, so each trial of a study gets its own draw and one process
    alone draws the same sequence every time. The trial gets its first heartbeat at once, so even a process
    stopped right here leaves a trial the others can recognise as dead."""
    optuna = _optuna()
    study.sampler = optuna.samplers.TPESampler(seed=seed + len(study.get_trials(deepcopy=False)))
    with warnings.catch_warnings():  # Optuna's hint that heartbeats suit Study.optimize: `Heartbeat` beats here
        warnings.filterwarnings("ignore", message="Heartbeat of storage")
        trial = study.ask()
    try:
        storage.record_heartbeat(_trial_id(study, storage, trial))
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
    except BaseException:
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        raise
    return trial


def tidy_weights(study, out: Path) -> tuple[int, int | None]:
    """Delete the weights the study no longer needs: every finished, pruned or failed trial's, except the best
    finished trial's best.pt (running trials are left alone: their last.pt may be another process's). Returns
    (bytes the evolve folder now holds, the trial whose best.pt is kept or None)."""
    state = _optuna().trial.TrialState
    trials = study.get_trials(deepcopy=False)
    best = study.best_trial.number if any(t.state == state.COMPLETE for t in trials) else None
    for t in trials:
        wdir = out / "trials" / f"trial_{t.number}" / "weights"
        if t.state in (state.RUNNING, state.WAITING) or not wdir.is_dir():
            continue
        if t.number != best:
            shutil.rmtree(wdir, ignore_errors=True)
            continue
        for f in wdir.iterdir():
            if f.name != "best.pt":
                f.unlink(missing_ok=True)
    return _folder_bytes(out), best


def _folder_bytes(folder: Path) -> int:
    """Bytes of the files under `folder` (a file another process renames away meanwhile counts 0)."""
    total = 0
    for f in folder.rglob("*"):
        with contextlib.suppress(OSError):
            total += f.stat().st_size if f.is_file() else 0
    return total


def _report_disk(out: Path, used: int, best: int | None) -> None:
    kept = f"best.pt of trial {best}" if best is not None else "no weights"
    LOGGER.info(f"{out}: {used / 1e6:.1f} MB on disk (weights kept: {kept}; other trials keep their results only)")


class _PruneReporter:
    """Trainer callback: reports each validated epoch's fitness to the trial; when the pruner says so,
    asks the trainer to stop after this epoch (checkpoints written, final validation still run)."""

    def __init__(self, trial, enabled: bool):
        self.trial, self.enabled, self.pruned_at = trial, enabled, None

    def on_epoch_end(self, trainer: Trainer, epoch: int, row: dict) -> None:
        if not self.enabled or (trainer.cfg.noval and epoch + 1 < trainer.cfg.epochs):
            return
        self.trial.report(float(trainer.last_result.fitness), epoch)
        if epoch + 1 < trainer.cfg.epochs and self.trial.should_prune():
            self.pruned_at = epoch
            trainer.stop_after_epoch = True
            LOGGER.info(f"Trial {self.trial.number} pruned after epoch {epoch}: fitness "
                        f"{trainer.last_result.fitness:.4f} trails the other trials")


def _settings(cfg: TrainConfig) -> dict[str, Any]:
    return {k: getattr(cfg, k) for k in STUDY_SETTINGS}


def _check_settings(study, cfg: TrainConfig, base: dict[str, float], db: Path) -> None:
    """A continued study must train the same way; a new one records how it trains."""
    now = {**_settings(cfg), "base_hyp": base}
    saved = study.user_attrs.get("settings")
    if saved is None:
        study.set_user_attr("settings", now)
        return
    diff = [k for k in now if saved.get(k) != now[k]]
    if diff:
        k = diff[0]
        what = "other --hyp values" if k == "base_hyp" else f"{k}={saved.get(k)} (now {now[k]})"
        raise UserError(f"{db}: this study was run with {what}; use the same settings to continue it, "
                        f"or a new --name for a new study")


def evolve(cfg: TrainConfig, n: int = DEFAULT_TRIALS, prune: bool = True, trial_plots: bool = False,
           pruner=None, callbacks: Sequence[Callback] = ()):
    """Run (or continue) the study until it has `n` finished trials; returns the optuna Study.

    `pruner` replaces the default median pruner; `callbacks` are attached to every trial's Trainer."""
    optuna = _optuna()
    if not isinstance(n, int) or n < 1:
        raise UserError(f"--evolve {n}: the number of trials must be a positive integer")
    if LOCAL_RANK != -1 or WORLD_SIZE > 1:
        raise UserError("--evolve runs one training at a time: start it without torchrun")
    if cfg.resume:
        raise UserError("--resume does not apply to --evolve: continue a study with the same --project/--name "
                        "plus --exist-ok (and a larger N)")
    if cfg.project == TrainConfig.project:
        cfg = cfg.replace(project="runs/evolve")
    data = load_data_config(cfg.data)
    cfg = cfg.with_defaults(data.train_defaults)
    base = load_hyp(cfg.hyp)
    if cfg.optimizer == "auto":  # decided once, so that every trial trains its sampled lr0/momentum as given
        choice = choose_optimizer("auto", _training_images(data, cfg), cfg.batch_size,
                                  int(base.get("nbs", 64)), cfg.epochs, base, finetune=bool(cfg.weights))
        LOGGER.info(f"--optimizer auto: {choice.name} for every trial ({choice.reason}); its lr0, momentum and "
                    f"warmup_bias_lr are the search's starting point")
        cfg, base = cfg.replace(optimizer=choice.name), {**base, **choice.hyp_updates()}
    if cfg.noval and prune:
        LOGGER.warning("WARNING: --noval validates only the last epoch, so trials cannot be pruned; pruning is off")
        prune = False
    out = increment_path(Path(cfg.project) / cfg.name, exist_ok=cfg.exist_ok)
    try:
        (out / "trials").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{out}: cannot create the evolve folder ({e.strerror or e})") from None
    db = out / "study.db"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    state = optuna.trial.TrialState
    with study_lock(out):  # another process may be opening, checking or starting the same study
        study, storage = open_study(db, cfg.seed, pruner if pruner is not None else make_pruner(prune, cfg.epochs))
        _check_settings(study, cfg, base, db)
        if not study.trials:
            study.enqueue_trial(baseline_params(base), user_attrs={"baseline": True})
        else:
            so_far = len(study.trials)
            again = requeue_unfinished(study, storage, legacy=not study.user_attrs.get("heartbeats"))
            LOGGER.info(f"Continuing {db}: {so_far} trials so far"
                        + (f"; training unfinished trial(s) {', '.join(map(str, again))} again" if again else ""))
        study.set_user_attr("heartbeats", True)  # from now on a RUNNING trial may belong to a live process
    LOGGER.info(f"Evolving hyperparameters: {n} trials of {cfg.epochs} epochs into {out} "
                f"(optuna-dashboard sqlite:///{db})")

    def counts() -> tuple[int, list[int]]:
        trials = study.get_trials(deepcopy=False)
        return (sum(t.state in (state.COMPLETE, state.PRUNED) for t in trials),
                [t.number for t in trials if t.state == state.RUNNING])

    try:
        while True:
            with study_lock(out):
                requeue_unfinished(study, storage)
                done, running = counts()
                if done >= n or done + len(running) >= n:
                    break
                trial = claim_trial(study, storage, cfg.seed)
            _run_trial(study, storage, trial, cfg, base, out, prune, trial_plots, callbacks)
            with study_lock(out):
                write_outputs(study, out)
                _report_disk(out, *tidy_weights(study, out))
    except KeyboardInterrupt:
        again = (f"--name {out.name} " if out.name != cfg.name else "") + "--exist-ok"  # exp2 when exp was taken
        LOGGER.info(f"\nEvolution interrupted: {counts()[0]} trials finished, study kept in {db}. Continue with "
                    f"the same command plus {again}")
        raise
    finally:  # also after a failed trial: the files show every trial told so far, no stray weights are left
        with study_lock(out):
            write_outputs(study, out)
            tidy_weights(study, out)
    done, running = counts()
    if done < n and running:
        LOGGER.info(f"{done} of {n} trials finished; trial(s) {', '.join(map(str, running))} are being trained by "
                    f"other processes of this study (a trial whose process died counts as failed after {GRACE_S} s "
                    f"without a heartbeat: then run the command again to train it)")
    if done and any(t.state == state.COMPLETE for t in study.trials):
        best = study.best_trial
        LOGGER.info(f"Evolution finished: {done} trials, best trial {best.number} fitness {best.value:.4f}\n"
                    f"Results saved to {out}\nUsage: python train_dual.py --hyp {out / 'hyp_evolve.yaml'}")
    return study


def _training_images(data, cfg: TrainConfig) -> int:
    """The images every trial trains on: verified (corrupt ones dropped, as training drops them) and with at
    least --min-items labels; the scan is cached, so the first trial reads it back."""
    scan = scan_dataset(data.train, data.nc, prefix="train: ")
    return sum(len(lb) >= cfg.min_items for lb in scan.labels)


def _run_trial(study, storage, trial, cfg: TrainConfig, base: dict[str, float], out: Path, prune: bool,
               trial_plots: bool, callbacks: Sequence[Callback]) -> None:
    """Train one claimed trial (heartbeats on) and tell the study how it ended. Ctrl-C marks it FAIL (it is
    trained again on continue) and propagates; a run whose loss stays non-finite counts as fitness 0 (a
    hopeless region)."""
    optuna = _optuna()
    state = optuna.trial.TrialState
    heartbeat = Heartbeat(study, storage, trial)
    try:
        hyp = sample_hyp(trial, base)
        seed = cfg.seed + trial.number
        trial.set_user_attr("seed", seed)
        trial.set_user_attr("hyp", hyp)
        run_dir = out / "trials" / f"trial_{trial.number}"
        run_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(run_dir / "hyp.yaml", yaml.safe_dump(hyp, sort_keys=False))
        tcfg = cfg.replace(project=str(out / "trials"), name=run_dir.name, exist_ok=True, save_dir="", seed=seed,
                           hyp=str(run_dir / "hyp.yaml"), noplots=cfg.noplots or not trial_plots,
                           tensorboard=cfg.tensorboard and trial_plots)
        LOGGER.info(f"\nTrial {trial.number} (seed {seed}): " + ", ".join(f"{k}={hyp[k]:.5g}" for k in SPACE))
        reporter = _PruneReporter(trial, prune)
        trainer = Trainer(tcfg, [reporter, *callbacks])
        trainer.resume_hint = False  # a trial's last.pt is deleted: the evolve command itself continues
        outcome = _train(trainer, trial)
    except BaseException:
        heartbeat.stop()
        _tell(study, trial, state=state.FAIL)
        raise
    heartbeat.stop()
    if outcome is None:  # diverged: scored 0
        _tell(study, trial, 0.0)
        LOGGER.info(f"Trial {trial.number}: the loss diverged; scored fitness 0")
        return
    fitness = float(outcome.fitness) if outcome is not False else 0.0
    if outcome is not False:
        trial.set_user_attr("metrics", {k: float(getattr(outcome, a)) for k, a in METRICS.items()})
        trial.set_user_attr("fitness", fitness)
    if reporter.pruned_at is not None:
        trial.set_user_attr("note", f"pruned after epoch {reporter.pruned_at}")
        _tell(study, trial, state=state.PRUNED)
    else:
        _tell(study, trial, fitness)
    LOGGER.info(f"Trial {trial.number} finished: fitness {fitness:.4f}"
                + (" (pruned)" if reporter.pruned_at is not None else ""))


def _train(trainer: Trainer, trial):
    """trainer.run() for a trial: its ValResult (False when it returned none), None when the loss diverged;
    Ctrl-C is re-raised as KeyboardInterrupt, anything else propagates. Epochs trained are recorded either way."""
    try:
        result = trainer.run()
    except (KeyboardInterrupt, SystemExit) as e:
        _record_epochs(trainer, trial)
        if isinstance(e, SystemExit) and e.code != 130:
            raise
        trial.set_user_attr("note", "interrupted")
        raise KeyboardInterrupt from None
    except UserError:
        _record_epochs(trainer, trial)
        if getattr(trainer, "nonfinite", 0) < MAX_NONFINITE:
            raise
        trial.set_user_attr("note", "loss not finite")
        return None
    _record_epochs(trainer, trial)
    return result if result is not None else False


def _record_epochs(trainer: Trainer, trial) -> None:
    csv_path = getattr(trainer, "csv_path", None)
    rows = len(csv_path.read_text().splitlines()) - 1 if csv_path is not None and csv_path.exists() else 0
    trial.set_user_attr("epochs_trained", max(rows, 0))


def _tell(study, trial, value: float | None = None, state=None) -> None:
    """study.tell, except that a trial another process already failed (its heartbeats went missing for the
    grace period, e.g. a stalled disk) is reported instead of crashing this process."""
    optuna = _optuna()
    try:
        study.tell(trial, value, state=state)
    except (optuna.exceptions.UpdateFinishedTrialError, ValueError) as e:
        LOGGER.warning(f"WARNING: trial {trial.number} was already closed by another process of this study "
                       f"({str(e).splitlines()[0][:120]}); its result is not counted, its hyperparameters are "
                       f"trained again")


def trials_table(study):
    """One row per trial (waiting ones left out): number, state, fitness, final metrics, seed, hyps."""
    import pandas as pd

    rows = []
    for t in study.get_trials(deepcopy=False):
        if t.state.name == "WAITING":
            continue
        a = t.user_attrs
        metrics = a.get("metrics", {})
        row = {"trial": t.number, "state": t.state.name,
               "fitness": t.value if t.value is not None else a.get("fitness", float("nan")),
               **{k: metrics.get(k, float("nan")) for k in METRICS},
               "seed": a.get("seed"), "epochs": a.get("epochs_trained", 0),
               "retry_of": a.get("retry_of"), "worker": a.get("worker", ""),
               "note": a.get("note", "baseline" if a.get("baseline") else "")}
        row.update(a.get("hyp", {}))
        rows.append(row)
    df = pd.DataFrame(rows)
    if len(df):
        df["retry_of"] = pd.to_numeric(df["retry_of"]).astype("Int64")  # blank when not a retry
    return df


def write_outputs(study, out: Path) -> None:
    """evolve.csv, hyp_evolve.yaml (best COMPLETE trial) and evolve.png in the evolve folder."""
    from utils.plots import plot_evolve

    df = trials_table(study)
    if df.empty:
        return
    write_atomic(out / "evolve.csv", df.to_csv(index=False))
    done = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    if done:
        best = study.best_trial
        header = (f"# Best of {len(done)} finished trials: trial {best.number}, fitness {best.value:.5g} "
                  f"(0.1 mAP50 + 0.9 mAP50-95), seed {best.user_attrs.get('seed')}\n"
                  f"# Written by train_dual.py --evolve from {out / 'study.db'}; use with --hyp\n")
        write_atomic(out / "hyp_evolve.yaml", header + yaml.safe_dump(best.user_attrs["hyp"], sort_keys=False))
    plot_evolve(out / "evolve.csv", list(SPACE))


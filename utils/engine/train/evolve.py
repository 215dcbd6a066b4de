"""Hyperparameter search behind `train_dual.py --evolve [N]`, on Optuna.

Each trial is one full training (the given epochs) with hyperparameters drawn from `SPACE` (upstream's evolve
limits); its objective is the run's final fitness (0.1 mAP50 + 0.9 mAP50-95). The study lives in an SQLite file
in the evolve folder, so running the same command again (same --project/--name, --exist-ok) with a larger N
continues it: finished trials are kept, a trial that was interrupted or failed is trained again with the same
hyperparameters. A median pruner stops trials whose per-epoch fitness trails the others' (`--evolve-prune off`).

Outputs beside study.db, rewritten after every trial: evolve.csv (one row per trial), hyp_evolve.yaml (the best
trial's full hyp file, usable with --hyp), evolve.png (fitness against each searched hyperparameter).
Each trial trains in trials/trial_<n> with plots and TensorBoard off unless `trial_plots` is set.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import yaml

from utils.data import load_data_config
from utils.data.verify import collect_image_files
from utils.engine.config import TrainConfig
from utils.engine.train.optim import choose_optimizer
from utils.engine.train.trainer import LOCAL_RANK, MAX_NONFINITE, WORLD_SIZE, Callback, Trainer, load_hyp
from utils.general import LOGGER, UserError, increment_path

STUDY_NAME = "evolve"
DEFAULT_TRIALS = 300  # upstream's --evolve default (generations)


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


def open_study(db: Path, seed: int, pruner=None):
    """Create or load the study in `db` (SQLite); returns (study, storage). The sampler's seed moves on with
    the number of trials so that a continued study does not draw the same random points again."""
    optuna = _optuna()
    try:
        storage = optuna.storages.RDBStorage(f"sqlite:///{db.resolve()}")
    except Exception as e:  # not an SQLite file, or a study of an incompatible Optuna version
        raise UserError(f"{db}: cannot open the study ({str(e).splitlines()[0]})") from None
    try:
        n_before = len(optuna.load_study(study_name=STUDY_NAME, storage=storage).trials)
    except KeyError:
        n_before = 0
    sampler = optuna.samplers.TPESampler(seed=seed + n_before)
    study = optuna.create_study(study_name=STUDY_NAME, storage=storage, sampler=sampler, pruner=pruner,
                                direction="maximize", load_if_exists=True)
    return study, storage


def requeue_unfinished(study, storage) -> list[int]:
    """Trials left RUNNING (the process died) or FAIL (interrupted, crashed) are marked FAIL and queued again
    with the same hyperparameters, once each. Returns the numbers queued."""
    optuna = _optuna()
    state = optuna.trial.TrialState
    study_id = storage.get_study_id_from_name(study.study_name)
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get("retry_of") for t in trials}
    queued = []
    for t in trials:
        if t.state == state.RUNNING:  # one process per study: a RUNNING trial here belongs to a dead run
            storage.set_trial_state_values(storage.get_trial_id_from_study_id_trial_number(study_id, t.number),
                                           state.FAIL)
        if t.state in (state.RUNNING, state.FAIL) and t.number not in retried and t.params:
            study.enqueue_trial(dict(t.params), user_attrs={"retry_of": t.number})
            queued.append(t.number)
    return queued


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
        choice = choose_optimizer("auto", len(collect_image_files(data.train)[0]), cfg.batch_size,
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
    study, storage = open_study(db, cfg.seed, pruner if pruner is not None else make_pruner(prune, cfg.epochs))
    _check_settings(study, cfg, base, db)
    state = optuna.trial.TrialState
    if not study.trials:
        study.enqueue_trial(baseline_params(base), user_attrs={"baseline": True})
    else:
        so_far = len(study.trials)
        again = requeue_unfinished(study, storage)
        LOGGER.info(f"Continuing {db}: {so_far} trials so far"
                    + (f"; training unfinished trial(s) {', '.join(map(str, again))} again" if again else ""))
    LOGGER.info(f"Evolving hyperparameters: {n} trials of {cfg.epochs} epochs into {out} "
                f"(optuna-dashboard sqlite:///{db})")

    def finished() -> int:
        return len(study.get_trials(deepcopy=False, states=(state.COMPLETE, state.PRUNED)))

    try:
        while finished() < n:
            _run_trial(study, cfg, base, out, prune, trial_plots, callbacks)
            write_outputs(study, out)
    except KeyboardInterrupt:
        LOGGER.info(f"\nEvolution interrupted: {finished()} trials finished, study kept in {db}. Continue with "
                    f"the same command plus --project {cfg.project} --name {out.name} --exist-ok")
        raise
    finally:  # also after a failed trial: the files show every trial told so far
        write_outputs(study, out)
    if finished() and any(t.state == state.COMPLETE for t in study.trials):
        best = study.best_trial
        LOGGER.info(f"Evolution finished: {finished()} trials, best trial {best.number} fitness {best.value:.4f}\n"
                    f"Results saved to {out}\nUsage: python train_dual.py --hyp {out / 'hyp_evolve.yaml'}")
    return study


def _run_trial(study, cfg: TrainConfig, base: dict[str, float], out: Path, prune: bool, trial_plots: bool,
               callbacks: Sequence[Callback]) -> None:
    """Train one trial and tell the study how it ended. Ctrl-C marks it FAIL (it is trained again on
    continue) and propagates; a run whose loss stays non-finite counts as fitness 0 (a hopeless region)."""
    optuna = _optuna()
    state = optuna.trial.TrialState
    trial = study.ask()
    hyp = sample_hyp(trial, base)
    seed = cfg.seed + trial.number
    trial.set_user_attr("seed", seed)
    trial.set_user_attr("hyp", hyp)
    run_dir = out / "trials" / f"trial_{trial.number}"
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "hyp.yaml").write_text(yaml.safe_dump(hyp, sort_keys=False))
    tcfg = cfg.replace(project=str(out / "trials"), name=run_dir.name, exist_ok=True, save_dir="", seed=seed,
                       hyp=str(run_dir / "hyp.yaml"), noplots=cfg.noplots or not trial_plots,
                       tensorboard=cfg.tensorboard and trial_plots)
    LOGGER.info(f"\nTrial {trial.number} (seed {seed}): " + ", ".join(f"{k}={hyp[k]:.5g}" for k in SPACE))
    reporter = _PruneReporter(trial, prune)
    trainer = Trainer(tcfg, [reporter, *callbacks])
    try:
        result = trainer.run()
    except (KeyboardInterrupt, SystemExit) as e:
        if isinstance(e, SystemExit) and e.code != 130:
            study.tell(trial, state=state.FAIL)
            raise
        trial.set_user_attr("note", "interrupted")
        study.tell(trial, state=state.FAIL)
        raise KeyboardInterrupt from None
    except UserError:
        if getattr(trainer, "nonfinite", 0) < MAX_NONFINITE:
            study.tell(trial, state=state.FAIL)
            raise
        trial.set_user_attr("note", "loss not finite")
        study.tell(trial, 0.0)
        LOGGER.info(f"Trial {trial.number}: the loss diverged; scored fitness 0")
        return
    except BaseException:
        study.tell(trial, state=state.FAIL)
        raise
    if result is not None:
        trial.set_user_attr("metrics", {k: float(getattr(result, a)) for k, a in METRICS.items()})
        trial.set_user_attr("fitness", float(result.fitness))
    trial.set_user_attr("epochs_trained", len(trainer.csv_path.read_text().splitlines()) - 1
                        if trainer.csv_path.exists() else 0)
    fitness = float(result.fitness) if result is not None else 0.0
    if reporter.pruned_at is not None:
        trial.set_user_attr("note", f"pruned after epoch {reporter.pruned_at}")
        study.tell(trial, state=state.PRUNED)
    else:
        study.tell(trial, fitness)
    LOGGER.info(f"Trial {trial.number} finished: fitness {fitness:.4f}"
                + (" (pruned)" if reporter.pruned_at is not None else ""))


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
               "retry_of": a.get("retry_of"), "note": a.get("note", "baseline" if a.get("baseline") else "")}
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
    df.to_csv(out / "evolve.csv", index=False)
    done = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    if done:
        best = study.best_trial
        header = (f"# Best of {len(done)} finished trials: trial {best.number}, fitness {best.value:.5g} "
                  f"(0.1 mAP50 + 0.9 mAP50-95), seed {best.user_attrs.get('seed')}\n"
                  f"# Written by train_dual.py --evolve from {out / 'study.db'}; use with --hyp\n")
        (out / "hyp_evolve.yaml").write_text(header + yaml.safe_dump(best.user_attrs["hyp"], sort_keys=False))
    plot_evolve(out / "evolve.csv", list(SPACE))


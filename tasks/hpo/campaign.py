"""A tune run as a whole: one study, or several variants; then the retraining and the crown.

- one study: ``--restart`` deletes it first; ``--reuse-best`` skips the search and trains
  the best parameters found again as the one-trial study ``<name>-best``;
- variants: each a study of its own, run in turn on shared GPU slots, compared in one
  record (``variants.json``), the winner's registration crowned ``champion``;
- ``study.retrain``: after the search, the best parameters trained again as
  ``<name>-final`` (on train, or on train and val) and registered as the champion.

The campaign builds its loops from what it is given: how to launch stages for a study
(``make_stages``), the logger and the outcome hooks. ``flows/tune.py`` gives Prefect's, and
calls ``dry_run`` first: the study's export, compiler and board on an untrained model.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import optuna

from tasks.board import BoardBusyError
from tasks.config import dump_config
from tasks.config.variants import expand
from tasks.devices import DeviceUnreachableError
from tasks.hpo import reports
from tasks.hpo.confirm import confirm
from tasks.hpo.launch import Stages
from tasks.hpo.loop import BoardPaused, Hooks, Logger, StudyLoop, run_studies, to_json
from tasks.hpo.recovery import (
    NothingToReuseError,
    check_fingerprint,
    disk_full_error,
    enqueue_best,
    forget_study,
    reuse_best_config,
)
from tasks.hpo.study import open_study
from tasks.hpo.variants import compare, write_comparison
from tasks.tracking import CHAMPION, Tracker
from tasks.workloads.base import NOTHING_TRAINED, DryRun, StudyTarget
from tasks.workloads.registry import dry_run as dry_run_configs
from tasks.workloads.registry import objective_for, workload_for

#: Builds the stages of a study's trials (in this process, or on work pools).
StagesFactory = Callable[[StudyTarget, optuna.Study], Stages]


def dry_run(cfg: StudyTarget, logger: Logger, done: list[DryRun] | None = None) -> list[DryRun]:
    """Before the first training: an untrained model through the study's export, compiler
    and board once (``Workload.dry_run``), so that a setting that would fail every trial
    after its training stops the study before any GPU time, in one line naming it.

    Only where the stages run in this process: on work pools the board is reached from the
    edge pool and the compiler runs on the compile pool, neither of which the parent may
    reach or have; there ``edgetune validate --deep`` on a host of the edge pool runs it.
    A board that is down or busy pauses the study as it would after its trials (exit 1).
    ``done``: the dry run the caller ran already (``run_dry_run``; the ``edgetune`` command
    runs it while its own Prefect server starts), logged here, not run again.
    """
    if done is None:
        why_not = _not_run_here(cfg)
        if why_not is not None:
            logger.info(why_not)
            return []
        done = _run(cfg)
    for each in done:
        logger.info("dry run before the first training: %s", each.summary())
    return done


def run_dry_run(cfg: StudyTarget) -> list[DryRun] | None:
    """The dry run, where the study runs one (``dry_run``); None where it does not (the
    flow's log says why)."""
    return None if _not_run_here(cfg) is not None else _run(cfg)


def _not_run_here(cfg: StudyTarget) -> str | None:
    """Why the study runs no dry run in this process, or None when it does."""
    if not cfg.study.dry_run:
        return (
            "dry run skipped (study.dry_run: false): the first trial's stages are the first "
            "to reach the compiler and the board"
        )
    if cfg.orchestration.mode == "deployments":
        return (
            "dry run not run here: orchestration.mode 'deployments' compiles on the compile "
            "pool and reaches the board from the edge pool; run 'edgetune validate --deep "
            "CONFIG' on a host of the edge pool before the study"
        )
    return None


def _run(cfg: StudyTarget) -> list[DryRun]:
    try:
        return dry_run_configs(cfg)
    except (DeviceUnreachableError, BoardBusyError) as exc:
        raise BoardPaused(
            f"device {cfg.device.name}: {exc}; the study did not start ({NOTHING_TRAINED}): "
            f"check the board with 'edgetune device check CONFIG', then run the study again"
        ) from exc


@dataclass
class Campaign:
    """Runs tune requests with the given stage launcher, logger and hooks."""

    make_stages: StagesFactory
    logger: Logger
    hooks: Hooks = reports  # a module with the hook functions

    def run(self, cfg: StudyTarget, *, restart: bool, reuse_best: bool) -> dict[str, Any]:
        """Run (or continue) the config's study, or its variants; a full disk, met opening
        a study as while it runs, is ``DiskFull`` (where, and the fix)."""
        try:
            if cfg.variants:
                return self.run_variants(cfg, restart=restart, reuse_best=reuse_best)
            return self.tune_one(cfg, restart=restart, reuse_best=reuse_best)
        except Exception as exc:
            full = disk_full_error(exc, cfg)
            if full is None or full is exc:
                raise
            raise full from exc

    def loop(self, cfg: StudyTarget, study: optuna.Study, group: str | None = None) -> StudyLoop:
        return StudyLoop(
            cfg,
            study,
            stages=self.make_stages(cfg, study),
            logger=self.logger,
            hooks=self.hooks,
            group_run_id=group,
        )

    def tune_one(self, cfg: StudyTarget, *, restart: bool, reuse_best: bool) -> dict[str, Any]:
        best = None
        if reuse_best:
            cfg, best = reuse_best_config(cfg)
        if restart and forget_study(cfg):
            self.logger.warning("study %s deleted: starting afresh", cfg.study.name)
        study = open_study(cfg.storage_url, cfg.study, cfg.seed, objective=objective_for(cfg))
        check_fingerprint(study, cfg)
        if best is not None:
            enqueue_best(study, best)
        cfg.run_path.mkdir(parents=True, exist_ok=True)
        saved = f"{cfg.study.name}.yaml" if reuse_best else "config.yaml"
        (cfg.run_path / saved).write_text(dump_config(cfg))
        started = time.time()
        result = self.loop(cfg, study).run()
        chosen = None
        if cfg.study.confirm_seeds and not reuse_best and result.get("best"):
            result["confirmation"] = self.confirm_champion(cfg, study)
            if result["confirmation"] is not None:
                chosen = int(result["confirmation"]["winner"])
                result["champion"] = result["confirmation"]["champion"]
        if cfg.study.retrain != "none" and not reuse_best and result.get("best"):
            result["retrained"] = self.retrain_best(cfg, chosen)
        result["seconds"] = time.time() - started
        return result

    def run_variants(self, cfg: StudyTarget, *, restart: bool, reuse_best: bool) -> dict[str, Any]:
        """Run each variant as its own study on shared GPU slots, compare them in one record,
        and give the best variant's champion the ``champion`` alias.

        ``reuse_best`` retrains the winning variant's best parameters
        (``<study>-<variant>-best``); ``study.retrain`` retrains them after the run
        (``<study>-<variant>-final``).
        """
        started = time.time()
        configs = expand(cfg)
        if reuse_best:
            return self._reuse_winner(cfg, configs)
        studies = [self._open_variant(variant, restart) for _, variant in configs]
        cfg.run_path.mkdir(parents=True, exist_ok=True)
        (cfg.run_path / "config.yaml").write_text(dump_config(cfg))
        tracker = Tracker(cfg.tracking_uri)
        experiment = tracker.experiment_id(
            cfg.experiment_name, artifact_location=workload_for(cfg).artifact_location()
        )
        group = tracker.start_run(
            experiment,
            f"variants-{cfg.study.name}",
            tags={"edgetune.study": cfg.study.name, "edgetune.kind": "variants"},
        )
        loops = []
        for (spec, variant), study in zip(configs, studies, strict=True):
            study.set_user_attr(
                "variant",
                {"of": cfg.study.name, "name": spec.name, "search": spec.search, "set": spec.set},
            )
            records = reports.records_root(variant)
            records.mkdir(parents=True, exist_ok=True)
            (records / "config.yaml").write_text(dump_config(variant))
            loops.append(self.loop(variant, study, group))
        self.logger.info(
            "variants of %s: %s",
            cfg.study.name,
            ", ".join(f"{s.name} ({'search' if s.search else 'once'})" for s, _ in configs),
        )
        status = "FAILED"
        try:
            outcomes = run_studies(loops, cfg.study.parallel)
            record = compare(cfg, configs)
            record["champion"] = self._crown(cfg, record, tracker)
            status = "FINISHED"
        finally:
            if status != "FINISHED":
                tracker.end_run(group, "KILLED")
        for row, outcome in zip(record["variants"], outcomes, strict=True):
            row["stopped_by"] = outcome.get("stopped_by")
        write_comparison(cfg, record)
        _log_comparison(tracker, group, record)
        winner = next((v for spec, v in configs if spec.name == record["winner"]), None)
        if cfg.study.retrain != "none" and winner is not None:
            record["retrained"] = self.retrain_best(winner)
        record["seconds"] = time.time() - started
        return record

    def _open_variant(self, variant: StudyTarget, restart: bool) -> optuna.Study:
        if restart and forget_study(variant):
            self.logger.warning("study %s deleted: starting afresh", variant.study.name)
        objective = objective_for(variant)
        study = open_study(variant.storage_url, variant.study, variant.seed, objective=objective)
        check_fingerprint(study, variant)  # every variant, before any trains
        return study

    def _reuse_winner(self, cfg: StudyTarget, configs: list[tuple[Any, Any]]) -> dict[str, Any]:
        winner = compare(cfg, configs)["winner"]
        if winner is None:
            raise NothingToReuseError(
                f"no variant of {cfg.study.name!r} has a COMPLETE trial to reuse; run the "
                f"variants first (edgetune tune CONFIG)"
            )
        chosen = next(v for spec, v in configs if spec.name == winner)
        self.logger.info("reusing the best trial of variant %s, the best of the variants", winner)
        return {**self.tune_one(chosen, restart=False, reuse_best=True), "variant": winner}

    def _crown(
        self, cfg: StudyTarget, record: dict[str, Any], tracker: Tracker
    ) -> dict[str, Any] | None:
        """Point ``champion`` at the winning variant's registration (classifiers); for a
        detector, its champion is the best of all its runs, variants included."""
        winner = next((row for row in record["variants"] if row["winner"]), None)
        crowned = workload_for(cfg).crown(tracker, winner)
        if crowned is None:
            return None
        best = (winner or {}).get("best") or {}
        won = winner is not None and crowned.run_id == best.get("mlflow_run_id")
        if won and winner is not None:
            self.logger.info(
                "champion: variant %s, trial %s, registered as %s version %s (@%s)",
                winner["variant"],
                best.get("trial"),
                crowned.model,
                crowned.version,
                CHAMPION,
            )
        return {
            "model": crowned.model,
            "version": crowned.version,
            "alias": CHAMPION,
            **crowned.extra,
            "trial": best.get("trial") if won else None,
            "variant": winner["variant"] if won and winner else None,
        }

    def confirm_champion(self, cfg: StudyTarget, study: optuna.Study) -> dict[str, Any] | None:
        """Train the top trials again with other seeds (``study.confirm_seeds``); the best
        mean becomes the champion, registered with its mean and spread."""
        self.logger.info(
            "seed check: the %d best trials of %s, each trained again with %d other seed(s)",
            cfg.study.confirm_top_k,
            cfg.study.name,
            cfg.study.confirm_seeds,
        )
        record = confirm(
            cfg, study, self.loop, lambda loops: run_studies(loops, cfg.study.parallel)
        )
        if record is None:
            return None
        winner, row = study.trials[record["winner"]], record["rows"][0]
        tracker = Tracker(cfg.tracking_uri)
        registered = workload_for(cfg).register_best(
            tracker, winner.user_attrs["mlflow_run_id"], winner.number, row["mean"], CHAMPION
        )
        champion = None
        if registered is not None:
            # The study's own rule with a seed check is the best mean: its winner takes the
            # alias even where one seed of an earlier champion scored better.
            tracker.client.set_registered_model_alias(
                registered.model, CHAMPION, registered.version
            )
            metric = record["objective"]
            for key, value in {f"{metric}_mean": row["mean"], f"{metric}_std": row["std"]}.items():
                tracker.client.set_model_version_tag(
                    registered.model, registered.version, key, value
                )
            champion = {
                "model": registered.model,
                "version": registered.version,
                "alias": CHAMPION,
                "trial": winner.number,
            }
            study.set_user_attr("champion", champion)
        record["champion"] = champion
        study.set_user_attr("confirmation", record)
        tracker.log_text(
            study.user_attrs["mlflow_parent_run_id"], to_json(record), "confirmation.json"
        )
        self.logger.info(
            "seed check: trial %d has the best mean %s %.5f ± %.5f over %d runs%s",
            winner.number,
            record["objective"],
            row["mean"],
            row["std"],
            row["runs"],
            ""
            if "separated" not in record
            else (
                "; separated from the runner-up"
                if record["separated"]
                else "; NOT separated from the runner-up by more than the noise"
            ),
        )
        return record

    def retrain_best(self, cfg: StudyTarget, chosen: int | None = None) -> dict[str, Any]:
        """After the search: train the best parameters (or trial ``chosen``'s, the seed
        check's winner) again as ``<study>-final`` (on train, or on train and val), compile,
        evaluate on the board and register.

        Running the study again after the search ended resumes (or reuses) this one trial.
        """
        final_cfg, best = reuse_best_config(cfg, retrain=cfg.study.retrain, chosen=chosen)
        objective = objective_for(final_cfg)  # measured on test: its own names (test_*)
        final = open_study(
            final_cfg.storage_url, final_cfg.study, final_cfg.seed, objective=objective
        )
        enqueue_best(final, best)
        self.logger.info(
            "retraining trial %d's parameters as study %s (%s, seed %d)",
            best.number,
            final_cfg.study.name,
            cfg.study.retrain,
            final_cfg.seed,
        )
        outcome = self.loop(final_cfg, final).run()
        return {
            "study": final_cfg.study.name,
            "from_trial": best.number,
            "data": cfg.study.retrain,
            "seed": final_cfg.seed,
            "objective": objective.metric,
            "objective_label": objective.label,
            "best": outcome.get("best"),
            "counts": outcome["counts"],
            "champion": outcome.get("champion"),
        }


def _log_comparison(tracker: Tracker, run_id: str, record: dict[str, Any]) -> None:
    metric = record["objective"]
    for row in record["variants"]:
        values = {
            f"{metric}.{row['variant']}": (row.get("best") or {}).get(metric),
            f"trials_complete.{row['variant']}": (row.get("counts") or {}).get("COMPLETE"),
        }
        tracker.log_metrics(run_id, {k: v for k, v in values.items() if v is not None})
    tags = {"edgetune.winner": record["winner"]} if record["winner"] else {}
    tracker.set_tags(run_id, tags)
    tracker.log_text(run_id, to_json(record), "variants.json")
    tracker.end_run(run_id, "FINISHED")

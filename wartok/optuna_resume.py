"""hydra-optuna-sweeper 1.3.0 with resume and failures fixed: `hydra/sweeper=resumable_optuna`.

The plugin's trial loop is replaced; its parameter handling (`_configure_trials`, the
override-to-distribution rules) is reused. What differs (ENVIRONMENT.md lists the plugin's
behaviour on this machine):
- `n_trials` is the study's total: a rerun of the same command (same study and storage)
  runs only the trials still missing; failed trials count, abandoned ones do not;
- job numbers continue after the highest folder already in the sweep dir (none is overwritten);
- a seeded sampler is reseeded with seed + the number of trials already in the study, so a
  resumed study does not propose the points it tried first all over again (still reproducible);
- trials a killed sweep left RUNNING (user attr `sweep_dir` = this sweep dir) are marked
  FAIL with `abandoned: true` when the sweep is rerun; other workers' trials are left alone;
- a trial whose job raises, returns NaN/inf or lacks an objective is recorded FAIL with its
  reason (user attr `fail_reason`) and the sweep goes on until the study holds more than
  `max_failures` failed trials;
- a job killed under submitit no longer ends the sweep: its batch's results are read from
  the jobs' result.json files, and the dead job's trial fails;
- `range(a,b)` excludes b, as in the basic sweeper.
Each trial records `sweep_dir`, `job_num` and `run_dir` (the job folder; analysis/ joins on it).
Several sweeps may share one study (a PostgreSQL storage, one sweep dir each): n_trials then
caps the study as a whole, overshooting by at most the other workers' batches in flight.
"""
from __future__ import annotations

import functools
import logging
import math
import time
from pathlib import Path
from typing import Any, List, Optional

import optuna
import sqlalchemy.exc
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn, JobStatus
from hydra.errors import HydraException
from hydra.utils import instantiate
from hydra_plugins.hydra_optuna_sweeper._impl import OptunaSweeperImpl, create_optuna_distribution_from_override
from omegaconf import OmegaConf
from optuna.distributions import BaseDistribution, DiscreteUniformDistribution, IntUniformDistribution
from optuna.trial import TrialState

from wartok.launch import optuna_storage, redact, write_summary_safely
from wartok.results import read_result

log = logging.getLogger(__name__)


class ResumableOptunaSweeperImpl(OptunaSweeperImpl):
    def __init__(self, sampler: Any, direction: Any, objectives: List[str], storage: Optional[str], study_name: str,
                 n_trials: int, n_jobs: int, max_failures: int, params: Any = None,
                 custom_search_space: Optional[str] = None) -> None:
        super().__init__(sampler, direction, storage, study_name, n_trials, n_jobs, 1.0, None, custom_search_space,
                         params)
        self.objectives = list(objectives)
        self.max_failures = max_failures
        if not self.objectives:
            raise HydraException("hydra.sweeper.objectives is empty; name at least one metric, e.g. [ar_loss]")
        if n_jobs < 1 or max_failures < 0:
            raise HydraException(f"hydra.sweeper.n_jobs={n_jobs} must be >= 1 and max_failures={max_failures} >= 0")

    # ------------------------------------------------------------------ setup of the study

    def objective_directions(self) -> list[str]:
        directions = self._get_directions()
        if len(directions) == 1:
            directions = directions * len(self.objectives)
        if len(directions) != len(self.objectives):
            raise HydraException(f"hydra.sweeper.direction has {len(directions)} entries for "
                                 f"{len(self.objectives)} objectives {self.objectives}")
        return directions

    def space_from_overrides(self, arguments: List[str]) -> tuple[dict[str, BaseDistribution], dict[str, Any]]:
        """Distributions and fixed values from hydra.sweeper.params, then the command line (which wins)."""
        parsed = OverridesParser.create().parse_overrides(self._parse_sweeper_params_config() + list(arguments))
        space: dict[str, Any] = {}
        for override in parsed:
            space[override.get_key_element()] = range_distribution(override) or \
                create_optuna_distribution_from_override(override)
        distributions = {k: v for k, v in space.items() if isinstance(v, BaseDistribution)}
        return distributions, {k: v for k, v in space.items() if k not in distributions}

    def open_study(self, url: str, directions: list[str]) -> optuna.Study:
        if isinstance(self.sampler, functools.partial):
            raise HydraException("the grid sampler is not supported here; use hydra/sweeper=resumable_grid for grids")
        study = create_or_load_study(self.study_name, url, self.sampler, directions)
        if [d.name.lower() for d in study.directions] != [d.lower() for d in directions]:
            raise HydraException(f"study {self.study_name!r} exists with directions "
                                 f"{[d.name.lower() for d in study.directions]}, not {directions}: "
                                 "use another study_name or sweep dir")
        seed = OmegaConf.select(self.config, "hydra.sweeper.sampler.seed")
        if seed is not None and study.trials:  # the same seed would replay the first proposals
            study.sampler = instantiate(self.config.hydra.sweeper.sampler, seed=int(seed) + len(study.trials))
        return study

    def abandon_stale(self, study: optuna.Study, sweep_dir: Path) -> None:
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if trial.user_attrs.get("sweep_dir") == str(sweep_dir):
                live = optuna.trial.Trial(study, trial._trial_id)
                live.set_user_attr("abandoned", True)
                live.set_user_attr("fail_reason", "left RUNNING by a sweep that was killed")
                study.tell(trial.number, state=TrialState.FAIL)
                log.warning(f"trial {trial.number} (job {trial.user_attrs.get('job_num')}) was left RUNNING by a "
                            "killed sweep: marked failed")

    # ------------------------------------------------------------------ the trial loop

    def sweep(self, arguments: List[str]) -> None:
        assert self.config is not None and self.launcher is not None
        sweep_dir = Path(str(self.config.hydra.sweep.dir)).absolute()
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")  # unresolved: no storage URL in it
        directions = self.objective_directions()
        distributions, fixed = self.space_from_overrides(arguments)
        url = optuna_storage(self.storage, sweep_dir)
        study = self.open_study(url, directions)
        self.abandon_stale(study, sweep_dir)
        log.info(f"Study {study.study_name} in {redact(url)}: {len(study.trials)} trials so far, n_trials="
                 f"{self.n_trials}; objectives {self.objectives} ({', '.join(directions)}); "
                 f"sampler {type(study.sampler).__name__}")
        job_num = next_job_num(study, sweep_dir)
        try:
            while (to_go := self.n_trials - len(counted(study))) > 0:
                trials = [study.ask() for _ in range(min(self.n_jobs, to_go))]
                overrides = self._configure_trials(trials, distributions, fixed)
                nums = list(range(job_num, job_num + len(trials)))
                for trial, num in zip(trials, nums):
                    for key, value in (("sweep_dir", str(sweep_dir)), ("job_num", num),
                                       ("run_dir", str(sweep_dir / str(num)))):
                        trial.set_user_attr(key, value)
                self.run_batch(study, trials, overrides, nums, sweep_dir)
                job_num += len(trials)
                failures = [t for t in counted(study) if t.state == TrialState.FAIL]
                if len(failures) > self.max_failures:
                    reasons = "; ".join(f"#{t.number}: {t.user_attrs.get('fail_reason')}" for t in failures[-3:])
                    raise HydraException(f"{len(failures)} failed trials, more than hydra.sweeper.max_failures="
                                         f"{self.max_failures} (last: {reasons})")
        except BaseException:
            write_summary_safely(self.config)  # on_multirun_end does not run when a sweep raises
            raise
        self.save_results(study, sweep_dir)

    def run_batch(self, study: optuna.Study, trials: list, overrides: list, nums: list[int], sweep_dir: Path) -> None:
        try:
            returns: list[Optional[JobReturn]] = list(self.launcher.launch(overrides, initial_job_idx=nums[0]))
        except Exception as err:  # a job died (submitit): read what each job of the batch left behind
            log.warning(f"the launcher lost the batch of jobs {nums} ({type(err).__name__}: {err}); "
                        "reading their result.json files")
            returns = [None] * len(trials)
        missing_objective = None
        for trial, ret, num in zip(trials, returns, nums):
            values, reason, result = trial_outcome(ret, sweep_dir / str(num), self.objectives)
            if values is None:
                trial.set_user_attr("fail_reason", reason)
                study.tell(trial, state=TrialState.FAIL)
                log.warning(f"trial {trial.number} (job {num}) failed: {reason}")
                if result and result["status"] == "completed":
                    absent = [name for name in self.objectives if name not in result["metrics"]]
                    missing_objective = missing_objective or (absent and (absent, sorted(result["metrics"])))
            else:
                study.tell(trial, values=values)
        if missing_objective:  # a misconfigured sweep, not a bad trial: stop before spending more
            absent, reported = missing_objective
            raise HydraException(f"objective(s) {absent} are not among the metrics this build reports "
                                 f"({', '.join(reported)}); choose hydra.sweeper.objectives from those")

    def save_results(self, study: optuna.Study, sweep_dir: Path) -> None:
        """optimization_results.yaml, as the plugin writes it (sweep.json has the full summary)."""
        best = study.best_trials if any(t.state == TrialState.COMPLETE for t in study.trials) else []
        if len(self.objectives) == 1:
            content = {"name": "optuna", "best_params": best[0].params if best else None,
                       "best_value": best[0].value if best else None}
        else:
            content = {"name": "optuna", "solutions": [{"params": t.params, "values": t.values} for t in best]}
        OmegaConf.save(OmegaConf.create(content), sweep_dir / "optimization_results.yaml")
        log.info(f"Best: {content}")


def create_or_load_study(name: str, url: str, sampler: Any, directions: list[str], attempts: int = 5) -> optuna.Study:
    """optuna.create_study(load_if_exists=True), retried when several sweeps start together on a
    fresh database: each creates Optuna's schema (tables, PostgreSQL enum types), and the losers
    of that race get a duplicate-object error; on retry they find the schema and the study."""
    for attempt in range(attempts):
        try:
            return optuna.create_study(study_name=name, storage=url, sampler=sampler, directions=directions,
                                       load_if_exists=True)
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError) as err:
            if attempt == attempts - 1:
                raise
            log.warning(f"creating the study's storage raced another sweep ({type(err).__name__}); retrying")
            time.sleep(0.5 * (attempt + 1))
    raise AssertionError("unreachable")


def counted(study: optuna.Study) -> list:
    """The trials n_trials counts: all but those a killed sweep abandoned."""
    return [t for t in study.get_trials(deepcopy=False) if not t.user_attrs.get("abandoned")]


def next_job_num(study: optuna.Study, sweep_dir: Path) -> int:
    folders = [int(p.name) for p in sweep_dir.iterdir() if p.name.isdigit()]
    ours = [int(t.user_attrs["job_num"]) for t in study.get_trials(deepcopy=False)
            if t.user_attrs.get("sweep_dir") == str(sweep_dir) and "job_num" in t.user_attrs]
    return max(folders + ours, default=-1) + 1


def trial_outcome(ret: Optional[JobReturn], run_dir: Path, objectives: list[str]
                  ) -> tuple[Optional[list[float]], Optional[str], Optional[dict]]:
    """(objective values, or None and why the trial failed, the run's result if it wrote one)."""
    try:
        result: Optional[dict] = read_result(run_dir / "result.json")
    except (OSError, ValueError):
        result = None
    if ret is not None and ret.status == JobStatus.COMPLETED:
        raw = ret.return_value
    elif result is not None and result["status"] == "completed":  # finished, then its job was lost
        raw = [(result["metrics"].get(name) or {}).get("value") for name in objectives]
    elif result is not None:
        return None, result["error"] or "the run failed", result
    elif ret is not None:
        return None, f"{type(ret._return_value).__name__}: {ret._return_value}", None
    else:
        return None, "the job died before writing result.json", None
    values = list(raw) if isinstance(raw, (list, tuple)) else [raw]
    try:
        values = [float(v) for v in values]
    except (TypeError, ValueError):
        return None, f"objective values {raw!r} are not numbers", result
    if len(values) != len(objectives):
        return None, f"{len(values)} objective values for objectives {objectives}", result
    if not all(math.isfinite(v) for v in values):
        unavailable = [n for n in objectives if result and (result["metrics"].get(n) or {}).get("value") is None]
        if unavailable:
            return None, f"objective(s) {unavailable} not available in this run's result.json", result
        return None, f"non-finite objective {dict(zip(objectives, values))}", result
    return values, None, result


def range_distribution(override: Any) -> Optional[BaseDistribution]:
    """range(a,b[,step]) as the basic sweeper reads it (b excluded); None for other overrides."""
    if not override.is_range_sweep() or override.value().shuffle:
        return None
    values = list(override.sweep_iterator())
    step = override.value().step
    if not values:
        raise HydraException(f"{override.input_line} is an empty range")
    if all(isinstance(v, int) for v in values) and isinstance(step, int):
        return IntUniformDistribution(min(values), max(values), step=abs(step))
    return DiscreteUniformDistribution(float(min(values)), float(max(values)), float(abs(step)))

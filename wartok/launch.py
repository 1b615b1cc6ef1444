"""Resumable sweeps: the grid sweeper, the sweeper configs, and where an Optuna study is stored.

`hydra/sweeper=resumable_grid` is Hydra's basic sweeper (cartesian grids over
`hydra.sweeper.params`) plus two things the studies in sweeps/ need:
- resume: rerunning the same command with the same `hydra.sweep.dir` skips every job whose
  result.json says completed (its folder is not touched) and reruns failed or killed jobs in
  their own folders. A job is identified by its task overrides, compared as a set;
- `extra_grids`: further named grids appended after the main one (the baselines' two-stage
  frontier points), so one study need not be a single cartesian product.
Job folders are numbered by position in the grid; a job that is new on a rerun (a grid
that grew) takes its position if that folder is free, else the next free number, so no
folder is ever reused for different overrides.

`hydra/sweeper=resumable_optuna` (wartok/optuna_resume.py) is registered here as well, behind
a thin wrapper as the plugin does, so that composing a config never imports optuna.
`optuna_storage` decides where its study lives.

Hydra instantiates sweepers only from the `hydra_plugins` namespace: `register` files both
classes in Hydra's plugin registry under `hydra_plugins.wartok.<class>` names (the `_target_`s
below), the classes themselves staying here, importable, so that submitit can pickle them.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from hydra.core.plugins import Plugins

# Hydra's first plugin scan re-executes the plugin modules in place; scan before importing
# from them, or the classes imported below would be replaced under this module's feet.
Plugins.instance()

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper, BasicSweeperConf  # noqa: E402
from hydra.core.config_store import ConfigStore  # noqa: E402
from hydra.core.override_parser.overrides_parser import OverridesParser  # noqa: E402
from hydra.core.utils import JobReturn, JobStatus  # noqa: E402
from hydra.plugins.sweeper import Sweeper  # noqa: E402
from hydra_plugins.hydra_optuna_sweeper.config import OptunaSweeperConf, SamplerConfig  # noqa: E402
from omegaconf import MISSING, OmegaConf  # noqa: E402

log = logging.getLogger(__name__)

# Where the Optuna study lives when the sweeper config sets no storage: this environment
# variable (a URL), or the first line of the file it names, else SQLite in the sweep folder.
STORAGE_ENV = "WARTOK_OPTUNA_STORAGE"
STORAGE_FILE_ENV = "WARTOK_OPTUNA_STORAGE_FILE"
SQLITE_NAME = "optuna.db"
PLUGIN_PREFIX = "hydra_plugins.wartok."


# ----------------------------------------------------------------------------- configs

@dataclass
class ResumableGridConf(BasicSweeperConf):
    _target_: str = PLUGIN_PREFIX + "ResumableGridSweeper"
    # name -> {key: values}: grids run after the main one, each with the command-line overrides
    extra_grids: Dict[str, Dict[str, str]] = field(default_factory=dict)


@dataclass
class ResumableOptunaConf:
    """The plugin's OptunaSweeperConf with its resume and failure behaviour fixed (optuna_resume.py)."""

    _target_: str = PLUGIN_PREFIX + "ResumableOptunaSweeper"
    defaults: List[Any] = field(default_factory=lambda: [{"sampler": "tpe"}])
    sampler: SamplerConfig = MISSING
    direction: Any = "minimize"          # one per objective; a single value applies to all
    objectives: List[str] = field(default_factory=lambda: ["ar_loss"])  # metric names of result.json
    storage: Optional[str] = None        # None: $WARTOK_OPTUNA_STORAGE, the file in $WARTOK_OPTUNA_STORAGE_FILE, else sqlite in the sweep dir
    study_name: str = "${name}"
    n_trials: int = 20                   # the study's total (failed trials count, abandoned ones do not)
    n_jobs: int = 1                      # trials per batch (parallel jobs under submitit)
    max_failures: int = 3                # the sweep stops once the study holds more failed trials than this
    params: Optional[Dict[str, str]] = None
    custom_search_space: Optional[str] = None


def register() -> None:
    plugins = Plugins.instance()
    for cls in (ResumableGridSweeper, ResumableOptunaSweeper):
        plugins.register(cls)
        plugins.class_name_to_class[PLUGIN_PREFIX + cls.__name__] = cls
    store = ConfigStore.instance()
    store.store(group="hydra/sweeper", name="resumable_grid", node=ResumableGridConf, provider="wartok")
    store.store(group="hydra/sweeper", name="resumable_optuna", node=ResumableOptunaConf, provider="wartok")
    # ${wartok.times:${stage_c.steps},0.5}: a budget or size relative to the experiment's own
    if not OmegaConf.has_resolver("wartok.times"):
        OmegaConf.register_new_resolver("wartok.times", lambda value, factor: int(round(float(value) * float(factor))))
    # sanity: the plugin's dataclass still has the fields ResumableOptunaConf mirrors
    assert {"sampler", "direction", "storage", "study_name", "n_trials", "n_jobs", "params"} <= set(
        OptunaSweeperConf.__dataclass_fields__)


# ----------------------------------------------------------------------------- storage

def optuna_storage(configured: Optional[str], sweep_dir: Path) -> str:
    """The study's storage URL: the configured one, else the environment, else SQLite in sweep_dir.

    Keep credentials out of configs: a URL given on the command line or in a YAML file is
    copied into every job's .hydra/hydra.yaml, whereas one read from the environment here is not.
    """
    if configured:
        return str(configured)
    if os.environ.get(STORAGE_ENV):
        return os.environ[STORAGE_ENV].strip()
    if os.environ.get(STORAGE_FILE_ENV):
        path = Path(os.environ[STORAGE_FILE_ENV]).expanduser()
        lines = [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
        if not lines:
            raise ValueError(f"{STORAGE_FILE_ENV}={path} holds no storage URL")
        return lines[0]
    return f"sqlite:///{Path(sweep_dir).absolute() / SQLITE_NAME}"


def redact(url: str) -> str:
    """The URL with its password replaced by ***, for logs and sweep.json."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL SQLAlchemy parses: show only its scheme
        return url.split(":", 1)[0] + ":<unparsed>"


# ----------------------------------------------------------------------------- grid resume

def job_key(overrides: Sequence[str]) -> tuple[str, ...]:
    """What identifies a job: its task overrides as a set (hydra.* overrides are bookkeeping)."""
    return tuple(sorted(o for o in overrides if not o.startswith(("hydra.", "hydra/", "+hydra.", "++hydra."))))


def existing_jobs(sweep_dir: Path) -> dict[int, tuple[tuple[str, ...], str]]:
    """Numbered job folders of a sweep: number -> (job key, status: completed|failed|missing)."""
    from wartok.results import read_result

    jobs: dict[int, tuple[tuple[str, ...], str]] = {}
    for folder in sweep_dir.iterdir() if sweep_dir.is_dir() else []:
        if not folder.name.isdigit():
            continue
        overrides_file = folder / ".hydra" / "overrides.yaml"
        overrides = list(OmegaConf.load(overrides_file)) if overrides_file.is_file() else []
        try:
            status = read_result(folder / "result.json")["status"]
        except (OSError, ValueError):
            status = "missing"
        jobs[int(folder.name)] = (job_key(overrides), status)
    return jobs


def plan_jobs(jobs: Sequence[Sequence[str]], existing: dict[int, tuple[tuple[str, ...], str]]
              ) -> tuple[list[tuple[int, list[str]]], list[tuple[int, list[str]]]]:
    """Split the grid into (skipped: already completed, todo), each as (folder number, overrides).

    A job reruns in the folder of an earlier attempt with the same overrides; a new job takes
    its grid position when free, else the next number no folder uses.
    """
    attempts: dict[tuple[str, ...], list[tuple[int, str]]] = {}
    for num, (key, status) in sorted(existing.items()):
        attempts.setdefault(key, []).append((num, status))
    used = set(existing)
    skipped, todo = [], []
    for position, overrides in enumerate(jobs):
        earlier = attempts.get(job_key(overrides), [])
        done = [num for num, status in earlier if status == "completed"]
        if done:
            skipped.append((done[0], list(overrides)))
        elif earlier:
            todo.append((earlier[0][0], list(overrides)))
        else:
            num = position
            while num in used:
                num = max(used) + 1
            used.add(num)
            todo.append((num, list(overrides)))
    return skipped, todo


class ResumableGridSweeper(BasicSweeper):
    """Hydra's basic sweeper that resumes a sweep folder and runs extra grids (see the module doc)."""

    def __init__(self, max_batch_size: Optional[int], params: Optional[Dict[str, str]] = None,
                 extra_grids: Optional[Dict[str, Dict[str, str]]] = None) -> None:
        super().__init__(max_batch_size, params)
        self.extra_grids = extra_grids or {}

    def grid(self, params: Dict[str, str], arguments: List[str], params_win: bool = False) -> list[list[str]]:
        """Every job of one cartesian grid. Command-line overrides win over the main grid's values
        (as in Hydra's basic sweeper); an extra grid's own keys win over the command line, since
        varying them is what it is for."""
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        grid = [f"{k}={v}" for k, v in params.items()]
        overrides = parser.parse_overrides([*arguments, *grid] if params_win else [*grid, *arguments])
        return self.split_arguments(overrides, None)[0]

    def sweep(self, arguments: List[str]) -> list[Sequence[JobReturn]]:
        assert self.config is not None and self.launcher is not None and self.hydra_context is not None
        jobs, seen = [], set()
        grids = [(self.params, False)] + [(grid, True) for grid in self.extra_grids.values()]
        for grid, params_win in grids:
            for overrides in self.grid(dict(grid or {}), arguments, params_win):
                if job_key(overrides) not in seen:  # a point two grids share runs once
                    seen.add(job_key(overrides))
                    jobs.append(overrides)
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        skipped, todo = plan_jobs(jobs, existing_jobs(sweep_dir))
        for num, overrides in skipped:
            log.info(f"\t#{num} : {' '.join(overrides)}  (completed earlier: skipped)")
        size = self.max_batch_size if self.max_batch_size and self.max_batch_size > 0 else max(len(todo), 1)
        returns: list[Sequence[JobReturn]] = []
        try:
            for start in range(0, len(todo), size):
                batch = todo[start:start + size]
                # the folder number travels as a Hydra override: positions need not be contiguous
                batch_overrides = [[*overrides, f"hydra.sweep.subdir={num}"] for num, overrides in batch]
                self.validate_batch_is_legal(batch_overrides)
                returns.append(self.launcher.launch(batch_overrides, initial_job_idx=batch[0][0]))
        except BaseException:
            write_summary_safely(self.config)
            raise
        failed = [r for batch in returns for r in batch if r.status != JobStatus.COMPLETED]
        if failed:
            write_summary_safely(self.config)  # on_multirun_end does not run when a sweep raises
            log.error(f"{len(failed)} of {len(todo)} jobs failed; rerun the same command to retry them")
            _ = failed[0].return_value  # raises the first failure, with its traceback
        return returns


def write_summary_safely(config: Any) -> None:
    from wartok.summary import write_summary

    try:
        write_summary(config)
    except Exception as err:  # the sweep's own error matters more than its summary's
        log.warning(f"could not write the sweep summary: {err}")


class ResumableOptunaSweeper(Sweeper):
    """The Optuna sweeper of wartok/optuna_resume.py, imported only when a sweep uses it."""

    def __init__(self, **kwargs: Any) -> None:
        from wartok.optuna_resume import ResumableOptunaSweeperImpl

        self.sweeper = ResumableOptunaSweeperImpl(**kwargs)

    def setup(self, **kwargs: Any) -> None:
        self.sweeper.setup(**kwargs)

    def sweep(self, arguments: List[str]) -> None:
        return self.sweeper.sweep(arguments)

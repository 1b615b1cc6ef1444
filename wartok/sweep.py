"""The entry point: `python -m wartok.sweep [experiment=...] [-m sweeps=...]`.

One `@hydra.main`. The composed config becomes a typed RunConfig (unknown keys and bad values
fail here with one line, before compute), then one run writes its result.json into Hydra's
output folder. The value returned is what sweepers optimise: the metrics named by
`hydra.sweeper.objectives` (the Optuna sweeper's setting; else ar_loss), NaN for a metric the
run did not report, which the sweeper records as a failed trial.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from wartok import dist
from wartok.config import load_run_config, register_configs
from wartok.launch import register as register_sweepers
from wartok.run import execute, format_metrics
from wartok.validate import ConfigError

# configs/ and sweeps/ live beside the package in the project checkout (install with `pip install -e .`).
PROJECT_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = PROJECT_ROOT / "configs"
# The primary config mounts PROJECT_ROOT/sweeps as the `sweeps` group through this variable.
os.environ.setdefault("WARTOK_PROJECT_ROOT", str(PROJECT_ROOT))
register_configs()
register_sweepers()  # hydra/sweeper=resumable_grid|resumable_optuna (sweeps/ use them)


def compose(overrides: list[str] | None = None) -> DictConfig:
    """The config `python -m wartok.sweep OVERRIDES` would run, composed without running (tests, notebooks)."""
    from hydra import compose as hydra_compose, initialize_config_dir

    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR), job_name="wartok"):
        return hydra_compose(config_name="config", overrides=list(overrides or []), return_hydra_config=False)


def objective(result: dict, names: list[str]) -> float | list[float]:
    """The named metrics of a result (NaN where missing or unavailable): one float, or a list for several."""
    values = []
    for name in names:
        value = (result["metrics"].get(name) or {}).get("value")
        if value is None:
            print(f"wartok: objective {name!r} is not available in this run's metrics", file=sys.stderr)
        values.append(float("nan") if value is None else float(value))
    return values[0] if len(values) == 1 else values


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="config")
def main(cfg: DictConfig) -> float | list[float]:
    try:
        run_cfg = load_run_config(cfg)
        out_dir = Path(HydraConfig.get().runtime.output_dir)
        result = execute(run_cfg, out_dir, overrides=list(HydraConfig.get().overrides.task))
    except ConfigError as err:
        print(f"wartok: configuration error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    if dist.is_main():  # under DDP every rank returns the result; one prints it
        print(format_metrics(result))
        print(f"result: {out_dir / 'result.json'}")
    return objective(result, list(OmegaConf.select(HydraConfig.get(), "sweeper.objectives", default=None) or ["ar_loss"]))


if __name__ == "__main__":
    main()

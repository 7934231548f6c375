"""hydra for the command lines: every script here is a hydra app over configs/, typed by its dataclass.

    @hydra_app(RolloutConfig, "rollout")       # configs/rollout.yaml (defaults: rollout_schema, policy: lift)
    def main(cfg: RolloutConfig): ...

    python eval/rollout.py policy=can method=uniform5@ddim10
    python eval/rollout.py -m method=ddim2,ddim10,uniform5@ddim10     # one job per method
    main(["policy=can", "episodes=5"])                                # the same from Python (tests)

The dataclass is stored as `<name>_schema`; a yaml file of the same name lists it first in its
defaults, so unknown keys and wrong types are errors, and the dataclass's __post_init__ checks run.
hydra writes no log files or output folders (multirun jobs go to outputs/multirun/<job number>).
The library (policy_accel/) never imports this.
"""

import dataclasses
import functools
import sys
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "configs")
QUIET = ["hydra.output_subdir=null", "hydra.run.dir=.", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled",
         "hydra.sweep.dir=outputs/multirun", "hydra.sweep.subdir=${hydra.job.num}"]


def _primary(schema, name: str) -> str:
    ConfigStore.instance().store(name=f"{name}_schema", node=schema)
    return name if (Path(CONFIG_DIR) / f"{name}.yaml").is_file() else f"{name}_schema"


def _to_object(cfg):
    try:
        return OmegaConf.to_object(cfg)
    except (ValueError, OmegaConfBaseException) as e:  # the dataclass's own checks, or a bad type
        raise SystemExit(f"bad option: {' '.join(str(e).split())}") from None


def compose(schema, name: str, overrides: list[str]):
    """The `schema` instance that `python eval/<script>.py <overrides>` would run with."""
    primary = _primary(schema, name)
    with hydra.initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        try:
            cfg = hydra.compose(primary, overrides=list(overrides))
        except (ConfigCompositionException, OmegaConfBaseException) as e:
            keys = ", ".join(f.name for f in dataclasses.fields(schema))
            raise SystemExit(f"bad option: {' '.join(str(e).split())}; keys: {keys}") from None
    return _to_object(cfg)


def hydra_app(schema, name: str):
    """`fn(cfg: schema)` -> `main(overrides=None)`: from the command line a hydra app, from Python the
    same composition of configs/ with the given overrides."""
    primary = _primary(schema, name)

    def decorator(fn):
        @functools.wraps(fn)
        def main(overrides: list[str] | None = None):
            if overrides is None:
                sys.argv += QUIET
                return hydra.main(config_path=CONFIG_DIR, config_name=primary, version_base="1.3")(
                    lambda cfg: fn(_to_object(cfg)))()
            return fn(compose(schema, name, overrides))

        return main

    return decorator

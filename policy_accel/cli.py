"""`key=value` command lines (OmegaConf dotlist): dataclass defaults <- configs/<name>.yaml <- arguments.

    cfg = load_config(TrainConfig, sys.argv[1:], "train.yaml")   # unknown keys and bad values raise SystemExit
"""

import dataclasses
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def load_config(schema, argv: list[str], yaml_name: str | None = None):
    """Return a `schema` instance; a yaml file missing from CONFIG_DIR (an installed package) is skipped."""
    keys = ", ".join(f.name for f in dataclasses.fields(schema))
    bad = [a for a in argv if "=" not in a]
    if bad:
        raise SystemExit(f"arguments must be key=value, got {bad}; keys: {keys}")
    try:
        cfg = OmegaConf.structured(schema)
        if yaml_name and (CONFIG_DIR / yaml_name).exists():
            cfg = OmegaConf.merge(cfg, OmegaConf.load(CONFIG_DIR / yaml_name))
        return OmegaConf.to_object(OmegaConf.merge(cfg, OmegaConf.from_dotlist(argv)))
    except OmegaConfBaseException as e:
        raise SystemExit(f"bad option: {str(e).splitlines()[0]}; keys: {keys}") from None
    except ValueError as e:  # a schema's __post_init__ check
        raise SystemExit(f"bad option: {e}") from None

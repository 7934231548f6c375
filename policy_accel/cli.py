"""`key=value` command lines (OmegaConf dotlist): dataclass defaults <- configs/<name>.yaml <- arguments.

    cfg = load_config(TrainConfig, sys.argv[1:], "train.yaml")   # unknown keys and bad values raise SystemExit
"""

import dataclasses
import json
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


def read_json(path, what: str) -> dict:
    """A JSON file's content; a missing file or bad JSON is an error naming `what` and the path."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} file {path} is not valid JSON: {e}") from e


def write_json(path, data) -> Path:
    """Write `data` as indented JSON, creating the folder; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path

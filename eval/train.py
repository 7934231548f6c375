"""Train a DP-T policy on a zarr demo dataset (policy_accel/train.py has the recipe and what goes where).

    python eval/train.py env=lift [steps=10000 batch_size=128 model.n_layer=8 init_from=checkpoints/can_dp_t ...]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python eval/train.py` from the repo root

from eval.cli import hydra_app  # noqa: E402
from policy_accel.train import TrainConfig, train  # noqa: E402


@hydra_app(TrainConfig, "train")
def main(cfg: TrainConfig) -> Path:
    path = train(cfg)
    print(f"checkpoint: {path}")
    return path


if __name__ == "__main__":
    main()

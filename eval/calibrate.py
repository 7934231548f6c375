"""Calibrate BAC schedules (or diffusers' MagCache ratios) for a checkpoint from its demo data.

    python eval/calibrate.py checkpoint=checkpoints/lift_dp_t budget=10 [bubble_blocks=5]
    python eval/calibrate.py checkpoint=... 'budget=[5,10,20]' 'bubble_blocks=[0,5]' sampler=ddim steps=20
    python eval/calibrate.py checkpoint=... budget=10 forecast_order=1   # for BAC+Taylor order 1
    python eval/calibrate.py checkpoint=... magcache=true                # diffusers' MagCache ratios

Files go to <checkpoint>/schedules/ under the names method strings look up (policy_accel/recipes.py).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python eval/calibrate.py` from the repo root

from eval.cli import hydra_app  # noqa: E402
from policy_accel.calibration import CalibrateConfig, run  # noqa: E402


@hydra_app(CalibrateConfig, "calibrate")
def main(cfg: CalibrateConfig) -> list[Path]:
    return run(cfg)


if __name__ == "__main__":
    main()

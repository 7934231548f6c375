"""`python -m policy_accel.cache.calibrate checkpoint=... budget=10` (the code: policy_accel/cache/calibration.py).

A separate entry module, so that running it with -m does not re-execute a module the package has imported.
"""

from policy_accel.cache.calibration import main

if __name__ == "__main__":
    main()

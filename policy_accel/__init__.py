"""policy_accel."""

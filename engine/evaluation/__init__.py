"""Measuring the method: the paper protocol, baselines, variants, calibration, robustness."""

"""LineInspect calibration: thresholds, evaluation of a bundle, reports with plots."""

"""Threshold fitting shared by `calibration` (fit, evaluate, report) and `engines quantize` (its
decision check): the device's decision statistic, the strategies and the fit. Workstation only
(scipy); edge and the device's `engines build` never import it."""

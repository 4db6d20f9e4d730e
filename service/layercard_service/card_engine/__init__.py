"""The Layer Card engine: the probe pass, resnorm, coupling, the cost calibration, the performance column.

torch and peft live here (and in trainer/ and models/). The service reaches it only through ``run.py``, which
the composition root (core.py) hands the control plane as its ``CardEngine`` seam, imported on the first card.
"""

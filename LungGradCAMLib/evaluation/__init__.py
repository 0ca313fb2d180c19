"""Evaluation: classification metrics with confidence intervals and a model's evaluation on labelled
patches; heat-map metrics against a truth mask."""

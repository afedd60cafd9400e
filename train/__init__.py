"""Training side of LineInspect: datasets, backbones, models, fitting (torch)."""

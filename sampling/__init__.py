"""Sampling on the ComfyUI side, below the nodes and the trainer: tell base and domain MODELs apart and build
them (domain_model.py), route conditionings and ControlNet hints (conditioning.py), and the decoupled guider
(guider.py). The Train node's previews and every sampler node use these; this package imports neither."""

"""InDomain trainer: a folder of unlabelled images + a base checkpoint -> a domain UNet checkpoint.

Importing this package is cheap; ComfyUI is imported only when training starts.
Command line: `python -m indomain.training --help`.
"""

"""Developer kit: locate/import a real ComfyUI, start it as a server, build tiny models.

Used by the tests, the benchmarks and the demo. Never imported by the pack's nodes.
"""

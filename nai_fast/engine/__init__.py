"""The engines: training (loop, state, captions), generation (txt2img, samplers, PNG parameters),
the diffusers drop-ins, and the demo data.
"""

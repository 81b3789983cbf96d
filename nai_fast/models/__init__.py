"""Stable Diffusion models: the shipped configs, presets with random weights, checkpoint formats
(diffusers folders, original-layout single files, VAEs) and safe loading.
"""

"""Hypernetworks: the modules (modules.py) and their files (files.py), and the diffusers attention
processor that applies them to the k/v inputs of the U-Net's attention (processors.py), with what
it reuses (cache.py).
"""

"""Hypernetworks: the modules and their files, and the diffusers attention processors that apply
them to the k/v inputs of the U-Net's attention (caches, folding, kernels).
"""

"""The module a training step differentiates: it runs the U-Net and holds the hypernetwork too.

DistributedDataParallel must wrap a module whose forward uses every parameter it averages. A
hypernetwork's modules are called from inside the U-Net's attention processors, so wrapping the
hypernetwork alone would never see a forward; wrapping this module does, and DDP then reduces
only the parameters that require gradients (the hypernetwork's, or the U-Net's when fine-tuning).
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["Denoiser"]


class Denoiser(nn.Module):
    def __init__(self, unet: nn.Module, hypernetwork: nn.Module | None) -> None:
        super().__init__()
        self.unet = unet
        self.hypernetwork = hypernetwork

    def forward(self, noisy: Tensor, timesteps: Tensor, context: Tensor) -> Tensor:
        return self.unet(noisy, timesteps, encoder_hidden_states=context, return_dict=False)[0]

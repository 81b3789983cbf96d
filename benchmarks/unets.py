"""The U-Nets the hypernetwork and LoRA suites time: SD 1.x's (full mode) and a two-level one
with cross-attention at every level (smoke mode), with the k/v widths of their attention."""

SD1_UNET = dict(
    block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8, layers_per_block=2
)
SD1_WIDTHS = (320, 640, 768, 1280)

SMOKE_UNET = dict(
    block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=48,
    attention_head_dim=8,
    norm_num_groups=8,
)
SMOKE_WIDTHS = (32, 48, 64)

"""The cost model's GPU predictions for a fused op, as benchmark extra_info and one line."""

from __future__ import annotations

from nai_fast.kernels.cost import DEVICES, Comparison

PASSES = (("forward", False), ("backward", True))  # pass name, the cost functions' ``backward``


def predictions(passes: dict[str, Comparison]) -> tuple[dict[str, float], str]:
    """``passes``: pass name ("forward", "backward") -> the op's cost. Returns extra_info
    entries (bytes, launches, time floors per device) and a one-line summary."""
    info, summary = {}, []
    for name, cost in passes.items():
        info |= {
            f"{name}_bytes_minimal": cost.minimal.bytes,
            f"{name}_bytes_fused": cost.implemented.bytes,
            f"{name}_bytes_eager": cost.eager.bytes,
            f"{name}_launches_fused": cost.implemented.launches,
            f"{name}_launches_eager": cost.eager.launches,
        }
        floors = []
        for device in DEVICES:
            minimal, fused, eager = (side.time_floor(device) * 1e6 for side in (cost.minimal, cost.implemented, cost.eager))
            info |= {
                f"{name}_{device.name}_floor_us_minimal": minimal,
                f"{name}_{device.name}_floor_us_fused": fused,
                f"{name}_{device.name}_floor_us_eager": eager,
            }
            floors.append(f"{device.name} {minimal:.2f}/{fused:.2f}/{eager:.2f} us ({cost.predicted_speedup(device):.2f}x)")
        summary.append(
            f"{name} {cost.implemented.bytes / 1e6:.2f} vs {cost.eager.bytes / 1e6:.2f} MB "
            f"({cost.byte_ratio():.2f}x), {cost.implemented.launches} vs {cost.eager.launches} launches, "
            "floors minimal/fused/eager " + ", ".join(floors)
        )
    return info, "; ".join(summary)

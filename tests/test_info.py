"""`nai-fast info`: versions, dispatch, and the kernels' cost model at SD 1.x shapes."""

import json

import pytest
import torch

from nai_fast import __version__
from nai_fast.cli import main
from nai_fast.info import environment, kernel_costs
from nai_fast.kernels import ENV_VAR, dispatch_summary, measured
from nai_fast.kernels.cost import A100, H100_SXM, cross_attention_cost, hyper_kv_cost


def test_environment_reports_versions_and_dispatch(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "auto")
    info = environment()
    assert info["versions"]["nai_fast"] == __version__
    assert info["versions"]["torch"] == torch.__version__
    assert info["kernels_on"] == ("cuda" if torch.cuda.is_available() else "cpu")
    assert set(info["kernels"]) == {"chunk_concat", "cross_attention", "hyper_kv"}


@pytest.mark.parametrize("mode, expected", [("reference", "eager reference: NAI_FAST_KERNELS=reference"), ("auto", "cpu tensors")])
def test_dispatch_summary_on_cpu(monkeypatch, mode, expected):
    monkeypatch.setenv(ENV_VAR, mode)
    assert all(expected in path for path in dispatch_summary(torch.device("cpu")).values())


def test_dispatch_summary_on_cuda_names_triton(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "auto")
    assert set(dispatch_summary(torch.device("cuda")).values()) == {"Triton"}


def test_kernel_costs_cover_every_level_op_and_pass(monkeypatch):
    # The cost model's choices: no class measured.
    monkeypatch.setattr(measured, "table", lambda: measured.MeasuredTable({}, {}))
    rows = kernel_costs(512, 768, chunks=3)
    levels = {row["level"] for row in rows}
    assert levels == {"down 0", "down 1", "down 2", "mid", "up 1", "up 2", "up 3"}
    assert len(rows) == len(levels) * 2 * 2  # two ops, forward and backward
    assert sum(row["calls"] for row in rows) == 4 * 16  # 16 transformer blocks, each row kind once
    first = next(row for row in rows if row["op"] == "cross_attention" and row["level"] == "down 0")
    cost = cross_attention_cost(2, 8, 6144, 231, 40)
    assert first["shape"] == "B2 H8 Lq6144 Lk231 d40" and first["pass"] == "forward"
    assert first["fused_mb"] == pytest.approx(cost.implemented.bytes / 1e6)
    assert first["eager_mb"] == pytest.approx(cost.eager.bytes / 1e6)
    assert first["h100_fused_us"] == pytest.approx(cost.implemented.time_floor(H100_SXM) * 1e6)
    hyper = next(row for row in rows if row["op"] == "hyper_kv" and row["level"] == "mid" and row["pass"] == "backward")
    cost = hyper_kv_cost(2 * 96, 1280, backward=True)
    assert hyper["a100_eager_us"] == pytest.approx(cost.eager.time_floor(A100) * 1e6)
    assert not hyper["a100_auto"] and not hyper["h100_auto"], "the deepest level keeps the eager path"
    down_1 = next(row for row in rows if row["op"] == "hyper_kv" and row["level"] == "down 1")
    assert (down_1["a100_auto"], down_1["h100_auto"]) == (False, True), "width 640 pays on H100 only"


def test_kernel_costs_follow_the_shipped_measurements():
    """sm_90 was measured on an H200 (docs/gpu.md): in eager PyTorch hyper_kv lost at width
    640 there (host time), so auto keeps eager where the cost model predicted a gain."""
    assert measured.table().measured("sm_90")
    down_1 = next(row for row in kernel_costs(512, 768, chunks=3) if row["op"] == "hyper_kv" and row["level"] == "down 1")
    assert not down_1["h100_auto"]


def test_cli_prints_both_sizes(capsys):
    assert main(["info", "--kernels"]) == 0
    out = capsys.readouterr().out
    assert "fused kernels at 512x512" in out and "fused kernels at 512x768" in out
    assert "B2 H8 Lq4096 Lk77 d40" in out and "B2 H8 Lq6144 Lk77 d40" in out


def test_cli_json(capsys):
    assert main(["info", "--kernels", "--size", "256x384", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert list(info["kernel_costs"]) == ["256x384"]
    assert info["kernel_costs"]["256x384"][0]["shape"] == "3072x320"  # 2 x (256 / 8) x (384 / 8) tokens


def test_cli_bad_size(capsys):
    with pytest.raises(SystemExit):
        main(["info", "--kernels", "--size", "512by768"])
    assert "expected WIDTHxHEIGHT" in capsys.readouterr().err

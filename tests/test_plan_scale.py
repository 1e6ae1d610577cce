"""`fusedata plan` without a pipeline file: the what-if arithmetic against a hand computation."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from cli.main import main
from fusedata.errors import OptionError
from fusedata.pipeline.plan import ScaleConfig, plan_scale


def test_minipile_on_8_gpus_by_hand():
    plan = plan_scale(ScaleConfig(docs=1_000_000, tokens=1.8e9, models=3, params=7e9, gpus=8, cpus=64,
                                  top_k=10, codec="zq", gpu_tflops=312, mfu=0.4))
    # by hand: one GPU 312e12 * 0.4 / (2 * 7e9) = 8,914.29 tok/s; 8 GPUs 71,314.3 tok/s;
    # 1.8e9 tokens / 71,314.3 = 25,240.4 s = 7.0112 h per model
    extract = [s for s in plan["stages"] if s["group"] == "extract"]
    assert len(extract) == 3
    assert extract[0]["tokens_per_s"] == pytest.approx(71_314.29, rel=1e-6)
    assert extract[0]["seconds"] / 3600 == pytest.approx(7.0112, rel=1e-4)
    # disk: (1.8e9 - 1e6) positions * (2 + 2.2 * 10) bytes = 43.176 GB per model
    assert plan["disk_per_model_bytes"] == pytest.approx(43.176e9, rel=1e-9)
    # align: 1.799e9 / (200,000 * 64) = 140.55 s per source; fuse 1.799e9 / (300,000 * 64) = 93.70 s
    align = [s for s in plan["stages"] if s["group"] == "align"]
    assert len(align) == 2 and align[0]["seconds"] == pytest.approx(140.547, rel=1e-4)
    assert plan["groups_seconds"]["fuse"] == pytest.approx(93.698, rel=1e-4)
    # train: 6 * 7e9 FLOPs per position: 8 * 124.8e12 / 42e9 = 23,771.4 positions/s; 1.799e9 / that = 21.022 h
    assert plan["groups_seconds"]["train"] / 3600 == pytest.approx(21.022, rel=1e-4)
    # three extracts, 21.034 h, just outweigh training
    assert plan["groups_seconds"]["extract"] / 3600 == pytest.approx(21.034, rel=1e-4)
    assert plan["bound_by"] == "extract"
    assert plan["shards"] == 15_625  # 1M docs / 64


def test_without_training_and_raw_codec():
    plan = plan_scale(ScaleConfig(docs=1000, tokens=101_000, models=1, gpus=1, top_k=4, codec="raw", train=False))
    assert plan["disk_per_model_bytes"] == pytest.approx(100_000 * (4 + 8 * 4))
    assert set(plan["groups_seconds"]) == {"extract", "fuse"} and plan["bound_by"] == "extract"


def test_options_are_checked_by_the_config_and_the_cli():
    with pytest.raises(OptionError, match="tokens: must be more than the documents"):
        ScaleConfig(docs=10, tokens=5)
    result = CliRunner().invoke(main, ["plan", "--docs", "1000000", "--tokens", "1.8e9", "--models", "3",
                                       "--params", "7e9", "--gpus", "8"])
    assert result.exit_code == 0, result.output
    assert "bounded by extract" in result.output and "43.2 GB" in result.output
    bad = CliRunner().invoke(main, ["plan", "--gpus", "0"])
    assert bad.exit_code == 2 and "--gpus: must be >= 1" in bad.stderr

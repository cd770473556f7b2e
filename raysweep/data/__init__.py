"""Data: TOFU-schema records, loaders, the synthetic fictitious-authors corpus, rejection
templates, prompt formatting and the unlearning dataset/collator."""

from raysweep.data.formatting import (PROMPT_TEMPLATES, encode_prompt, encode_qa, format_answer,
                                      format_prompt, pad_batch)
from raysweep.data.loaders import DataError, load_hub_split, load_local_split, write_local_splits
from raysweep.data.records import QARecord
from raysweep.data.synthetic import SyntheticCorpus, SyntheticSpec, generate
from raysweep.data.templates import (PRIOR_TEMPLATES, REJECTION_TEMPLATES, UNLEARN_TEMPLATES,
                                     load_idk_templates)
from raysweep.data.unlearn_dataset import UnlearnDataset, collate_unlearn

__all__ = [
    "PROMPT_TEMPLATES", "encode_prompt", "encode_qa", "format_answer", "format_prompt", "pad_batch",
    "DataError", "load_hub_split", "load_local_split", "write_local_splits", "QARecord",
    "SyntheticCorpus", "SyntheticSpec", "generate", "PRIOR_TEMPLATES", "REJECTION_TEMPLATES",
    "UNLEARN_TEMPLATES", "load_idk_templates", "UnlearnDataset", "collate_unlearn",
]

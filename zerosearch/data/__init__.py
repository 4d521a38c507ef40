"""QA data: ZeroSearch/Search-R1 parquet and JSONL readers, the policy prompt, the bundled demo set."""

from zerosearch.data.qa import (
    DataFormatError,
    QASample,
    build_prompt,
    default_corpus_path,
    default_data_dir,
    example_for,
    load_qa_file,
    load_split,
    resolve_corpus,
)
from zerosearch.data.sampler import PromptSampler
from zerosearch.data.samples import load_samples, order_pairs, swapped_samples, with_prompt_template

__all__ = [
    "DataFormatError",
    "PromptSampler",
    "QASample",
    "build_prompt",
    "default_corpus_path",
    "default_data_dir",
    "example_for",
    "load_qa_file",
    "load_samples",
    "load_split",
    "order_pairs",
    "resolve_corpus",
    "swapped_samples",
    "with_prompt_template",
]

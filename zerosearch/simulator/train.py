"""`zerosearch simulator train`: supervised fine-tuning of the simulation LLM on labelled real searches.

Each record becomes one chat, exactly as `SimulatedSearch` will talk to the served model: an empty system
message and upstream's SFT prompt (`search/templates/simulate_sft_{useful,noisy}.txt`, filled with the
question, the first gold answer and the query) as the user turn; the real engine's documents as
``Doc 1(Title: t) body`` lines as the assistant turn. The loss is on the assistant turn only (TRL's
prompt-completion format). Each document is cut to `max_doc_words` words: the SFT prompt asks for "about
30 words" per document and the served simulator has `search.max_tokens` to write all k of them.

TRL's `SFTTrainer` runs the optimisation (LoRA through peft with ``lora_r > 0``, merged into the weights
at the end so any server loads the folder). Checkpoints go to ``OUT/checkpoints`` and an interrupted run
resumes from the last one; at the end OUT holds the model, its tokenizer and ``simulator.json`` (what it
was trained on), and the checkpoints are removed.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from zerosearch.search import SearchRequest
from zerosearch.search.simulated import fill_template, load_templates
from zerosearch.simulator.records import LABELS, RecordError, docs_text, read_records

logger = logging.getLogger("zerosearch.simulator")
DEFAULT_MAX_DOC_WORDS = 30


class TrainDataError(ValueError):
    """A labelled file that cannot train a simulator; the message says why and how to fix it."""


@dataclass
class TrainSettings:
    epochs: float = 1.0
    max_steps: int = -1
    """Stop after this many optimizer steps (-1: run `epochs`)."""
    lr: float = 5e-5
    batch_size: int = 4
    grad_accum: int = 1
    max_length: int = 1024
    max_doc_words: int = DEFAULT_MAX_DOC_WORDS
    lora_r: int = 0
    """LoRA rank (0: full fine-tuning). LoRA is for models whose optimizer state does not fit."""
    lora_alpha: int = 32
    save_steps: int = 50
    seed: int = 0
    bf16: bool | None = None
    """bfloat16 autocast (None: on when the device supports it, CPUs included)."""
    gradient_checkpointing: bool = True
    """Recompute activations in the backward pass (TRL's default): less memory, ~20 % more time."""
    dtype: str = "float32"
    """The weights' dtype while training (`bfloat16` halves the memory of a large simulator on GPU; the
    optimizer state follows it). Mixed precision is `bf16` either way."""


def sft_prompt(record: dict[str, Any], templates: dict[bool, str]) -> list[dict[str, str]]:
    """The chat `SimulatedSearch` sends in ``sft`` mode for this record's query and label."""
    request = SearchRequest(query=record["query"], question=record["question"],
                            golden_answers=record["golden_answers"], noisy=record["label"] == "noisy")
    user = fill_template(templates[bool(request.noisy)], request, record["topk"], mode="sft")
    return [{"role": "system", "content": ""}, {"role": "user", "content": user}]


def sft_examples(records: list[dict[str, Any]], max_doc_words: int) -> list[dict[str, Any]]:
    """Records -> TRL prompt-completion chats."""
    templates = load_templates("sft")
    return [{"prompt": sft_prompt(r, templates),
             "completion": [{"role": "assistant", "content": docs_text(r["docs"], max_doc_words)}]}
            for r in records]


def load_labelled(path: str | Path) -> list[dict[str, Any]]:
    """The labelled records, checked: known labels, documents present, and both classes."""
    try:
        records = read_records(path, required=("id", "question", "golden_answers", "query", "docs", "topk", "label"))
    except RecordError as exc:
        raise TrainDataError(str(exc)) from None
    bad = [r["id"] for r in records if r["label"] not in LABELS or not r["docs"]]
    if bad:
        raise TrainDataError(f"{path}: records {bad[:3]} have no documents or a label other than {LABELS}; "
                             "write the file with `zerosearch simulator label`")
    counts = Counter(r["label"] for r in records)
    missing = [k for k in LABELS if not counts.get(k)]
    if missing:
        raise TrainDataError(
            f"{path} holds only {'/'.join(k for k in LABELS if counts.get(k)) or 'no'} records ({len(records)}), no "
            f"{missing[0]} ones: a simulator trained on one kind cannot write the other, which the curriculum asks "
            "for. Collect more questions, or label with --judge llm"
        )
    return records


def _bf16_ok() -> bool:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return True  # CPU autocast in bf16: ~2.7x faster on AVX512-BF16 CPUs, correct (slower) elsewhere


def train_simulator(data: str | Path, out: str | Path, model: str = "smollm2-135m-instruct",
                    settings: TrainSettings | None = None) -> dict[str, Any]:
    """Fine-tune `model` on `data`; returns the summary also written to OUT/simulator.json."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.trainer_utils import get_last_checkpoint
    from trl import SFTConfig, SFTTrainer

    from zerosearch.models import resolve_model_path

    s = settings or TrainSettings()
    records = load_labelled(data)
    out = Path(out)
    path = resolve_model_path(model)
    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        raise TrainDataError(f"the tokenizer of {path} has no chat template; the simulation server talks chat, "
                             "so start from an instruct model")
    dataset = Dataset.from_list(sft_examples(records, s.max_doc_words))
    bf16 = _bf16_ok() if s.bf16 is None else s.bf16
    ckpt_dir = out / "checkpoints"
    config = SFTConfig(
        output_dir=str(ckpt_dir), num_train_epochs=s.epochs, max_steps=s.max_steps, learning_rate=s.lr,
        per_device_train_batch_size=s.batch_size, gradient_accumulation_steps=s.grad_accum,
        lr_scheduler_type="cosine", warmup_steps=0.05, weight_decay=0.0,
        logging_steps=min(5, s.max_steps) if s.max_steps > 0 else 5,
        save_strategy="steps", save_steps=s.save_steps, save_total_limit=1, report_to="none",
        max_length=s.max_length, completion_only_loss=True, bf16=bf16, seed=s.seed, dataloader_num_workers=0,
        use_cpu=not torch.cuda.is_available(),
        gradient_checkpointing=s.gradient_checkpointing,
    )
    peft_config = None
    if s.lora_r > 0:
        from peft import LoraConfig

        peft_config = LoraConfig(r=s.lora_r, lora_alpha=s.lora_alpha, lora_dropout=0.05, target_modules="all-linear",
                                 task_type="CAUSAL_LM")
    if s.dtype not in ("float32", "bfloat16", "float16"):
        raise TrainDataError(f"--dtype {s.dtype}: use float32, bfloat16 or float16")
    policy = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, s.dtype))
    trainer = SFTTrainer(model=policy, args=config, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=peft_config)
    resume = get_last_checkpoint(str(ckpt_dir)) if ckpt_dir.is_dir() else None
    if resume:
        logger.info("resuming from %s", resume)
    result = trainer.train(resume_from_checkpoint=resume)
    tuned = trainer.model
    if peft_config is not None:
        tuned = tuned.merge_and_unload()
    tuned.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    summary = {
        "base_model": str(path), "data": str(data), "records": len(records),
        "labels": dict(Counter(r["label"] for r in records)), "settings": asdict(s), "bf16": bf16,
        "steps": trainer.state.global_step, "train_loss": result.training_loss,
        "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
        "wall_s": round(time.perf_counter() - t0, 1), "resumed_from": resume,
    }
    (out / "simulator.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    return summary

"""`zerosearch warmstart`: an optional, separate supervised stage that teaches the policy the tag format
before RL (issue 11 allows it "only as a separate, optional, clearly reported stage").

Each demonstration is one trajectory in exactly the tokens the agent loop would produce for it: the
policy prompt (`data.prompt_template`), a first turn ``<search> QUESTION </search>``, the engine's top-k
documents for that query wrapped as the loop wraps them (`rollout.protocol`), and a last turn
``<answer> GOLD </answer>``. The loss covers the two policy turns only; the prompt and the
``<information>`` block are labelled -100, as the retrieved-token mask does in RL.

Only demonstrations the policy could have produced from what it saw are kept: a gold answer appears in
the retrieved documents (the answer is extracted, not recalled) or in the question itself ("which of A or
B"). The documents come from `search.engine` (BM25 over the bundled corpus on the CPU default) for the
*training* questions; the held-out questions are never searched here. TRL's `SFTTrainer` runs the
optimisation; the output is an HF folder that `MODEL_PATH DIR` trains from.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

from zerosearch.config import Config
from zerosearch.rewards import normalize_answer
from zerosearch.rollout.copying import answer_in_question
from zerosearch.rollout.loop import INFORMATION_PREFIX, INFORMATION_SUFFIX, chat_turn_wrap, encode_prompt
from zerosearch.search import SearchRequest

logger = logging.getLogger("zerosearch.warmstart")
SUMMARY_FILE = "warmstart.json"


def _pick_answer(golden: list[str], documents: str, question: str) -> tuple[str | None, bool]:
    """The gold answer the demonstration writes: the first one found in the documents, else in the question;
    and whether it came from the documents (the whole-word match of `rewards.retrieval_hit`)."""
    wanted = [(g, normalize_answer(g)) for g in golden]
    for in_docs, haystack in ((True, documents), (False, question)):
        text = f" {normalize_answer(haystack)} "
        for g, norm in wanted:
            if norm and f" {norm} " in text:
                return g, in_docs
    return None, False


def demonstration(tokenizer, prompt: list[dict], query: str | None, documents: str, answer: str,
                  protocol: str = "inline", max_obs_length: int = 500) -> dict[str, list[int]]:
    """One trajectory as token ids and labels (-100 on the prompt and the observation); `query` None: the
    answer alone, as a policy without search writes it."""
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False)
    prompt_ids = encode_prompt(tokenizer, prompt)
    if query is None:
        answer_ids = encode(f"<answer> {answer} </answer>")
        return {"input_ids": prompt_ids + answer_ids, "labels": [-100] * len(prompt_ids) + answer_ids}
    search_ids = encode(f"<search> {query} </search>")
    answer_ids = encode(f"<answer> {answer} </answer>")
    prefix, suffix = INFORMATION_PREFIX, INFORMATION_SUFFIX
    open_ids: list[int] = []
    close_ids: list[int] = []
    if protocol == "chat":
        before, after = chat_turn_wrap(tokenizer)
        open_ids, close_ids = encode(before), encode(after)
        prefix, suffix = prefix.strip(), suffix.strip()
    obs_ids = open_ids + encode(prefix) + encode(documents)[:max_obs_length] + encode(suffix) + close_ids
    input_ids = prompt_ids + search_ids + obs_ids + answer_ids
    labels = [-100] * len(prompt_ids) + search_ids + [-100] * len(obs_ids) + answer_ids
    return {"input_ids": input_ids, "labels": labels}


def build_demonstrations(cfg: Config, samples, search, tokenizer) -> tuple[list[dict], dict[str, int]]:
    """Search each training question with `search` and keep the answerable ones (module docstring)."""
    requests = [SearchRequest(query=s.question, question=s.question, golden_answers=list(s.golden_answers))
                for s in samples]
    results = search.search(requests)
    demos, counts = [], Counter()
    for sample, result in zip(samples, results):
        answer, in_docs = _pick_answer(list(sample.golden_answers), result.text, sample.question)
        counts["searched"] += 1
        if answer is None:
            counts["dropped_no_answer_seen"] += 1
            continue
        counts["kept_answer_in_documents" if in_docs else "kept_answer_in_question"] += 1
        if answer_in_question(sample.question, sample.golden_answers):
            counts["kept_named"] += 1
        query = sample.question if cfg.warmstart.search else None
        demo = demonstration(tokenizer, sample.prompt, query, result.text, answer,
                             cfg.rollout.protocol, cfg.rollout.max_obs_length)
        demos.append({**demo, "question": sample.question, "answer": answer, "data_source": sample.data_source})
    return demos, dict(counts)


def _demonstrations(cfg: Config, tokenizer) -> tuple[list[dict], dict[str, int]]:
    """At most `warmstart.num_samples` demonstrations from the training split, searched with `search.engine`."""
    from zerosearch.rollout.factory import load_samples
    from zerosearch.search import build_search_backend

    samples = load_samples(cfg, cfg.data.train_split)
    engine = cfg.search.engine
    options = {"retriever_url": cfg.search.retriever_url} if cfg.search.retriever_url else {"corpus": cfg.search.corpus}
    search = build_search_backend(engine, topk=cfg.search.topk, **(options if engine == "wiki" else {}))
    try:
        demos, counts = build_demonstrations(cfg, samples, search, tokenizer)
    finally:
        search.close()
    if not demos:
        raise ValueError(f"no training question of {cfg.data.path} has a gold answer in its {engine} documents or "
                         "in the question; warm-start needs an engine that can answer the training questions")
    random.Random(cfg.trainer.seed).shuffle(demos)
    return demos[: cfg.warmstart.num_samples], counts


def warm_start(cfg: Config, out: str | Path) -> dict[str, Any]:
    """Build demonstrations from the training split and fine-tune `model.path` on them into `out`, as
    `cfg.warmstart` says; returns the summary also written to `out/warmstart.json`."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from zerosearch.models import resolve_model_path

    s = cfg.warmstart
    out = Path(out)
    t0 = time.perf_counter()
    path = resolve_model_path(cfg.model.path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    demos, counts = _demonstrations(cfg, tokenizer)
    engine = cfg.search.engine
    build_s = time.perf_counter() - t0
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "demonstrations.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"question": d["question"], "answer": d["answer"], "data_source": d["data_source"],
                                "text": tokenizer.decode(d["input_ids"])}, ensure_ascii=False) + "\n" for d in demos)
    dataset = Dataset.from_list([{"input_ids": d["input_ids"], "labels": d["labels"]} for d in demos])
    ckpt_dir = out / "checkpoints"
    config = SFTConfig(
        output_dir=str(ckpt_dir), num_train_epochs=s.epochs, learning_rate=s.lr,
        per_device_train_batch_size=s.batch_size, lr_scheduler_type="cosine", warmup_steps=0.1,
        logging_steps=1, save_strategy="no", report_to="none", max_length=cfg.rollout.max_total_length,
        bf16=cfg.model.autocast_dtype == "bfloat16", seed=cfg.trainer.seed, dataloader_num_workers=0,
        use_cpu=not torch.cuda.is_available(),
        # the stage runs alone, before the workers start: the memory checkpointing saves is not needed
        gradient_checkpointing=False,
    )
    policy = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    trainer = SFTTrainer(model=policy, args=config, train_dataset=dataset, processing_class=tokenizer)
    result = trainer.train()
    trainer.model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    summary = {
        "base_model": str(path), "engine": engine, "data": str(cfg.data.path), "prompt_template": cfg.data.prompt_template,
        "protocol": cfg.rollout.protocol, "candidates": counts, "demonstrations": len(demos),
        "sources": dict(Counter(d["data_source"] for d in demos)), "settings": asdict(s),
        "seed": cfg.trainer.seed, "steps": trainer.state.global_step, "train_loss": result.training_loss,
        "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
        "build_s": round(build_s, 1), "wall_s": round(time.perf_counter() - t0, 1),
    }
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    return summary

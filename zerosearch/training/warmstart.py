"""`zerosearch warmstart`: an optional, separate supervised stage that teaches the policy the tag format
before RL (issue 11 allows it "only as a separate, optional, clearly reported stage").

Each demonstration is one trajectory in exactly the tokens the agent loop would produce for it: the
policy prompt (`data.prompt_template`), a first turn ``<search> QUESTION </search>``, the engine's top-k
documents for that query wrapped as the loop wraps them (`rollout.protocol`), and a last turn
``<answer> GOLD </answer>``. The loss covers the two policy turns only; the prompt and the
``<information>`` block are labelled -100, as the retrieved-token mask does in RL.

Only demonstrations the policy could have produced from what it saw are kept: a gold answer appears in
the retrieved documents (the answer is extracted, not recalled) or in the question itself ("which of A or
B"). With `warmstart.two_hop`, a question whose first documents miss the answer gets a second search: for
each name the first documents mention and the question does not (the bridge of a two-hop question, e.g. the
director of the film asked about), the name is searched, and the first whose documents hold a gold answer
makes a demonstration with two searches (``<search> QUESTION </search>``, documents, ``<search> NAME
</search>``, documents, answer). With `warmstart.compare_options`, a "which of A or B" question whose gold answer is
one of its options searches each option instead (``<search> A </search>``, documents, ``<search> B </search>``,
documents, the gold option): the comparison's procedure, which a bridge's second search is not. The documents come from `search.engine` (BM25 over the bundled corpus on the CPU default) for the
*training* questions; the held-out questions are never searched here. TRL's `SFTTrainer` runs the
optimisation; the output is an HF folder that `MODEL_PATH DIR` trains from.
"""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

from zerosearch.config import Config
from zerosearch.rewards import normalize_answer
from zerosearch.rollout.copying import answer_in_question, gold_option, swap_options
from zerosearch.rollout.loop import INFORMATION_PREFIX, INFORMATION_SUFFIX, chat_turn_wrap, encode_prompt
from zerosearch.search import SearchRequest
from zerosearch.simulator.records import docs_from_text

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


def demonstration(tokenizer, prompt: list[dict], searches: list[tuple[str, str]], answer: str,
                  protocol: str = "inline", max_obs_length: int = 500) -> dict[str, list[int]]:
    """One trajectory as token ids and labels (-100 on the prompt and the observations): a search turn per
    ``(query, documents)`` of `searches`, then the answer; no searches: the answer alone, as a policy without
    search writes it."""
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False)
    prompt_ids = encode_prompt(tokenizer, prompt)
    prefix, suffix = INFORMATION_PREFIX, INFORMATION_SUFFIX
    open_ids: list[int] = []
    close_ids: list[int] = []
    if protocol == "chat":
        before, after = chat_turn_wrap(tokenizer)
        open_ids, close_ids = encode(before), encode(after)
        prefix, suffix = prefix.strip(), suffix.strip()
    input_ids, labels = list(prompt_ids), [-100] * len(prompt_ids)
    for query, documents in searches:
        search_ids = encode(f"<search> {query} </search>")
        obs_ids = open_ids + encode(prefix) + encode(documents)[:max_obs_length] + encode(suffix) + close_ids
        input_ids += search_ids + obs_ids
        labels += search_ids + [-100] * len(obs_ids)
    answer_ids = encode(f"<answer> {answer} </answer>")
    return {"input_ids": input_ids + answer_ids, "labels": labels + answer_ids}


_SENTENCE_END = re.compile(r"(?<=\w\w)[.!?;](?=\s)|[,()\[\]\"]")
_NAME = re.compile(r"[A-Z][\w'\u2019.-]*(?:\s+(?:(?:of|de|da|del|von|van|der|la|le|du|bin|al)\s+)*[A-Z][\w'\u2019.-]*)+")
_DOC_HEADER = re.compile(r"Doc \d+\s*\(Title:")


def bridge_names(documents: str, question: str, limit: int = 6) -> list[str]:
    """Names (two or more capitalised words) that `documents` mention and `question` does not, in order of
    appearance: the candidates for a two-hop question's second search."""
    asked = f" {normalize_answer(question)} "
    names: list[str] = []
    for piece in _SENTENCE_END.split(_DOC_HEADER.sub(" ", documents)):
        for name in _NAME.findall(piece):
            name = name.strip(" .-")
            norm = normalize_answer(name)
            if len(norm.split()) >= 2 and f" {norm} " not in asked and name not in names:
                names.append(name)
    return names[:limit]


def build_demonstrations(cfg: Config, samples, search, tokenizer) -> tuple[list[dict], dict[str, int]]:
    """Search each training question with `search` and keep the answerable ones (module docstring)."""
    requests = [SearchRequest(query=s.question, question=s.question, golden_answers=list(s.golden_answers))
                for s in samples]
    results = search.search(requests)
    second = _second_searches(cfg, samples, results, search) if cfg.warmstart.two_hop and cfg.warmstart.search else {}
    compared = _option_searches(samples, search) if cfg.warmstart.compare_options and cfg.warmstart.search else {}
    demos, counts = [], Counter()
    for i, (sample, result) in enumerate(zip(samples, results)):
        answer, in_docs = _pick_answer(list(sample.golden_answers), result.text, sample.question)
        searches = [(sample.question, result.text)]
        counts["searched"] += 1
        if i in compared:
            answer, searches = compared[i]
            counts["kept_compare_options"] += 1
        elif (answer is None or not in_docs) and i in second:
            answer, name, documents = second[i]
            searches.append((name, documents))
            counts["kept_two_searches"] += 1
        elif answer is None:
            counts["dropped_no_answer_seen"] += 1
            continue
        else:
            counts["kept_answer_in_documents" if in_docs else "kept_answer_in_question"] += 1
        if answer_in_question(sample.question, sample.golden_answers):
            counts["kept_named"] += 1
        demo = demonstration(tokenizer, sample.prompt, searches if cfg.warmstart.search else [], answer,
                             cfg.rollout.protocol, cfg.rollout.max_obs_length)
        demos.append({**demo, "question": sample.question, "answer": answer, "data_source": sample.data_source})
    return demos, dict(counts)


def _second_searches(cfg: Config, samples, results, search) -> dict[int, tuple[str, str, str]]:
    """For each question whose first documents miss every gold answer and whose answer the question does not
    name: the first bridge name whose documents hold a gold answer -> (answer, name, documents)."""
    wanted: list[tuple[int, str]] = []
    for i, (sample, result) in enumerate(zip(samples, results)):
        golden = list(sample.golden_answers)
        # yes/no questions are comparisons: a second search for "no" would be a chance match
        if (answer_in_question(sample.question, golden) or _pick_answer(golden, result.text, "")[0] is not None
                or {normalize_answer(g) for g in golden} & {"yes", "no"}):
            continue
        wanted += [(i, name) for name in bridge_names(result.text, sample.question)]
    found = search.search([SearchRequest(query=name, question=samples[i].question,
                                         golden_answers=list(samples[i].golden_answers)) for i, name in wanted])
    second: dict[int, tuple[str, str, str]] = {}
    for (i, name), result in zip(wanted, found):
        # the name's own page, first, holds the answer: a chance match in some other document is not a hop
        top = docs_from_text(result.text, topk=1)
        if not top or i in second:
            continue
        answer, _ = _pick_answer(list(samples[i].golden_answers), top[0]["text"], "")
        if answer is not None and f" {normalize_answer(name)} " in f" {normalize_answer(top[0]['title'])} ":
            second[i] = (answer, name, result.text)
    return second


def _option_searches(samples, search) -> dict[int, tuple[str, list[tuple[str, str]]]]:
    """For each "which of A or B" question whose gold answer is one of its options: (that option, the search of each
    option with its documents, in the question's order)."""
    wanted: list[tuple[int, str, str, str]] = []
    for i, sample in enumerate(samples):
        right = gold_option(sample.question, sample.golden_answers)
        if right is not None:
            wanted.append((i, right, *swap_options(sample.question)[1:]))
    found = search.search([SearchRequest(query=option, question=samples[i].question,
                                         golden_answers=list(samples[i].golden_answers))
                           for i, _, a, b in wanted for option in (a, b)])
    return {i: (right, [(a, found[2 * k].text), (b, found[2 * k + 1].text)])
            for k, (i, right, a, b) in enumerate(wanted)}


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

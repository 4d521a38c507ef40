"""The QA samples a command runs on, chosen by the config: a split of `data.path`, the training split narrowed
to `data.train_sources`, `data.train_questions` and `data.train_named_share`, the prompts rebuilt from `data.prompt_template`."""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING

from zerosearch.data.qa import QASample, build_prompt, load_split

if TYPE_CHECKING:
    from zerosearch.config import Config

logger = logging.getLogger("zerosearch.data")


def load_samples(cfg: Config, split: str) -> list[QASample]:
    """A split of `data.path`, with prompts rebuilt from `data.prompt_template` when it is set; the training
    split keeps only `data.train_sources` when that is set."""
    samples = load_split(cfg.data.path, split)
    sources = cfg.data.train_sources
    if sources and split == cfg.data.train_split:
        found = {s.data_source for s in samples}
        if set(sources) & found:
            samples = [s for s in samples if s.data_source in sources]
        else:  # other data than the sources were chosen for: keep it whole, and say so
            logger.warning("data.train_sources=%s matches no row of the %r split of %s (its sources: %s); "
                           "training on all of it. Set data.train_sources=[] to silence this.", list(sources), split,
                           cfg.data.path, sorted(found))
    if cfg.data.train_questions != "all" and split == cfg.data.train_split:
        from zerosearch.config import ConfigError
        from zerosearch.rollout.copying import answer_guessable

        named = cfg.data.train_questions == "named"
        samples = [s for s in samples if answer_guessable(s.question, s.golden_answers) == named]
        if not samples:
            raise ConfigError(f"data.train_questions={cfg.data.train_questions}: no question of the "
                             f"{split!r} split of {cfg.data.path} is of that kind; set data.train_questions=all")
    if cfg.data.train_named_share is not None and split == cfg.data.train_split:
        samples = with_named_share(samples, cfg.data.train_named_share)
    if cfg.data.prompt_template:
        for sample in samples:
            sample.prompt = build_prompt(sample.question, cfg.data.prompt_template)
    if cfg.data.train_both_orders and split == cfg.data.train_split:
        first = max((s.index for s in samples), default=-1) + 1
        samples += [dataclasses.replace(s, index=first + k) for k, s in enumerate(swapped_samples(samples))]
    return samples


def with_named_share(samples: list[QASample], share: float) -> list[QASample]:
    """Every open question of `samples` and a random subset (seed 0) of the named ones, as many as make `share` of
    the result (`data.train_named_share`), in their order. All of the named ones when there are too few."""
    import random

    from zerosearch.rollout.copying import answer_guessable

    is_named = [answer_guessable(s.question, s.golden_answers) for s in samples]
    named = [k for k, flag in enumerate(is_named) if flag]
    n_open = len(samples) - len(named)
    want = round(share * n_open / (1.0 - share))
    if want > len(named):
        logger.warning("data.train_named_share=%s wants %d named questions beside the %d open ones; the split has "
                       "%d, keeping them all (share %.2f)", share, want, n_open, len(named),
                       len(named) / max(len(samples), 1))
        return samples
    keep = set(random.Random(0).sample(named, want))
    out = [s for k, s in enumerate(samples) if k in keep or not is_named[k]]
    logger.info("data.train_named_share=%s: training on %d open and %d of %d named questions", share, n_open,
                want, len(named))
    return out


def order_pairs(samples: list[QASample]) -> list[tuple[int, int]]:
    """Positions (i, j), i < j, of each "…, A or B?" question and its "…, B or A?" copy in `samples`
    (`data.train_both_orders`), for `data.pair_orders`: each copy names its question by position
    (`extra_info["swap_of"]`, set by `swapped_samples`), so the pairs are disjoint by construction, a question
    asked twice in the split included (each of its rows has its own copy)."""
    pairs = []
    for j, s in enumerate(samples):
        i = s.extra_info.get("swap_of")
        if i is None:
            continue
        if not (isinstance(i, int) and 0 <= i < j):
            raise ValueError(f"sample {j} ({s.question!r}) says it is the swapped copy of sample {i}, which is not "
                             "an earlier position of this list; build the list as load_samples does")
        pairs.append((i, j))
    return pairs


def swapped_samples(samples: list[QASample]) -> list[QASample]:
    """The "…, A or B?" questions whose gold answer is A or B, asked "…, B or A?" (the same prompt with the question
    in it swapped; `copying.swapped_question`). Others are left out. Each copy records the position in `samples` of
    the question it was made from (`extra_info["swap_of"]`), which `order_pairs` reads."""
    from zerosearch.rollout.copying import swapped_question

    out = []
    for k, s in enumerate(samples):
        question = swapped_question(s.question, s.golden_answers)
        if question is not None:
            prompt = [{**m, "content": m["content"].replace(s.question, question)} for m in s.prompt]
            out.append(dataclasses.replace(s, question=question, prompt=prompt,
                                           extra_info={**s.extra_info, "swap_of": k}))
    return out


def with_prompt_template(samples: list[QASample], template: str) -> list[QASample]:
    """Copies of `samples` whose prompts are rebuilt from `template` (`data.prompt_template`); as they are
    when it is empty (each data file's own prompt)."""
    if not template:
        return samples
    return [dataclasses.replace(s, prompt=build_prompt(s.question, template)) for s in samples]

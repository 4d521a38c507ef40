"""The batched multi-turn agent loop.

Every trajectory moves on its own: as soon as one turn's generation finishes, its action is
parsed; a search goes to the backend at once (all queries in flight together, on a thread
pool), an answer ends the trajectory, anything else gets the invalid-action feedback. When a
search returns, the documents are appended as observation tokens (mask 0) and the next turn is
submitted to the engine while other trajectories are still generating, so the engine stays full
even as the batch thins out in later turns.

Turns follow upstream: up to `max_turns` action turns, then one last generation in which a
search is no longer executed (finish reason `max_turns` unless it answers).

Two protocols (`rollout.protocol`): `inline`, upstream's, appends the `<information>` block (and the
invalid-action feedback) inside the one assistant message the policy keeps writing, as a base model
expects; `chat` closes the assistant turn, returns the block as a new user turn of the chat template and
opens the next assistant turn, as verl's tool agent loop does for instruct models. Either way the added
tokens are observation tokens (mask 0).

A search that fails (a SearchError: the backend's retries are spent, or its reply was malformed) ends
that trajectory with finish reason `error`; the batch goes on. Only when more than
`max_search_error_share` of the batch's searches fail does `run` raise, with the first error (which names
the server and how to start it).
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

from zerosearch.config import ROLLOUT_PROTOCOLS as PROTOCOLS
from zerosearch.config import RolloutConfig
from zerosearch.rewards import (
    FOLLOW_UP_SHARE,
    new_name_share,
    query_in_question,
    query_overlap,
    query_support,
    retrieval_hit,
)
from zerosearch.rollout.copying import answer_guessable
from zerosearch.rollout.engines import Generation, PolicyEngine, SamplingSpec
from zerosearch.rollout.parser import parse_action
from zerosearch.rollout.self_search import SelfSimulation
from zerosearch.rollout.trajectory import Trajectory
from zerosearch.search import SearchBackend, SearchError, SearchRequest, SearchResult
from zerosearch.search.http import HttpBackend
from zerosearch.search.hybrid import HybridSearch

logger = logging.getLogger("zerosearch.rollout")
TEMPLATES = Path(__file__).resolve().parent / "templates"
INVALID_ACTION_TEXT = (TEMPLATES / "invalid_action.txt").read_text()
INFORMATION_PREFIX, INFORMATION_SUFFIX = (TEMPLATES / "information.txt").read_text().split("{documents}")


@dataclass(frozen=True)
class LoopSettings:
    """What the loop reads: the rollout section of the config (turns, lengths, protocol) and a few fields of others."""

    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """`max_turns` (action turns before the last, search-free one), `max_response_length` (tokens per turn),
    `max_obs_length` (documents are cut to it), `max_total_length` (prompt + response) and `protocol`."""
    max_prompt_length: int = 4096
    """Longer prompts are an error naming the sample (`data.max_prompt_length`)."""
    search_concurrency: int = 64
    """Most search calls in flight at once (`search.concurrency`)."""
    max_search_error_share: float = 0.2
    """`run` raises when more than this share of a batch's searches fail; fewer end only their trajectories."""
    min_query_overlap: float = 0.0
    """A query whose content words overlap the question's less than this (`rewards.query_overlap`), and which
    is not a follow-up drawn from the documents already retrieved (`rewards.query_support`), gets noisy
    documents from a simulated engine (0 = off, as upstream; `search.min_query_overlap`)."""
    gate_question_words: bool = False
    """The gate also passes a query made only of the question's content words (`search.gate_question_words`)."""
    two_hop: bool = False
    """For a question whose answer it does not name, the simulator gets the gold answer only for a follow-up query
    that names what the documents gave (`rewards.new_name_share` >= 0.5; `search.two_hop`)."""


@dataclass
class LoopStats:
    wall_s: float = 0.0
    generation_s: float = 0.0
    """Wall time during which at least one generation was running."""
    engine_s: float = 0.0
    """Wall time spent inside the engine's `poll` (a part of `generation_s`)."""
    search_wait_s: float = 0.0
    """Wall time the engine sat idle waiting for search results."""
    policy_tokens: int = 0
    obs_tokens: int = 0
    queries: int = 0
    search_errors: int = 0
    """Searches that failed; each ended its trajectory with finish reason `error`."""
    first_search_error: str = ""
    max_queries_in_flight: int = 0
    search_latency_s: list[float] = field(default_factory=list)

    def metrics(self) -> dict[str, float]:
        overhead = max(self.wall_s - self.generation_s - self.search_wait_s, 0.0)
        lat = sorted(self.search_latency_s)
        return {
            "rollout/wall_s": self.wall_s,
            "rollout/generation_s": self.generation_s,
            "rollout/engine_s": self.engine_s,
            "rollout/search_wait_s": self.search_wait_s,
            "rollout/overhead_share": overhead / self.wall_s if self.wall_s else 0.0,
            "rollout/policy_tokens": float(self.policy_tokens),
            "rollout/obs_tokens": float(self.obs_tokens),
            "rollout/gen_tokens_per_s": self.policy_tokens / self.generation_s if self.generation_s else 0.0,
            "rollout/queries": float(self.queries),
            "rollout/search_errors": float(self.search_errors),
            "rollout/max_queries_in_flight": float(self.max_queries_in_flight),
            "rollout/search_latency_p50_s": lat[len(lat) // 2] if lat else 0.0,
        }


def chat_turn_wrap(tokenizer) -> tuple[str, str]:
    """The chat template's text between an assistant message and a following user message's content, and
    between that content and the next generation prompt: what `chat` wraps an observation in."""
    marker_a, marker_u = "\x00A\x00", "\x00U\x00"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": marker_a},
         {"role": "user", "content": marker_u}], add_generation_prompt=True, tokenize=False)
    if marker_a not in text or marker_u not in text:
        raise ValueError("rollout.protocol=chat needs a chat template that renders assistant and user turns")
    between = text.split(marker_a, 1)[1]
    before, after = between.split(marker_u, 1)
    return before, after


def encode_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """Chat messages -> prompt token ids, ending with the assistant generation prompt."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return list(ids)


@dataclass
class _Batch:
    """What one `AgentLoop.run` call tracks: its trajectories, draws, counters and searches in flight."""

    trajs: list[Trajectory]
    sampling: SamplingSpec
    p_noisy: float
    noise_seed: int
    uid_offset: int
    progress: object = None
    stats: LoopStats = field(default_factory=LoopStats)
    pending: dict[Future, tuple[Trajectory, float]] = field(default_factory=dict)
    self_searches: dict[str, tuple[Trajectory, SearchRequest, float, int]] = field(default_factory=dict)
    """`simulate_self` searches in the policy's engine: request id -> (trajectory, request, sent, prompt tokens)."""


class AgentLoop:
    """Runs trajectories for a batch of prompts through one engine and one search backend."""

    def __init__(self, engine: PolicyEngine, search: SearchBackend, tokenizer, settings: LoopSettings):
        self.engine, self.search, self.tokenizer, self.settings = engine, search, tokenizer, settings
        if settings.rollout.protocol not in PROTOCOLS:
            raise ValueError(f"rollout.protocol must be one of {PROTOCOLS}, got {settings.rollout.protocol!r}")
        encode = lambda text: tokenizer.encode(text, add_special_tokens=False)
        self._invalid_ids = encode(INVALID_ACTION_TEXT)
        self._info_prefix_ids = encode(INFORMATION_PREFIX)
        self._info_suffix_ids = encode(INFORMATION_SUFFIX)
        self._turn_open_ids: list[int] = []
        self._turn_close_ids: list[int] = []
        self._eos_id = tokenizer.eos_token_id
        if settings.rollout.protocol == "chat":
            before, after = chat_turn_wrap(tokenizer)
            self._turn_open_ids = encode(before)
            self._turn_close_ids = encode(after)
            self._invalid_ids = encode(INVALID_ACTION_TEXT.strip())
            self._info_prefix_ids = encode(INFORMATION_PREFIX.strip())
            self._info_suffix_ids = encode(INFORMATION_SUFFIX.strip())
        self._pool = ThreadPoolExecutor(max_workers=settings.search_concurrency, thread_name_prefix="search")

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    # --- one batch ---------------------------------------------------------------------------

    def run(self, samples, n: int, sampling: SamplingSpec, p_noisy: float, noise_seed: int = 0,
            progress=None, uid_offset: int = 0) -> tuple[list[Trajectory], LoopStats]:
        """Roll out `n` trajectories per sample (`QASample`s); returns them in sample order.

        `uid_offset`: the batch-wide index of this call's first trajectory (a data-parallel rank's first
        prompt times `n`). Noise draws and sampling seeds are keyed on `uid_offset + uid`, so every
        trajectory gets its own draws, the same whatever the number of ranks the batch is split over.
        All per-batch state lives in a `_Batch`, so the loop keeps nothing from one `run` to the next.
        """
        batch = _Batch(self._trajectories(samples, n), sampling, p_noisy, noise_seed, uid_offset, progress)
        if isinstance(self.search, HybridSearch):
            self.search.begin_step()  # its per-step budget of real queries is per batch
        start = time.perf_counter()
        for traj in batch.trajs:
            self._submit_turn(batch, traj)
        self._drive(batch)
        stats, trajs = batch.stats, batch.trajs
        stats.wall_s = time.perf_counter() - start
        unfinished = [t.uid for t in trajs if not t.done]
        assert not unfinished, f"agent loop ended with unfinished trajectories {unfinished[:5]}"
        share = self.settings.max_search_error_share
        if stats.search_errors > share * stats.queries:
            raise SearchError(
                f"{stats.search_errors} of {stats.queries} searches of this batch failed, more than "
                f"search.max_error_share={share:g} allows, so the run stops. First error: {stats.first_search_error}"
            )
        stats.policy_tokens = sum(t.num_policy_tokens for t in trajs)
        stats.obs_tokens = sum(len(t.loss_mask) - t.num_policy_tokens for t in trajs)
        return trajs, stats

    def _trajectories(self, samples, n: int) -> list[Trajectory]:
        trajs = []
        for group, sample in enumerate(samples):
            prompt_ids = encode_prompt(self.tokenizer, sample.prompt)
            if len(prompt_ids) > self.settings.max_prompt_length:
                raise ValueError(
                    f"prompt of sample {sample.index} ({sample.data_source}) has {len(prompt_ids)} tokens, more than "
                    f"data.max_prompt_length={self.settings.max_prompt_length}; raise it or shorten the question"
                )
            for _ in range(n):
                trajs.append(Trajectory(len(trajs), group, sample.question, list(sample.golden_answers), prompt_ids))
        return trajs

    def _drive(self, batch: _Batch) -> None:
        """Poll the engine and collect search results until every trajectory has finished."""
        stats, pending = batch.stats, batch.pending
        while self.engine.has_unfinished() or pending:
            if self.engine.has_unfinished():
                t0 = time.perf_counter()
                finished = self.engine.poll()
                stats.engine_s += time.perf_counter() - t0
                for request_id, generation in finished:
                    if request_id in batch.self_searches:
                        self._on_self_search(batch, request_id, generation)
                    else:
                        self._on_generation(batch, batch.trajs[int(request_id.split("/")[0])], generation)
                done = [f for f in pending if f.done()]
                # the whole iteration counts as generation time: a generation was running throughout
                stats.generation_s += time.perf_counter() - t0
            else:
                t0 = time.perf_counter()
                done, _ = wait(list(pending), return_when=FIRST_COMPLETED)
                stats.search_wait_s += time.perf_counter() - t0
            for future in done:
                traj, sent = pending.pop(future)
                stats.search_latency_s.append(time.perf_counter() - sent)
                try:
                    result = future.result()[0]
                except SearchError as exc:  # the server's fault, not the policy's: end this trajectory only
                    self._on_search_error(batch, traj, exc)
                    continue
                self._on_search_result(batch, traj, result)

    # --- events ------------------------------------------------------------------------------

    def _budget(self, traj: Trajectory) -> int:
        return self.settings.rollout.max_total_length - len(traj.prompt_ids) - len(traj.response_ids)

    def _submit_turn(self, batch: _Batch, traj: Trajectory) -> None:
        budget = self._budget(traj)
        if budget <= 0:
            return self._finish(batch, traj, "length")
        sampling = dataclasses.replace(
            batch.sampling,
            max_tokens=min(self.settings.rollout.max_response_length, budget),
            seed=None if batch.sampling.seed is None else
            batch.sampling.seed + (batch.uid_offset + traj.uid) * 1009 + traj.turns,
        )
        self.engine.submit(f"{traj.uid}/{traj.turns}", traj.prompt_ids + traj.response_ids, sampling)

    def _on_generation(self, batch: _Batch, traj: Trajectory, gen: Generation) -> None:
        traj.append_policy(gen.token_ids)
        traj.turns += 1
        action = parse_action(gen.text)
        if action.kind == "answer":
            traj.answer = action.content
            return self._finish(batch, traj, "answer")
        if traj.turns > self.settings.rollout.max_turns:
            return self._finish(batch, traj, "max_turns")
        if self._budget(traj) <= 0:
            return self._finish(batch, traj, "length")
        if action.kind == "search":
            return self._search(batch, traj, action.content)
        traj.num_invalid += 1
        traj.append_observation(self._wrap(traj, self._invalid_ids))
        self._submit_turn(batch, traj)

    def _search(self, batch: _Batch, traj: Trajectory, query: str) -> None:
        traj.num_searches += 1
        # One draw per (seed, trajectory, search): reproducible whatever order searches finish in, and
        # keyed on the batch-wide index so that trajectory i of each rank does not share rank 0's draws.
        key = f"{batch.noise_seed}/{batch.uid_offset + traj.uid}/{traj.num_searches}"
        noisy = random.Random(key).random() < batch.p_noisy
        gate, retrieved = self.settings.min_query_overlap, " ".join(traj.documents)
        if gate > 0 and not noisy and query_overlap(query, traj.question) < gate and (
                query_support(query, retrieved) < gate) and not (  # nor a name the documents gave
                self.settings.gate_question_words and query_in_question(query, traj.question)):  # nor an option
            noisy = True  # the simulator would write useful documents from the gold answer whatever the query
            traj.off_topic += 1
        hold = self.settings.two_hop and not noisy and answer_held_back(query, traj.question, traj.golden_answers,
                                                                        retrieved)
        traj.held_flags.append(hold)
        traj.noisy_flags.append(noisy)
        traj.queries.append(query)
        request = SearchRequest(query=query, question=traj.question, golden_answers=traj.golden_answers, noisy=noisy,
                                hold_answer=hold)
        batch.stats.queries += 1
        if isinstance(self.search, SelfSimulation):  # the policy's engine writes the documents: no server
            request_id = f"{traj.uid}/{traj.turns}/search"
            prompt_ids = self.search.prompt_ids(self.tokenizer, request)
            seed = batch.sampling.seed
            seed = None if seed is None else seed + 7919 * (batch.uid_offset + traj.uid) + traj.turns
            batch.self_searches[request_id] = (traj, request, time.perf_counter(), len(prompt_ids))
            self.search.submitted()
            self.engine.submit(request_id, prompt_ids, self.search.sampling(seed))
            return
        if isinstance(self.search, HttpBackend):  # its own event loop keeps requests in flight: no thread each
            future = self.search.submit([request])
        else:  # in-process BM25 or a composite: a thread of the pool
            future = self._pool.submit(self.search.search, [request])
        batch.pending[future] = (traj, time.perf_counter())
        batch.stats.max_queries_in_flight = max(batch.stats.max_queries_in_flight, len(batch.pending))

    def _wrap(self, traj: Trajectory, ids: list[int]) -> list[int]:
        """An observation as the protocol adds it: as is (`inline`), or as a user turn (`chat`), without a
        second end-of-turn token when the policy's turn already ended with one."""
        if self.settings.rollout.protocol == "inline":
            return ids
        open_ids = self._turn_open_ids
        if open_ids and traj.response_ids and traj.response_ids[-1] == self._eos_id == open_ids[0]:
            open_ids = open_ids[1:]
        return open_ids + ids + self._turn_close_ids

    def _on_self_search(self, batch: _Batch, request_id: str, generation: Generation) -> None:
        traj, request, sent, prompt_tokens = batch.self_searches.pop(request_id)
        batch.stats.search_latency_s.append(time.perf_counter() - sent)
        self._on_search_result(batch, traj, self.search.result(request, generation, prompt_tokens))

    def _on_search_result(self, batch: _Batch, traj: Trajectory, result: SearchResult) -> None:
        if result.noisy is None and traj.noisy_flags:
            traj.noisy_flags[-1] = None  # a real search engine: no useful/noisy split
        doc_ids = self.tokenizer.encode(result.text, add_special_tokens=False)
        document = result.text
        if len(doc_ids) > self.settings.rollout.max_obs_length:
            doc_ids = doc_ids[: self.settings.rollout.max_obs_length]
            traj.obs_truncated += 1
            document = self.tokenizer.decode(doc_ids)  # only what the policy saw can count as retrieved
        traj.documents.append(document)
        traj.append_observation(self._wrap(traj, self._info_prefix_ids + doc_ids + self._info_suffix_ids))
        self._submit_turn(batch, traj)

    def _on_search_error(self, batch: _Batch, traj: Trajectory, exc: SearchError) -> None:
        stats = batch.stats
        stats.search_errors += 1
        # the whole message once per batch: a dead server fails every search with the same long hint
        log = logger.debug if stats.first_search_error else logger.warning
        stats.first_search_error = stats.first_search_error or str(exc)
        log("search for trajectory %d failed; it ends with finish reason 'error' (counted in "
            "rollout/search_errors): %s", traj.uid, exc)
        traj.error = str(exc)
        self._finish(batch, traj, "error")

    def _finish(self, batch: _Batch, traj: Trajectory, reason: str) -> None:
        traj.finish_reason = reason
        traj.response_text = self.tokenizer.decode(traj.response_ids, skip_special_tokens=False)
        if batch.progress is not None:
            batch.progress.update(1)


def answer_held_back(query: str, question: str, golden_answers: list[str], retrieved: str) -> bool:
    """Two-hop simulation (`LoopSettings.two_hop`): whether a useful search gets documents written without the gold
    answer. Yes for a question whose answer it does not name, unless the query is a follow-up: at least
    `FOLLOW_UP_SHARE` of its words are new to the question and given by the documents `retrieved` so far."""
    return not answer_guessable(question, golden_answers) and new_name_share(query, question, retrieved) < FOLLOW_UP_SHARE


def loop_metrics(trajs: list[Trajectory]) -> dict[str, float]:
    """Per-batch behaviour metrics of finished trajectories."""
    n = max(len(trajs), 1)
    actions = sum(t.turns for t in trajs) or 1
    searches = max(sum(len(t.noisy_flags) for t in trajs), 1)
    # How often the simulator's documents hold a gold answer, by what it was asked for: useful (told the answer),
    # noisy, held back (two-hop first hop, not told). The simulator eval's "answer in useful / noisy" columns,
    # measured on the training searches; a kind that did not occur (or a real engine's search) adds no key.
    hits: dict[str, list[bool]] = {"useful": [], "noisy": [], "held": []}
    for t in trajs:
        for noisy, held, document in zip(t.noisy_flags, t.held_flags, t.documents):
            if noisy is not None:
                hits["noisy" if noisy else "held" if held else "useful"].append(retrieval_hit([document], t.golden_answers))
    return {
        **{f"rollout/answer_in_{kind}": sum(h) / len(h) for kind, h in hits.items() if h},
        "rollout/answer_rate": sum(t.answer is not None for t in trajs) / n,
        "rollout/valid_action_rate": 1.0 - sum(t.num_invalid for t in trajs) / actions,
        "rollout/searches_per_traj": sum(t.num_searches for t in trajs) / n,
        "rollout/turns_per_traj": sum(t.turns for t in trajs) / n,
        "rollout/response_length": sum(len(t.response_ids) for t in trajs) / n,
        "rollout/policy_tokens_per_traj": sum(t.num_policy_tokens for t in trajs) / n,
        "rollout/obs_truncated": float(sum(t.obs_truncated for t in trajs)),
        "rollout/finish_length": sum(t.finish_reason == "length" for t in trajs) / n,
        "rollout/finish_max_turns": sum(t.finish_reason == "max_turns" for t in trajs) / n,
        "rollout/finish_error": sum(t.finish_reason == "error" for t in trajs) / n,
        "rollout/off_topic_share": sum(t.off_topic for t in trajs) / searches,
        "rollout/held_answer_share": sum(t.held_answer for t in trajs) / searches,
        "rollout/noisy_share": sum(bool(f) for t in trajs for f in t.noisy_flags) / searches,
    }

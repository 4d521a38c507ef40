"""The cost ledger: per-step and run totals, priced as ZeroSearch prices Google and the simulator."""

import pytest

from zerosearch.ledger import PAPER_API_USD_PER_1K, Ledger, Prices, Usage, usage_between


def test_the_default_price_is_the_papers():
    assert PAPER_API_USD_PER_1K * 64 == pytest.approx(586.70)
    assert Prices().api_usd_per_1k_queries == pytest.approx(9.1671875)


def test_a_step_is_priced_and_added_to_the_run():
    ledger = Ledger(Prices(api_usd_per_1k_queries=10.0, simulator_usd_per_hour=3.6))
    first = ledger.step(Usage(simulated_queries=300, prompt_tokens=9000, completion_tokens=4000, simulator_s=100,
                              real_queries={"google": 100, "wiki": 600}))
    assert first["cost/simulated_queries"] == 300 and first["cost/real_queries"] == 700
    assert first["cost/real_queries/google"] == 100 and first["cost/real_queries/wiki"] == 600
    assert first["cost/real_share"] == pytest.approx(0.7)
    assert first["cost/api_equivalent_usd"] == pytest.approx(10.0)  # 1,000 queries at $10 / 1k
    assert first["cost/real_api_usd"] == pytest.approx(1.0)  # only google is paid; BM25 is free
    assert first["cost/simulator_usd"] == pytest.approx(0.1)  # 100 s at $3.60 / h
    assert first["cost/saved_usd"] == pytest.approx(8.9)
    second = ledger.step(Usage(simulated_queries=1000, simulator_s=3600))
    assert second["cost/api_equivalent_usd"] == pytest.approx(10.0) and second["cost/real_queries"] == 0
    assert second["cost_total/api_equivalent_usd"] == pytest.approx(20.0)
    assert second["cost_total/simulator_usd"] == pytest.approx(3.7)
    assert ledger.summary()["saved_usd"] == pytest.approx(20.0 - 1.0 - 3.7)


def test_usage_is_read_from_cumulative_backend_counters():
    before = {"search/simulated_queries": 10, "search/prompt_tokens": 500, "search/simulator_s": 2.0,
              "search/real_queries/google": 1}
    after = {"search/simulated_queries": 42, "search/prompt_tokens": 900, "search/completion_tokens": 70,
             "search/simulator_s": 5.5, "search/real_queries/google": 4, "search/real_queries/wiki": 2}
    usage = usage_between(before, after)
    assert (usage.simulated_queries, usage.prompt_tokens, usage.completion_tokens) == (32, 400, 70)
    assert usage.simulator_s == pytest.approx(3.5) and usage.real_queries == {"google": 3, "wiki": 2}


def test_a_resumed_ledger_keeps_the_run_totals():
    ledger = Ledger(Prices())
    ledger.step(Usage(simulated_queries=5, real_queries={"wiki": 2}))
    resumed = Ledger(Prices())
    resumed.load_state_dict(ledger.state_dict())
    assert resumed.summary() == ledger.summary()
    resumed.step(Usage(simulated_queries=1))
    assert resumed.summary()["simulated_queries"] == 6 and ledger.summary()["simulated_queries"] == 5


def test_negative_prices_are_refused():
    with pytest.raises(ValueError, match=">= 0"):
        Prices(api_usd_per_1k_queries=-1)


def test_the_summary_carries_the_runs_cost(tmp_path):
    from zerosearch.training.summary import write_summary

    ledger = Ledger(Prices(api_usd_per_1k_queries=10.0, simulator_usd_per_hour=3.6))
    ledger.step(Usage(simulated_queries=900, prompt_tokens=90, completion_tokens=45, simulator_s=100,
                      real_queries={"wiki": 100}))
    val = [{"step": 0, "val/f1": 0.1}, {"step": 2, "val/f1": 0.2}]
    summary = write_summary(tmp_path, {"val": val}, steps=2, wall_s=60.0, peak_rss_gib=1.0,
                            simulated_queries=ledger.total.simulated_queries, cost=ledger.summary())
    assert summary["simulated_queries"] == 900
    assert summary["cost"]["api_equivalent_usd"] == 10.0 and summary["cost"]["simulator_usd"] == 0.1
    assert summary["cost"]["real_queries/wiki"] == 100 and summary["cost"]["saved_usd"] == 9.9
    line = (tmp_path / "summary.md").read_text().splitlines()[-1]
    assert "900 simulated" in line and "100 real (wiki 100)" in line and "$10.00" in line

"""Build your own search simulator: collect real search results, label them, fine-tune the simulation LLM.

    zerosearch simulator collect  questions + policy + real engine -> records.jsonl   (collect.py)
    zerosearch simulator label    records.jsonl -> labelled.jsonl (useful / noisy, balanced)  (label.py)
    zerosearch simulator train    labelled.jsonl -> an HF model folder (TRL SFT)  (train.py)
    zerosearch simulator eval     held-out records.jsonl + simulators -> a table   (evaluate.py)

Each step reads one file and writes one; `collect`, `label` and `eval` resume where they stopped,
`train` from its last checkpoint. The record format is in `records.py`; docs/simulator.md has the
worked example on the bundled corpus.
"""

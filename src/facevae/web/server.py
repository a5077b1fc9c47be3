"""`facevae serve RUN`: load the run, bind the address, print the URL, serve until Ctrl-C (uvicorn)."""

from __future__ import annotations

import ipaddress
import socket
import sys
from pathlib import Path

from facevae.errors import UserError


def require_web_extra() -> None:
    """One line saying what to install when the `web` extra is missing."""
    missing = []
    for module in ("starlette", "uvicorn", "multipart"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise UserError(f"facevae serve needs the web extra ({', '.join(missing)} missing): "
                        "pip install 'facevae[web]'")


def is_loopback(host: str) -> bool:
    """Whether every address `host` names is on this machine only (127.0.0.0/8, ::1)."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except socket.gaierror:
        return False
    return all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: any free port), or one line saying why not."""
    if not 0 <= port <= 65535:
        raise UserError(f"--port must be from 0 to 65535, got {port}")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise UserError(f"cannot serve on host {host!r}: {e.strerror}") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(128)
    except OSError as e:
        sock.close()
        hint = "; pick another with --port" if e.errno in (98, 48) else ""
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror}{hint}") from None
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def serve(run_dir: str | Path, *, host: str = "127.0.0.1", port: int = 8000, max_upload_mb: float = 10,
          data: str | None = None) -> None:
    """Serve the page of a run until Ctrl-C; print its URL on stdout once it can be opened."""
    require_web_extra()
    import torch
    import uvicorn

    from facevae.web.app import LOOPBACK_NAMES, create_app
    from facevae.web.studio import Limits, Studio

    if not max_upload_mb > 0:
        raise UserError(f"--max-upload-mb must be positive, got {max_upload_mb}")
    local = is_loopback(host)
    sock = bind(host, port)  # before the model loads: a taken port is said at once
    try:
        studio = Studio(run_dir, limits=Limits(max_upload_bytes=int(max_upload_mb * 1024 * 1024)), data=data)
        # From here on the model sees one face at a time, which needs no intra-op parallelism; and on a busy CPU,
        # OpenMP's spinning workers made a 64x64 decode take 0.4-1.1 s instead of 3-16 ms (benchmarks/web_latency.py).
        torch.set_num_threads(1)
        app = create_app(studio, allowed_hosts=(*LOOPBACK_NAMES, host.lower()) if local else None)
        for note in studio.notes:
            print(f"facevae: {note}", file=sys.stderr)
        if not local:
            print(f"facevae: warning: serving on {host}, not on this machine alone: anyone who can reach it on that "
                  "network can use this page and the model", file=sys.stderr)
        config = uvicorn.Config(app, log_level="warning", lifespan="off", timeout_graceful_shutdown=3,
                                limit_concurrency=256)
        print(f"facevae: serving {studio.run}; Ctrl-C stops. Open", file=sys.stderr)
        print(url_of(sock), flush=True)
        uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it caught, once it has shut down
        pass
    finally:
        sock.close()
    print("facevae: stopped", file=sys.stderr)

"""TLS contexts: the listeners' (server side, swappable for certificate rotation) and the
pools' (client side towards https:// upstreams, optionally with a client certificate)."""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from proxy.config import Config, TLSListen, UpstreamTLS

VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


class TLSSetupError(Exception):
    """A certificate, key or CA file that cannot be used; the message says which and why."""


def server_context(cfg: TLSListen, *, http2: bool = False) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = VERSIONS[cfg.min_version]
    ctx.set_alpn_protocols(["h2", "http/1.1"] if http2 else ["http/1.1"])
    try:
        ctx.load_cert_chain(cfg.cert, cfg.key)
    except ssl.SSLError as exc:
        raise TLSSetupError(
            f"cannot use certificate {cfg.cert} with key {cfg.key}: {exc.reason or exc}"
        ) from exc
    except OSError as exc:
        raise TLSSetupError(f"cannot read {cfg.cert} or {cfg.key}: {exc.strerror or exc}") from exc
    return ctx


class ListenerTLS:
    """The context a listener is created with stays the same object; it hands every new
    connection the *current* certificate's context (SNI callback), so a reload rotates
    certificates for new connections while established ones keep theirs."""

    def __init__(self, cfg: TLSListen, *, http2: bool = False) -> None:
        self.http2 = http2
        self.current = server_context(cfg, http2=http2)
        self.context = server_context(cfg, http2=http2)
        self.context.sni_callback = self._pick

    def _pick(self, sslobj: ssl.SSLObject, name: str | None, ctx: ssl.SSLContext) -> None:
        sslobj.context = self.current

    def rotate(self, cfg: TLSListen) -> None:
        self.current = server_context(cfg, http2=self.http2)
        # Switching the context in the SNI callback swaps the certificate but not the protocol
        # versions, which OpenSSL copies from the listener's context when a connection starts:
        # set them there, so a reloaded min_version applies to new connections too.
        self.context.minimum_version = VERSIONS[cfg.min_version]


def client_context(cfg: UpstreamTLS | None, *, h2: bool = False) -> ssl.SSLContext:
    """Verifies upstream certificates against the system store, or `ca` when given."""
    try:
        ctx = ssl.create_default_context(cafile=cfg.ca if cfg is not None else None)
        if cfg is not None and cfg.cert is not None and cfg.key is not None:
            ctx.load_cert_chain(cfg.cert, cfg.key)
    except ssl.SSLError as exc:
        raise TLSSetupError(f"cannot use the pool's TLS files: {exc.reason or exc}") from exc
    except OSError as exc:
        raise TLSSetupError(f"cannot read the pool's TLS files: {exc.strerror or exc}") from exc
    ctx.set_alpn_protocols(["h2"] if h2 else ["http/1.1"])
    return ctx


def tls_problems(config: Config) -> list[str]:
    """Every TLS file pair of a configuration that cannot be used, with its YAML path."""
    problems: list[str] = []
    for path, listener in (("listen.tls", config.listen.tls), ("admin.tls", config.admin.tls)):
        if listener is not None:
            try:
                server_context(listener)
            except TLSSetupError as exc:
                problems.append(f"{path}: {exc}")
    for name in ("blue", "green"):
        pool = getattr(config.pools, name)
        if pool.tls is not None:
            try:
                client_context(pool.tls)
            except TLSSetupError as exc:
                problems.append(f"pools.{name}.tls: {exc}")
    return problems

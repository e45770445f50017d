"""TLS to upstreams: the `tls` statement (`TlsSpec`) as an `ssl.SSLContext`, built when a
plan is loaded, never per call.

A context trusts the CA file of `ca` instead of the system store, presents `cert`/`key`
(mutual TLS), sends `sni` as the server name and checks the certificate against it
(default: the endpoint's host name), or skips verification with `verify off`.

Contexts are cached by spec and by the bytes of the files it names: a plan rebuilt with
the same files gets the very same context (and aiohttp keeps its pooled connections,
which are keyed by it), while a certificate file that changed (a rotation) gives a new
context for new connections; connections already open, and calls in flight on them,
are not touched. The sidecar rebuilds the runtime when a file the plan names changes
(`Plan.watch` lists the TLS files), so a rotation needs no restart.

What a handshake failure was (unknown CA, expired, name mismatch, a refused client
certificate) is put in words by `tls_reason` for the log line.
"""

from __future__ import annotations

import hashlib
import ssl
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from dsl.plan import TlsSpec

TLS_EXTENSION = "riprap.tls"  # the httpx request extension the inner transport reads


@dataclass(frozen=True, slots=True)
class TlsClient:
    """How one endpoint is called over TLS: the context and the server name to send
    (None: the URL's host)."""

    context: ssl.SSLContext
    server_hostname: str | None


_CACHE: OrderedDict[tuple[TlsSpec, tuple[str, ...]], ssl.SSLContext] = OrderedDict()
_CACHE_SIZE = 64


def _read(kind: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"tls: the {kind} file {path!r} cannot be read: "
                         f"{exc.strerror or exc}") from None


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tls_context(spec: TlsSpec) -> ssl.SSLContext:
    """The context for `spec`, from the cache while its files' bytes are unchanged.

    A file that cannot be read, or does not hold what it should, is a ValueError naming
    it (the reload that asked keeps the running plan)."""
    ca = _read("ca", spec.ca) if spec.ca else None
    cert = _read("cert", spec.cert) if spec.cert else None
    key = _read("key", spec.key) if spec.key else None
    fingerprint = tuple(_digest(b) if b is not None else "" for b in (ca, cert, key))
    cache_key = (spec, fingerprint)
    ctx = _CACHE.get(cache_key)
    if ctx is not None:
        _CACHE.move_to_end(cache_key)
        return ctx
    ctx = _build(spec, ca)
    _CACHE[cache_key] = ctx
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return ctx


def _build(spec: TlsSpec, ca: bytes | None) -> ssl.SSLContext:
    if ca is None:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)  # the system's trust store
    else:
        # only this CA: a private CA replaces the system store, it does not add to it
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies, checks the host name
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            ctx.load_verify_locations(cadata=ca.decode("ascii", "replace"))
        except (ssl.SSLError, ValueError) as exc:
            raise ValueError(f"tls: the ca file {spec.ca!r} holds no usable PEM certificate "
                             f"({_ssl_words(exc)})") from None
    if spec.cert or spec.key:
        if not (spec.cert and spec.key):
            raise ValueError("tls: a client certificate needs both cert and key")
        try:
            ctx.load_cert_chain(spec.cert, spec.key)
        except (ssl.SSLError, OSError) as exc:
            raise ValueError(f"tls: the cert {spec.cert!r} and key {spec.key!r} are not a "
                             f"usable PEM certificate and private key ({_ssl_words(exc)})"
                             ) from None
    if not spec.verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _ssl_words(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None)
    return str(reason or exc).replace("_", " ").lower()


_DEFAULT = TlsSpec()


def tls_client(spec: TlsSpec | None, url: str, server_name: str | None = None
               ) -> TlsClient | None:
    """How the endpoint at `url` is called: None for a plain `http://` URL, or an
    `https://` one with no `tls` statement and no `server_name` (the system's trust store
    and the URL's host: aiohttp's default).

    `server_name` is the name to send and check when the URL's host is not it (an
    endpoint whose name was resolved to addresses); a `sni` in the spec wins."""
    if not url.lower().startswith("https://") or (spec is None and server_name is None):
        return None
    spec = spec if spec is not None else _DEFAULT
    return TlsClient(tls_context(spec), spec.sni or server_name)


_VERIFY_WORDS = {
    10: "expired certificate",
    9: "certificate not yet valid",
    18: "unknown CA (self-signed certificate)",
    19: "unknown CA (self-signed certificate in the chain)",
    20: "unknown CA",
    21: "unknown CA",
    62: "name mismatch",
    64: "name mismatch",
}


def tls_reason(exc: BaseException) -> str:
    """Why a TLS connection failed, in words: "unknown CA: ...", "expired certificate:
    ...", "name mismatch: ...", or the alert the upstream sent (a refused client
    certificate reads "certificate required")."""
    cur: BaseException | None = exc
    for _ in range(8):
        if cur is None:
            break
        inner = getattr(cur, "certificate_error", None)
        if isinstance(inner, BaseException) and inner is not cur:
            cur = inner
            continue
        if isinstance(cur, ssl.SSLCertVerificationError):
            code = cur.verify_code
            words = _VERIFY_WORDS.get(code, "certificate not trusted")
            return f"{words}: {cur.verify_message}"
        if isinstance(cur, ssl.SSLError):
            words = _ssl_words(cur)
            if "alert" in words and "certificate" in words:
                return f"the upstream refused riprap's client certificate ({words})"
            return words
        cur = cur.__cause__ or cur.__context__
    return str(exc) or exc.__class__.__name__


__all__ = ["TLS_EXTENSION", "TlsClient", "tls_client", "tls_context", "tls_reason"]

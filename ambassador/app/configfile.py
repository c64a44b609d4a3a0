"""The config file (``twistd ambassador --config FILE``): several adapters, each fully described.

Every mistake is a ConfigurationError naming the file, the key and what was
expected; a value is never repeated back (it might be a pasted secret).
Secrets are never written in the file: a credential names an environment
variable (``{env: VAR}``) or a file (``{file: /path}``, a mounted Secret).
"""

from __future__ import annotations

import re
from typing import Any, Literal, overload
from collections.abc import Iterable, Mapping

from attrs import frozen
from zope.interface import implementer

from ambassador.adapters.http import HTTPAdapter
from ambassador.app.base_urls import base_url_with_path
from ambassador.credentials.sources import (
    BasicPair,
    Credential,
    EnvironmentSecret,
    FileSecret,
    OAuth2ClientCredentials,
    PEMFileSecret,
    PlainValue,
    SecretSource,
    as_basic,
    as_bearer_token,
    as_header,
    as_query_parameter,
)
from ambassador.interfaces import ConfigurationError, ICredential, IExternalAdapter
from ambassador.pipeline.client import DEFAULT_MAX_RESPONSE_BYTES
from ambassador.pipeline.egress import Egress
from ambassador.pipeline.proxies import DIRECT, ProxyEnvironment, parse_proxy_url
from ambassador.pipeline.trust import read_ca_file
from ambassador.pipeline.decoding import ACCEPT_ENCODINGS
from ambassador.pipeline.resilience import Policy

CONFIG_HELP = """\
Config file (--config FILE, YAML; secrets only by reference, never written in it):
  adapters:
    NAME:                     one entry per adapter; NAME labels logs and metrics
      type: http              http (the default: no code needed) or an adapter plugin's name (tmdb)
      mount: /NAME            http: where it is served
      base_url: URL           where the outside API is; may carry a path prefix (https://egress.example.com/tmdb)
      methods: [GET, HEAD]    http: methods forwarded
      paths: [/a, /b/c]       http: path prefixes forwarded below the mount (default: all)
      probe_path: /status     http: cheap GET for --probe-interval (default: not probed)
      accept_encoding: gzip   ask for gzip answers (decoded, size cap counted decoded) or identity;
                              default identity, a plugin's own default for a plugin (tmdb: gzip)
      timeout: SECONDS        per adapter (policy timeout); --timeout and --policy override it
      policy: {KEY: VALUE}    per adapter: the --policy keys (retries, rate_limit …); --policy overrides
      propagate_trace: false  true: send the trace's traceparent upstream (tracing on only; docs/tracing.md)
      credential:             http: required; plugin: replaces what its variables configure
        style: query | header | bearer | basic | oauth2
        secret: {env: VAR} | {file: /path}              query, header, bearer
        param: NAME                                     query: the parameter (default api_key)
        header: NAME   prefix: TEXT                     header: the header and a prefix before the secret
        username: TEXT | {env: VAR} | {file: /path}     basic (with password: {env:..} | {file:..})
        token_url: URL  client_id: TEXT | {env|file}  client_secret: {env: VAR} | {file: /path}
        client_auth: basic | form  scope: TEXT  audience: TEXT  timeout: SECONDS      oauth2
      proxy: none | URL | {env: VAR} | {file: /path}   forward proxy (default: HTTPS_PROXY, HTTP_PROXY, NO_PROXY);
                              none: direct; a URL with user:password@ only by {env} or {file}
      ca_file: /path          PEM CA certificates trusted besides the system's store (and --ca-file)
      ca_only: true           trust only ca_file's certificates
      client_cert: {env: VAR} | {file: /path}   PEM client certificate for mutual TLS (with client_key);
      client_key: {env: VAR} | {file: /path}    files are re-read when they change
"""

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,39}\Z")
_MOUNT = re.compile(r"(/[A-Za-z0-9_.,:~-]+)+/?\Z")
_PATH = re.compile(r"(/[A-Za-z0-9_.,:~-]+)*/?\Z")
_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
_STYLES = ("query", "header", "bearer", "basic", "oauth2")
_ACCEPT_ENCODING = re.compile("(" + "|".join(ACCEPT_ENCODINGS) + r")\Z")
_HEADER = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+\Z")
_SOURCE = "{env: VARIABLE} or {file: /path}"
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")  # POSIX: what a shell can export
# An unknown key is named only when it looks like a mistyped key (a pasted secret does not).
_YAML_QUOTED = re.compile(r"'([^']*)'")
_YAML_KEPT = re.compile(r"[^A-Za-z0-9]{0,2}\Z|<[a-z ]+>\Z")
_KEY_LIKE = re.compile(r"[a-z][a-z_]{0,31}\Z")


@frozen
class Section:
    """One mapping in the file, at ``where`` (``adapters.weather.credential``), with checked getters."""

    file: str
    where: str
    data: Mapping[str, Any]

    def error(self, key: str, expected: str) -> ConfigurationError:
        where = f"{self.where}.{key}" if self.where else key
        return ConfigurationError(f"{self.file}: {where}: expected {expected}")

    def only(self, keys: Iterable[str]) -> None:
        allowed = sorted(set(keys))
        for key in self.data:
            if key not in allowed:
                named = str(key) if _KEY_LIKE.match(str(key)) else "(a key not shown)"
                raise self.error(named, f"no such key here; the keys are {', '.join(allowed)}")

    def get(self, key: str, kind: type | tuple[type, ...], expected: str, default: Any = None,
            required: bool = False) -> Any:
        if key not in self.data or self.data[key] is None:
            if required:
                raise self.error(key, expected + " (required)")
            return default
        value = self.data[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise self.error(key, expected)
        return value

    @overload
    def text(self, key: str, expected: str = ..., *, pattern: re.Pattern | None = ..., default: str,
             required: bool = ...) -> str: ...

    @overload
    def text(self, key: str, expected: str = ..., *, pattern: re.Pattern | None = ..., default: None = ...,
             required: Literal[True]) -> str: ...

    @overload
    def text(self, key: str, expected: str = ..., *, pattern: re.Pattern | None = ..., default: str | None = ...,
             required: bool = ...) -> str | None: ...

    def text(self, key: str, expected: str = "a string", *, pattern: re.Pattern | None = None,
             default: str | None = None, required: bool = False) -> str | None:
        value = self.get(key, str, expected, default, required)
        if value is not None and pattern is not None and not pattern.match(value):
            raise self.error(key, expected)
        return value

    def flag(self, key: str) -> bool | None:
        value = self.data.get(key)
        if value is not None and not isinstance(value, bool):
            raise self.error(key, "true or false")
        return value

    def seconds(self, key: str) -> float | None:
        value = self.get(key, (int, float), "a positive number of seconds")
        if value is not None and not value > 0:
            raise self.error(key, "a positive number of seconds")
        return None if value is None else float(value)

    def texts(self, key: str, expected: str, pattern: re.Pattern, default: tuple[str, ...]) -> tuple[str, ...]:
        values = self.get(key, list, f"a list of {expected}", default)
        if not all(isinstance(v, str) and pattern.match(v) for v in values):
            raise self.error(key, f"a list of {expected}")
        return tuple(values)

    @overload
    def section(self, key: str, required: Literal[True]) -> Section: ...

    @overload
    def section(self, key: str, required: bool = ...) -> Section | None: ...

    def section(self, key: str, required: bool = False) -> Section | None:
        value = self.get(key, dict, "a mapping of keys to values", required=required)
        return None if value is None else Section(self.file, f"{self.where}.{key}", value)


def adapters_from_file(path: str, environ: Mapping[str, str], plugins: Iterable, reactor) -> list:
    """The adapters ``path`` configures. ``plugins`` are the discovered IAdapterPlugins."""
    # Imported here, not at the top: only --config reads YAML, and PyYAML costs an idle process ~1 MiB.
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            document = yaml.safe_load(f)
    except OSError as e:
        raise ConfigurationError(f"{path}: cannot be read ({e.strerror})")
    except UnicodeDecodeError:
        raise ConfigurationError(f"{path}: is not UTF-8 text")
    except yaml.YAMLError as e:  # its text quotes the file; say only where and what
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or "syntax error"
        # PyYAML quotes what it met (an alias name, a tag, an escape): only punctuation and <markers> stay.
        problem = _YAML_QUOTED.sub(lambda m: m[0] if _YAML_KEPT.match(m[1]) else "(not shown)", problem)
        raise ConfigurationError(f"{path}: not valid YAML{where}: {problem}")
    if not isinstance(document, dict):
        raise ConfigurationError(f"{path}: expected a mapping with the key adapters")
    root = Section(path, "", document)
    root.only(["adapters"])
    entries = root.get("adapters", dict, "a mapping of adapter names to their settings", required=True)
    root = Section(path, "adapters", entries)
    by_name = {plugin.name: plugin for plugin in plugins}
    adapters: list[IExternalAdapter] = []
    for name in entries:
        if not isinstance(name, str) or not _NAME.match(name):
            raise root.error(str(name), "an adapter name of letters, digits, _ and - (at most 40)")
        entry = root.section(name, required=True)
        kind = entry.text("type", f"http or an adapter plugin's name ({', '.join(by_name) or 'none found'})",
                          default="http")
        if kind != "http" and kind not in by_name:
            raise entry.error("type", f"http or an adapter plugin's name ({', '.join(by_name) or 'none found'})")
        if kind == "http":
            adapters.append(_http_adapter(name, entry, environ))
        else:
            adapters.append(_plugin_adapter(name, entry, environ, by_name[kind].configure(environ, reactor)))
    mounts = [route.path.rstrip("/") for adapter in adapters for route in adapter.routes]
    for mount in mounts:
        if mounts.count(mount) > 1:
            raise ConfigurationError(f"{path}: two adapters are mounted at {mount}; each needs its own mount")
    return adapters


def _http_adapter(name: str, entry: Section, environ) -> HTTPAdapter:
    entry.only(["type", "mount", "base_url", "methods", "paths", "probe_path", "timeout", "policy", "credential",
                "propagate_trace", "accept_encoding", *_EGRESS_KEYS])
    mount = entry.text("mount", "a path like /weather", pattern=_MOUNT, required=True)
    if {".", ".."} & set(mount.split("/")):
        raise entry.error("mount", "a path like /weather")
    origin, base_path = _base_url(entry, required=True)
    methods = entry.texts("methods", f"methods ({', '.join(_METHODS)})", re.compile("|".join(_METHODS) + r"\Z"),
                          ("GET", "HEAD"))
    paths = entry.texts("paths", "paths like /forecast", _PATH, ())
    if any({".", ".."} & set(p.split("/")) for p in paths):
        raise entry.error("paths", "a list of paths like /forecast")
    credential, secret_params = _credential(name, entry.section("credential", required=True), environ)
    return HTTPAdapter(
        name=name,
        mount=mount.rstrip("/"),
        base_url=origin,
        base_path=base_path,
        credential=credential,
        methods=tuple(dict.fromkeys(methods)) or ("GET", "HEAD"),
        paths=tuple(p.rstrip("/") for p in paths),
        secret_params=secret_params,
        probe_path=entry.text("probe_path", "a path like /status", pattern=_PATH),
        policy_defaults=_policy(entry),
        propagate_trace=bool(entry.flag("propagate_trace")),
        egress=_egress(entry, environ),
        accept_encoding=_accept_encoding(entry, "identity"),
    )


def _accept_encoding(entry: Section, default: str) -> str:
    return entry.text("accept_encoding", " or ".join(ACCEPT_ENCODINGS), pattern=_ACCEPT_ENCODING, default=default)


def _policy(entry: Section) -> tuple[tuple[str, str], ...]:
    """The entry's ``timeout`` and ``policy:`` keys as Policy settings, checked now."""
    section = entry.section("policy")
    settings = {str(key): str(value) for key, value in (section.data if section else {}).items()}
    timeout = entry.seconds("timeout")
    if timeout is not None:
        settings["timeout"] = str(timeout)
    Policy().updated(settings, f"{entry.file}: {entry.where}.policy")
    return tuple(settings.items())


@overload
def _base_url(entry: Section, required: Literal[True]) -> tuple[str, str]: ...


@overload
def _base_url(entry: Section, required: bool = ...) -> tuple[str, str] | tuple[None, None]: ...


def _base_url(entry: Section, required: bool = False) -> tuple[str, str] | tuple[None, None]:
    value = entry.text("base_url", "a URL", required=required)
    if value is None:
        return None, None
    return base_url_with_path(value, f"{entry.file}: {entry.where}.base_url")


@implementer(IExternalAdapter)
@frozen
class _Configured:
    """A plugin's adapter with what its config file entry replaces."""

    adapter: IExternalAdapter
    name: str
    base_url: str
    credential: ICredential
    secret_params: frozenset[str]
    policy_defaults: tuple[tuple[str, str], ...]
    propagate_trace: bool
    egress: Egress | None
    accept_encoding: str

    @property
    def max_response_bytes(self) -> int:
        return getattr(self.adapter, "max_response_bytes", DEFAULT_MAX_RESPONSE_BYTES)

    @property
    def routes(self):
        return self.adapter.routes

    @property
    def probe_path(self) -> str | None:
        return getattr(self.adapter, "probe_path", None)

    def upstream_request(self, inbound):
        return self.adapter.upstream_request(inbound)

    def interpret(self, inbound, response):
        return self.adapter.interpret(inbound, response)


def _plugin_adapter(name: str, entry: Section, environ, adapter) -> _Configured:
    entry.only(["type", "base_url", "timeout", "policy", "credential", "propagate_trace", "accept_encoding",
                *_EGRESS_KEYS])
    origin, base_path = _base_url(entry)
    credential, secret_params = adapter.credential, frozenset[str]()
    propagate = entry.flag("propagate_trace")
    section = entry.section("credential")
    if section is not None:
        credential, secret_params = _credential(name, section, environ)
    return _Configured(
        adapter=adapter,
        name=name,
        base_url=adapter.base_url if origin is None else origin + (base_path or ""),
        credential=credential,
        secret_params=adapter.secret_params | secret_params,
        policy_defaults=tuple(getattr(adapter, "policy_defaults", None) or ()) + _policy(entry),
        propagate_trace=bool(getattr(adapter, "propagate_trace", False)) if propagate is None else propagate,
        egress=_egress(entry, environ) or getattr(adapter, "egress", None),
        accept_encoding=_accept_encoding(entry, getattr(adapter, "accept_encoding", "identity")),
    )


_EGRESS_KEYS = ("proxy", "ca_file", "ca_only", "client_cert", "client_key")


def _egress(entry: Section, environ) -> Egress | None:
    """The entry's own way out (proxy, trust, client certificate), or None when it sets none of it."""
    if not any(key in entry.data for key in _EGRESS_KEYS):
        return None
    proxies = None
    if entry.data.get("proxy") == "none":
        proxies = DIRECT
    elif entry.data.get("proxy") is not None:
        proxies = _proxy(entry, environ)
    ca_file = entry.text("ca_file", "the absolute path of a PEM file of CA certificates",
                         pattern=re.compile(r"/.*\Z", re.DOTALL))
    certificates = () if ca_file is None else read_ca_file(ca_file, f"{entry.file}: {entry.where}.ca_file")
    ca_only = entry.data.get("ca_only", False)
    if not isinstance(ca_only, bool):
        raise entry.error("ca_only", "true or false")
    if ca_only and ca_file is None:
        raise entry.error("ca_only", "true only with ca_file (the certificates to trust only)")
    cert = _source(entry, "client_cert", environ, pem=True) if "client_cert" in entry.data else None
    key = _source(entry, "client_key", environ, pem=True) if "client_key" in entry.data else None
    if (cert is None) != (key is None):
        raise entry.error("client_key" if key is None else "client_cert", "set together with "
                          + ("client_cert" if key is None else "client_key") + " (a certificate and its key)")
    return Egress(proxies, certificates, ca_only, cert, key)


def _proxy(entry: Section, environ) -> ProxyEnvironment:
    """A ``proxy:`` URL (credentials only through {env} or {file}) as the proxy for http and https alike."""
    setting = f"{entry.file}: {entry.where}.proxy"
    value = entry.data["proxy"]
    if isinstance(value, str):
        proxy = parse_proxy_url(value, setting)
        if proxy.authorization is not None:  # written in the file: the file would hold a secret
            raise entry.error("proxy", "a proxy URL with user:password@ as {env: VARIABLE} or {file: /path}, "
                                       "not written in the file")
    else:
        source = _source(entry, "proxy", environ, expected="none, a proxy URL, " + _SOURCE)
        text = source.current()
        if text is None:
            raise entry.error("proxy", f"a proxy URL in {source.describe()}, which is empty or unreadable")
        proxy = parse_proxy_url(text, setting)
    return ProxyEnvironment(https=proxy, http=proxy)


def _credential(adapter: str, section: Section, environ) -> tuple[ICredential, frozenset[str]]:
    """The credential a ``credential:`` section describes, and the query parameters it uses."""
    style = section.text("style", " | ".join(_STYLES), required=True)
    hint = f"Check adapters.{adapter}.credential in {section.file}."
    if style == "query":
        section.only(["style", "secret", "param"])
        param = section.text("param", "a query parameter name", pattern=re.compile(r"[A-Za-z0-9_.~-]+\Z"),
                             default="api_key")
        source = _source(section, "secret", environ)
        return Credential(source, as_query_parameter(param), hint), frozenset([param.lower()])
    if style == "header":
        section.only(["style", "secret", "header", "prefix"])
        name = section.text("header", "an HTTP header name", pattern=_HEADER, required=True)
        prefix = section.text("prefix", "a string", pattern=re.compile(r"[ -~]*\Z"), default="")
        return Credential(_source(section, "secret", environ), as_header(name, prefix), hint), frozenset()
    if style == "bearer":
        section.only(["style", "secret"])
        return Credential(_source(section, "secret", environ), as_bearer_token(), hint), frozenset()
    if style == "basic":
        section.only(["style", "username", "password"])
        pair = BasicPair(_source(section, "username", environ, plain=True), _source(section, "password", environ))
        return Credential(pair, as_basic(), hint), frozenset()
    if style == "oauth2":
        section.only(["style", "token_url", "client_id", "client_secret", "client_auth", "scope", "audience",
                      "timeout"])
        token_url = section.text("token_url", "a URL", required=True)
        origin, path = base_url_with_path(token_url, f"{section.file}: {section.where}.token_url")
        return OAuth2ClientCredentials(
            token_url=origin + (path or "/"),
            client_id=_source(section, "client_id", environ, plain=True),
            client_secret=_source(section, "client_secret", environ),
            missing_hint=hint,
            scope=section.text("scope", default=""),
            audience=section.text("audience", default=""),
            client_auth=section.text("client_auth", "basic | form", pattern=re.compile(r"(basic|form)\Z"),
                                     default="basic"),
            timeout=section.seconds("timeout") or 10.0,
        ), frozenset()
    raise section.error("style", " | ".join(_STYLES))


def _source(section: Section, key: str, environ, plain: bool = False, pem: bool = False,
            expected: str | None = None) -> SecretSource:
    expected = expected or ("a string or " if plain else "") + _SOURCE
    value = section.data.get(key)
    if plain and isinstance(value, str) and value:
        return PlainValue(f"{section.where}.{key}", value)
    if not isinstance(value, dict) or len(value) != 1 or not isinstance(next(iter(value.values())), str):
        raise section.error(key, expected + (" (required)" if value is None else ""))
    (kind, name), = value.items()
    if kind == "env" and _ENV_NAME.match(name):
        return EnvironmentSecret(name, environ.get(name, "").strip())
    if kind == "env":  # never repeated: what stands there may be the secret itself, pasted
        raise section.error(key, "{env: VARIABLE} with VARIABLE an environment variable name (letters, digits "
                                 "and _, not starting with a digit)")
    if kind == "file" and name.startswith("/"):
        return PEMFileSecret(name) if pem else FileSecret(name)
    raise section.error(key, expected + " (the file an absolute path)")

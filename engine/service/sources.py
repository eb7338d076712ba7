"""Adding and removing sources over HTTP, the way `resynth source add` / `source remove` do, within a policy.

`POST /v1/sources` takes JSON `{"name", "kind"?, "params"?: {...}}` (a kind's parameters may also sit at
the top level): the fields are the `Param` names of the source kinds (`path`, `steps`, `url`, `model`,
`api_key_env`, ...), read by the CLI's own `engine.flags.source_kind_and_params` (the same kind
inference, conversions and one-line errors, which name the CLI flags, but for an API source's key, client
id and token URL, named by their fields) and enrolled by the same `Workspace.add_source`.
`DELETE /v1/sources/{name}` is `resynth source remove`.

An HTTP client is not the server's operator, so what it may make the server touch is bounded
(`SourcePolicy`, from `resynth serve` flags):

- paths (every `Param.is_path`, and a LoRA's adapter files) must resolve, symlinks followed, under one
  of the sources roots (the store's folder unless `--sources-root DIR` is given); a relative path is
  taken from the first root;
  `~` and `$VAR` are refused, not expanded (expanding would read the server's environment for the client);
- an API source may name as its key (and OAuth client id) only the environment variables the server
  lists with `--sources-key-env VAR`: otherwise a client could have the server send any of its secrets
  to a URL of the client's choosing;
- an API source's URLs (`url`, `token_url`) must resolve to public addresses (no loopback, private,
  link-local or metadata addresses: no requests into the server's own network); the source is stored
  `public_only`, so every connection it makes later (status and image URLs and their redirects too) is
  checked again on the address actually connected to (`engine.api_http`): a DNS answer that changes
  after the check (rebinding) fails that source for that request in one line;
- `--sources-anywhere` lifts the path, address and variable checks (a trusted, token-protected
  server); `--sources-read-only` turns both routes off (403).

Changes run on the generation worker, between generations, so a removal never pulls a pipeline out
from under a running job. Each change is its own job (never joined with another request's, as generations
are): an add and a remove of one name at once are two changes, run one after the other.

A name given over HTTP is stricter than the CLI's: 1-64 ASCII letters, digits and `._+-`, starting with a
letter or digit, and not a case-insensitive twin of a registered name. It is shown in every answer and in
the web page, so no look-alike letters, invisible or right-to-left characters, `.`/`..`.
"""
from __future__ import annotations

import argparse
import asyncio
import errno
import itertools
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from engine.errors import UserError, with_article
from engine.service.errors import ServiceError
from index.errors import StoreInputError, StoreReadOnly, UnknownName

MAX_BODY = 64 * 1024  # a source declaration is a few hundred bytes
MAX_PATH = 1024  # characters of a path given over HTTP (the OS's own limits are 4096 and 255 a component)
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}")  # a source name given over HTTP
_PATH_ERRNOS = {errno.ENAMETOOLONG, errno.ELOOP, errno.ENOTDIR, errno.ENOENT, errno.EISDIR, errno.EINVAL}
_CHANGES = itertools.count()  # each change its own job key: a change is never joined to another request's
# Numbers an HTTP client may give (inclusive; floats must also be finite): the CLI's operator may ask a
# generator for 10**30 steps or 10**9-pixel images, a client may not (one attribution would hold the
# worker for ever, or allocate the latents of a billion-pixel image).
BOUNDS: dict[str, tuple[float, float]] = {"steps": (1, 1000), "size": (8, 4096), "guidance": (0.0, 100.0),
                                          "price": (0.0, 1000.0), "rate": (0.0, 100_000.0), "concurrency": (1, 64),
                                          "timeout": (0.0, 3600.0)}
_TYPES = {str: "a string", int: "an integer", float: "a number", dict: "a JSON object", bool: "true or false"}
# An API source's key, client id and token endpoint, named in its messages by the CLI's flags, and the
# listing that would show a password: over HTTP the request's fields and route
_HTTP_WORDS = (("--api-key-env VAR", "api_key_env"), ("--client-id-env VAR", "client_id_env"),
               ("--api-key-env", "api_key_env"), ("--client-id-env", "client_id_env"), ("--token-url", "token_url"),
               ("`source list`", "GET /v1/sources"))


@dataclass(frozen=True)
class SourcePolicy:
    """What HTTP clients may do to the store's sources (see the module's docstring)."""

    roots: tuple[Path, ...] = ()    # folders that HTTP-given paths must lie under (empty: the store's folder)
    key_envs: frozenset[str] = frozenset()  # environment variables an HTTP-added API source may name
    anywhere: bool = False          # no path, address or variable checks
    read_only: bool = False         # no changes over HTTP at all

    def resolved_roots(self, store_root: Path) -> tuple[Path, ...]:
        return tuple(Path(r).resolve() for r in (self.roots or (store_root,)))


def _refused(code: str, message: str) -> ServiceError:
    return ServiceError(403, code, message)


def parse_body(raw: bytes) -> tuple[str, str | None, dict[str, Any]]:
    """(name, kind or None, parameters) from the JSON body; a 4xx ServiceError for a malformed one."""
    if len(raw) > MAX_BODY:
        raise ServiceError(413, "body_too_large", f"a source declaration is at most {MAX_BODY} bytes")
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):  # RecursionError: nested thousands of levels deep
        raise ServiceError(400, "bad_request", "send a JSON object: {\"name\", \"kind\"?, \"params\"?}") from None
    if not isinstance(body, dict):
        raise ServiceError(400, "bad_request", "send a JSON object: {\"name\", \"kind\"?, \"params\"?}")
    _check_strings(body)
    name, kind, nested = body.pop("name", None), body.pop("kind", None), body.pop("params", None) or {}
    if not isinstance(name, str):
        raise ServiceError(422, "bad_request", "`name` (a string) is required")
    if kind is not None and not isinstance(kind, str):
        raise ServiceError(422, "bad_request", "`kind` must be a string")
    if not isinstance(nested, dict):
        raise ServiceError(422, "bad_request", "`params` must be a JSON object")
    twice = sorted(set(nested) & set(body))
    if twice:
        raise ServiceError(422, "bad_request", f"{', '.join(twice)} given both in `params` and at the top level")
    return name, kind, {**body, **nested}


def _check_strings(value: Any) -> None:
    """400 for a string no file system, database or log can hold: JSON's `\\ud800` escapes decode to lone
    surrogates, which fail only later, deep inside the store (a 500). Iterative: the nesting is the client's."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise ServiceError(400, "bad_request", "a string in the body is not valid Unicode (a lone "
                                                       "surrogate escape such as \\ud800)") from None


def check_name(name: str) -> None:
    """422 for a name HTTP clients may not give (see the module's docstring)."""
    if not NAME.fullmatch(name):
        raise UserError(f"invalid source name {name[:80]!r}: over HTTP a name is 1 to 64 ASCII letters, digits "
                        "and . _ + - starting with a letter or digit", code="invalid_source")


def _no_twin(name: str, names: list[str]) -> None:
    """A name differing from a registered one only by case reads as that source in every answer."""
    twin = next((n for n in names if n != name and n.casefold() == name.casefold()), None)
    if twin is not None:
        raise UserError(f"invalid source name {name!r}: source {twin!r} is already registered; names that differ "
                        "only by case are refused over HTTP", code="invalid_source")


def kind_and_params(kind: str | None, fields: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The CLI's reading of `source add` arguments, from JSON fields named by the kinds' Params."""
    from engine import flags, sources

    declared, positional = flags._declared(sources.kinds())
    by_name: dict[str, str] = {}
    for flag, pairs in declared.items():
        for _, param in pairs:
            by_name.setdefault(param.name, flag)
    positional_names = {param.name for _, param in positional}
    args = argparse.Namespace(kind=kind)
    for field, value in fields.items():
        if value is None:
            continue
        if field in positional_names:
            setattr(args, flags.POSITIONAL_DEST, value)
        elif field in by_name:
            setattr(args, flags._dest(by_name[field]), value)
        else:
            known = sorted(set(by_name) | positional_names)
            raise UserError(f"unknown field {field[:60]!r}: a source takes name, kind and {', '.join(known)}")
    name, params = flags.source_kind_and_params(args)
    found = sources.get(name)
    for param in found.params:
        value = params.get(param.name)
        if value is None:
            continue
        ok = isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value)) \
            if param.repeatable else \
            isinstance(value, param.type) and not (isinstance(value, bool) and param.type is not bool)
        if param.type is float and isinstance(value, int) and not isinstance(value, bool):
            ok = True
        if not ok:
            what = "a string or a list of strings" if param.repeatable else _TYPES.get(param.type, param.type.__name__)
            raise UserError(f"{param.name} of {with_article(name)} source must be {what}, not {type(value).__name__}")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            _check_number(name, param.name, value)
    return name, params


def _check_number(kind: str, field: str, value: int | float) -> None:
    """A number within BOUNDS (a float also finite); an int is compared exactly, never made a float."""
    bounds = BOUNDS.get(field)
    finite = isinstance(value, int) or math.isfinite(value)
    if finite and (bounds is None or bounds[0] <= value <= bounds[1]):
        return
    shown = str(value)[:24] if isinstance(value, int) else f"{value:g}"
    within = f"between {bounds[0]:g} and {bounds[1]:g}" if bounds else "a finite number"
    raise UserError(f"{field} of {with_article(kind)} source must be {within} over HTTP, not {shown}")


def police(kind: str, params: dict[str, Any], policy: SourcePolicy, store_root: Path) -> dict[str, Any]:
    """`params` with every path resolved inside the sources roots; 403 for what the policy refuses."""
    from engine import sources
    from engine.api_http import is_public, resolve

    found = sources.get(kind)
    checked = dict(params)
    roots = policy.resolved_roots(store_root)
    for param in found.params:
        value = checked.get(param.name)
        if value is None:
            continue
        if (param.metavar or "").startswith("FILE["):  # files with a suffix (a LoRA's FILE[:SCALE], listed)
            from engine.sources.lora import parse_loras

            from engine.sources.lora import adapter_file

            inside = [_inside(_plain(path, param.name), roots, policy.anywhere, param.name) for path, _ in
                      parse_loras(value)]
            # a folder stands for its adapter file: where that file (or the link in it) leads is checked too
            files = [_inside(adapter_file(path), roots, policy.anywhere, param.name) for path in inside]
            checked[param.name] = [f"{file}:{scale!r}" for file, (_, scale) in zip(files, parse_loras(value))]
        elif param.is_path:
            resolved = [_inside(_plain(item, param.name), roots, policy.anywhere, param.name)
                        for item in (value if isinstance(value, list) else [value])]
            checked[param.name] = resolved if isinstance(value, list) else resolved[0]
        elif param.name.endswith("_env") and not policy.anywhere and value not in policy.key_envs:
            raise _refused("env_not_allowed", f"{param.name} {value[:80]!r} is not one this server lets HTTP clients "
                                              "name (the operator lists them with --sources-key-env)")
        elif param.metavar == "URL" and not policy.anywhere:
            try:
                host = (urlsplit(value).hostname or "") if isinstance(value, str) else ""
            except ValueError:  # http://[::1 (was a 500): refused in one line by the kind's own check
                host = ""
            try:
                addresses = [info[4][0] for info in resolve(host, 443, 5.0)] if host else []
            except OSError:
                raise UserError(f"{param.name}: cannot resolve the host {host[:80]!r}") from None
            for text in addresses:
                if not is_public(text):
                    raise _refused("address_not_allowed", f"{param.name}: {host[:80]} is a non-public address; "
                                                          "this server lets HTTP clients name public APIs only")
    if kind == "api" and not policy.anywhere:
        checked["public_only"] = True  # stored: every later connection is checked again, on the address used
    return checked


def _plain(value: str, field: str) -> str:
    """A path as given: `~` and `$VAR` are refused over HTTP (expanding them reads the server's environment)."""
    if "$" in value or value.startswith("~") or "\0" in value:
        raise UserError(f"{field}: `~` and `$VAR` are not expanded over HTTP: give the path itself")
    return value


def _inside(value: str, roots: tuple[Path, ...], anywhere: bool, field: str) -> str:
    path = Path(value)
    if len(value) > MAX_PATH or any(len(os.fsencode(part)) > 255 for part in path.parts):
        raise UserError(f"{field}: the path is too long (at most {MAX_PATH} characters, 255 bytes a folder name)")
    try:
        resolved = (path if path.is_absolute() else roots[0] / path).resolve()
    except (OSError, RuntimeError):  # RuntimeError: a symlink loop (Python 3.11); its text names the path
        raise UserError(f"{field}: the path cannot be resolved (a symlink loop?)") from None
    if not anywhere and not any(resolved == root or resolved.is_relative_to(root) for root in roots):
        raise _refused("path_not_allowed", f"{field}: over HTTP, paths must lie inside this server's sources "
                                           "folder (give one relative to it; the operator sets it with "
                                           "--sources-root)")
    return str(resolved)


async def add(service, policy: SourcePolicy, raw: bytes) -> dict:
    """Validate and enrol one source (422 with the CLI's one-line message for a mistake)."""
    if policy.read_only:
        raise _refused("read_only", "this server does not change its sources over HTTP (--sources-read-only)")
    name, kind, fields = parse_body(raw)
    hidden = (*policy.resolved_roots(service.store.root), Path(service.store.root).resolve())

    def enrol() -> dict:
        _no_twin(name, [s.name for s in service.store.sources()])  # on the worker: no change in between
        try:
            return service.ws.add_source(name, kind=kind, **params)
        except StoreInputError as exc:  # the name is taken by another recipe: a conflict, not a malformed body
            if isinstance(exc, (UnknownName, StoreReadOnly)):
                raise
            raise ServiceError(409, "source_exists", str(exc)) from None

    try:
        check_name(name)
        kind, params = kind_and_params(kind, fields)
        params = await asyncio.to_thread(police, kind, params, policy, service.store.root)
        info = await asyncio.wrap_future(service.generation.submit(("source-change", next(_CHANGES)), enrol))
    except UserError as exc:
        code = exc.code if exc.code != "bad_request" else "invalid_source"
        raise ServiceError(422, code, private(http_words(str(exc)), hidden)) from None
    except OSError as exc:  # a client's path the OS refuses to look at (too long, a loop): said without paths
        if exc.errno not in _PATH_ERRNOS:
            raise  # the machine's trouble (disk, permissions): the app maps it by type
        raise ServiceError(422, "invalid_source", f"the source's files cannot be read: "
                                                  f"{exc.strerror or type(exc).__name__}") from None
    return {k: v for k, v in info.items() if k not in ("path", "params")}  # nor the server's folders in params


def http_words(text: str) -> str:
    """A message of the CLI's with the API source's flags written as the JSON fields a client sends."""
    for cli, field in _HTTP_WORDS:
        text = text.replace(cli, field)
    return text


def private(text: str, roots: tuple[Path, ...]) -> str:
    """`text` with the server's folders written relative to them: a client gave paths relative to the
    sources folder and reads them back that way, never learning where the folder is."""
    for root in sorted({str(r) for r in roots if str(r) != os.sep}, key=len, reverse=True):
        at_root = re.compile(re.escape(root) + r"(?:(/)|(?=[\s'\"),:;]|$))")
        text = at_root.sub(lambda m: "" if m.group(1) else ".", text)
    return text


async def remove(service, policy: SourcePolicy, name: str) -> dict:
    if policy.read_only:
        raise _refused("read_only", "this server does not change its sources over HTTP (--sources-read-only)")
    future = service.generation.submit(("source-change", next(_CHANGES)), lambda: service.ws.remove_source(name))
    return {"removed": name, "vectors": await asyncio.wrap_future(future)}

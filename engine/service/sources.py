"""Adding and removing sources over HTTP, the way `resynth source add` / `source remove` do, within a policy.

`POST /v1/sources` takes JSON `{"name", "kind"?, "params"?: {...}}` (a kind's parameters may also sit at
the top level): the fields are the `Param` names of the source kinds (`path`, `steps`, `url`, `model`,
`api_key_env`, ...), read by the CLI's own `engine.flags.source_kind_and_params` (the same kind
inference, conversions and one-line errors, which name the CLI flags) and enrolled by the same
`Workspace.add_source`. `DELETE /v1/sources/{name}` is `resynth source remove`.

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
  link-local or metadata addresses: no requests into the server's own network);
- `--sources-anywhere` lifts the path, address and variable checks (a trusted, token-protected
  server); `--sources-read-only` turns both routes off (403).

Changes run on the generation worker, between generations, so a removal never pulls a pipeline out
from under a running job.
"""
from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from engine.errors import UserError
from engine.service.errors import ServiceError

MAX_BODY = 64 * 1024  # a source declaration is a few hundred bytes
_TYPES = {str: "a string", int: "an integer", float: "a number", dict: "a JSON object", bool: "true or false"}


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
    except ValueError:
        raise ServiceError(400, "bad_request", "send a JSON object: {\"name\", \"kind\"?, \"params\"?}") from None
    if not isinstance(body, dict):
        raise ServiceError(400, "bad_request", "send a JSON object: {\"name\", \"kind\"?, \"params\"?}")
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
            raise UserError(f"{param.name} of a {name} source must be {what}, not {type(value).__name__}")
    return name, params


def police(kind: str, params: dict[str, Any], policy: SourcePolicy, store_root: Path) -> dict[str, Any]:
    """`params` with every path resolved inside the sources roots; 403 for what the policy refuses."""
    from engine import sources
    from engine.api_http import resolve

    found = sources.get(kind)
    checked = dict(params)
    roots = policy.resolved_roots(store_root)
    for param in found.params:
        value = checked.get(param.name)
        if value is None:
            continue
        if (param.metavar or "").startswith("FILE["):  # files with a suffix (a LoRA's FILE[:SCALE], listed)
            from engine.sources.lora import parse_loras

            pairs = parse_loras(value)
            checked[param.name] = [f"{_inside(_plain(path, param.name), roots, policy.anywhere, param.name)}:{scale!r}"
                                   for path, scale in pairs]
        elif param.is_path:
            resolved = [_inside(_plain(item, param.name), roots, policy.anywhere, param.name)
                        for item in (value if isinstance(value, list) else [value])]
            checked[param.name] = resolved if isinstance(value, list) else resolved[0]
        elif param.name.endswith("_env") and not policy.anywhere and value not in policy.key_envs:
            raise _refused("env_not_allowed", f"{param.name} {value[:80]!r} is not one this server lets HTTP clients "
                                              "name (the operator lists them with --sources-key-env)")
        elif param.metavar == "URL" and not policy.anywhere:
            host = (urlsplit(value).hostname or "") if isinstance(value, str) else ""
            try:
                addresses = [info[4][0] for info in resolve(host, 443, 5.0)] if host else []
            except OSError:
                raise UserError(f"{param.name}: cannot resolve the host {host[:80]!r}") from None
            for text in addresses:
                address = ipaddress.ip_address(text.split("%")[0])
                if address.version == 6 and address.ipv4_mapped:
                    address = address.ipv4_mapped
                if not address.is_global:
                    raise _refused("address_not_allowed", f"{param.name}: {host[:80]} is a non-public address; "
                                                          "this server lets HTTP clients name public APIs only")
    return checked


def _plain(value: str, field: str) -> str:
    """A path as given: `~` and `$VAR` are refused over HTTP (expanding them reads the server's environment)."""
    if "$" in value or value.startswith("~") or "\0" in value:
        raise UserError(f"{field}: `~` and `$VAR` are not expanded over HTTP: give the path itself")
    return value


def _inside(value: str, roots: tuple[Path, ...], anywhere: bool, field: str) -> str:
    path = Path(value)
    resolved = (path if path.is_absolute() else roots[0] / path).resolve()
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
    try:
        kind, params = kind_and_params(kind, fields)
        params = await asyncio.to_thread(police, kind, params, policy, service.store.root)
        future = service.generation.submit(("source", name), lambda: service.ws.add_source(name, kind=kind, **params))
        info = await asyncio.wrap_future(future)
    except UserError as exc:
        raise ServiceError(422, exc.code if exc.code != "bad_request" else "invalid_source", str(exc)) from None
    return {k: v for k, v in info.items() if k != "path"}  # the server's folders are not disclosed


async def remove(service, policy: SourcePolicy, name: str) -> dict:
    if policy.read_only:
        raise _refused("read_only", "this server does not change its sources over HTTP (--sources-read-only)")
    future = service.generation.submit(("source", name), lambda: service.ws.remove_source(name))
    return {"removed": name, "vectors": await asyncio.wrap_future(future)}

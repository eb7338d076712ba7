"""C2PA manifests through c2pa-python (optional), offline: remote manifests are never fetched and
trust anchors come only from a local PEM file (argument, or $RESYNTH_C2PA_TRUST_ANCHORS).

States: valid (signature and hashes check out and the signer chains to a configured anchor),
untrusted (cryptographically intact, signer not anchored: typical for camera makers until their
roots are configured), invalid (tampered, broken or unreadable manifest), none (no manifest),
remote (the file only points to a manifest URL, which is never fetched), unavailable (c2pa-python
not installed or not working), skipped (not asked for).
"""
from __future__ import annotations

import io
import json
import os
import re
from pathlib import Path

from engine.provenance.containers import source_type_term

TRUST_ENV = "RESYNTH_C2PA_TRUST_ANCHORS"
_TRUST_ONLY = {"signingCredential.untrusted"}  # failures that only say "signer not anchored"
MAX_ANCHORS = 4 << 20
MAX_ACTIONS = 20  # actions of the active manifest summarised (the first; its digital source type is looked for in all)


def may_carry_manifest(data: bytes, xmp: str | None) -> bool:
    """False only when the file cannot hold a manifest c2pa would find: an embedded manifest is a JUMBF
    box, never compressed, so its box type ("jumb") or its label ("c2pa") is in the raw bytes; a remote
    one is an XMP `dcterms:provenance` URL, found in the raw bytes or in `xmp` (the container reader's
    XMP, decompressed). Most queries carry none, and this skips the native reader, the costliest part
    of reading a query file."""
    return (b"jumb" in data or b"c2pa" in data or b"provenance" in data  # XMP as stored (TIFF, HEIC ...)
            or (xmp is not None and "provenance" in xmp))


def check(data: bytes, trust_anchors: str | os.PathLike | None = None, xmp: str | None = "") -> dict:
    """The C2PA state of a file's bytes. `xmp`: its XMP as the container reader found it (None: none),
    which lets a file without any manifest skip the native reader; the default always runs it."""
    try:
        import c2pa
    except Exception as e:  # ImportError, or a native library that fails to load
        return {"state": "unavailable", "reason": f"not available: pip install c2pa-python ({type(e).__name__})"}
    anchors_path = trust_anchors if trust_anchors is not None else os.environ.get(TRUST_ENV) or None
    settings: dict = {"verify": {"remote_manifest_fetch": False, "ocsp_fetch": False, "verify_trust": True}}
    out: dict = {"state": "none", "trust_anchors_configured": bool(anchors_path)}  # no server path in answers
    if anchors_path:
        try:
            pem = Path(anchors_path).read_bytes()[:MAX_ANCHORS].decode("ascii")
        except (OSError, UnicodeDecodeError) as e:
            return {**out, "state": "unavailable", "reason": f"trust anchors file not readable ({type(e).__name__})"}
        settings["trust"] = {"trust_anchors": pem}
    if xmp != "" and not may_carry_manifest(data, xmp):
        return out
    try:
        context = c2pa.Context(settings=c2pa.Settings.from_dict(settings))
        reader = c2pa.Reader.try_create(None, io.BytesIO(data), None, context)
    except c2pa.C2paError as e:
        text = str(e)[:300]
        if text.startswith("Remote"):  # only a URL in the file; fetching it would leave the machine
            url = re.search(r"url (\S+)", text)
            return {**out, "state": "remote", "remote_url": url.group(1)[:500] if url else None,
                    "reason": "the manifest is stored remotely and remote fetching is off"}
        if "NotSupported" in type(e).__name__ or "not supported" in text.lower():
            return {**out, "state": "none", "reason": f"format not supported by c2pa: {text}"}
        if b"jumb" not in data and b"c2pa" not in data:  # a broken file with no trace of a manifest
            return {**out, "state": "none", "reason": f"file not parsable by c2pa, no manifest seen: {text}"}
        return {**out, "state": "invalid", "reason": text}
    except Exception as e:  # a misbehaving native binding must not take the request down
        return {**out, "state": "unavailable", "reason": f"c2pa failed: {type(e).__name__}: {str(e)[:300]}"}
    if reader is None:
        return out
    try:
        with reader:
            store = json.loads(reader.json())
    except Exception as e:
        return {**out, "state": "invalid", "reason": f"manifest not readable: {type(e).__name__}: {str(e)[:300]}"}
    return {**out, **summarize(store)}


def summarize(store) -> dict:
    """State plus a small, stable summary of the active manifest (not the whole store)."""
    store = _dict(store)
    state = store.get("validation_state")
    active_results = _dict(_dict(store.get("validation_results")).get("activeManifest"))
    codes = [f.get("code") for f in _list(active_results.get("failure")) if isinstance(f, dict)]
    codes += [f.get("code") for f in _list(store.get("validation_status")) if isinstance(f, dict)]
    failures = list(dict.fromkeys(str(c)[:100] for c in codes if c))[:20]
    if state == "Trusted":
        verdict = "valid"
    elif state == "Valid" or (state == "Invalid" and failures and set(failures) <= _TRUST_ONLY):
        verdict = "untrusted"
    else:
        verdict = "invalid"
    manifests = _dict(store.get("manifests"))
    active = _dict(manifests.get(str(store.get("active_manifest"))))
    return {"state": verdict, "validation_state": state, "failures": failures,
            "manifests": len(manifests), **_manifest_summary(active)}


def _manifest_summary(m: dict) -> dict:
    gen = m.get("claim_generator")
    info = m.get("claim_generator_info")
    if not gen and isinstance(info, list) and info and isinstance(info[0], dict):
        gen = " ".join(str(info[0].get(k)) for k in ("name", "version") if info[0].get(k))
    actions: list[dict] = []
    dst = None
    for a in _list(m.get("assertions")):
        if not isinstance(a, dict) or not str(a.get("label", "")).startswith("c2pa.actions"):
            continue
        for act in _list(_dict(a.get("data")).get("actions"))[:20]:
            if not isinstance(act, dict):
                continue
            agent = act.get("softwareAgent")
            agent = agent.get("name") if isinstance(agent, dict) else agent
            term = act.get("digitalSourceType")
            term = source_type_term(term) if isinstance(term, str) else None
            dst = dst or term
            if len(actions) >= MAX_ACTIONS:  # each c2pa.actions assertion holds up to 20: 50 of them in a 250 KB
                continue  # file made 1020 in the answer
            actions.append({"action": str(act.get("action", ""))[:100],
                            "software_agent": str(agent)[:200] if agent else None,
                            "digital_source_type": term})
    sig = _dict(m.get("signature_info"))
    return {"claim_generator": str(gen)[:200] if gen else None,
            "title": str(m["title"])[:300] if m.get("title") else None,
            "actions": actions, "digital_source_type": dst,
            "signer": {k: str(sig[k])[:200] for k in ("issuer", "common_name", "time") if sig.get(k)} or None,
            "ingredients": len(_list(m.get("ingredients")))}


def _dict(x) -> dict:
    return x if isinstance(x, dict) else {}


def _list(x) -> list:
    return x if isinstance(x, list) else []



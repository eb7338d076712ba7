"""Vectors with the neighbour structure of trained image features, for the dataset-search benchmark.

Why: uniform random vectors (or a description centre plus noise and nothing else) have no content
structure, so an IVF index must scan most of its lists to find a query's neighbours; real features
cluster by content and by generator. This module measures that structure on labelled feature sets
(`structure`) and draws N vectors at any dimension with the same statistics (`generate`), seeded.

The model (every vector L2-normalised at the end), for image i of source s and description t:

    v = normalise(m + c[t] + a[s] + g[(s, t)] + e[i])

* m: a common direction shared by every vector (trained features are never centred: unrelated images
  have cosine ~ |m|^2 > 0);
* c[t]: the description's content, drawn from a low-rank content manifold: a topic centre (TOPICS of
  them) plus a within-topic offset, both with a power-law spectrum over `content_rank` directions,
  so descriptions have real neighbours (other descriptions of the same topic) at every size;
* a[s]: the source's direction (a generator's style, shared across descriptions);
* g[(s, t)]: the interaction: how this source renders this description;
* e[i]: the seed's own noise, with the same power-law spectrum over the full dimension.

The squared norms of the parts are solved from four measured mean cosines (unrelated, same description
across sources, same source across descriptions, same (source, description) group), so the generator
reproduces them by construction at any dimension; `check` in bench_realistic.py compares the rest
(neighbour composition, effective dimension) on a replica of the measured layout.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

TOPICS_PER_DESCRIPTIONS = 25  # descriptions per topic on average (content clusters, e.g. "portraits of old men")


def _power_directions(rng: np.random.Generator, n: int, dim: int, rank: int, alpha: float) -> np.ndarray:
    """n random vectors of expected squared norm 1 whose variance decays as k^-alpha over `rank` fixed
    directions (the first `rank` axes of a fixed random rotation applied by the caller)."""
    rank = min(rank, dim)
    scale = np.arange(1, rank + 1, dtype=np.float64) ** (-alpha / 2)
    scale /= np.sqrt(np.sum(scale ** 2))
    out = np.zeros((n, dim), np.float32)
    out[:, :rank] = rng.standard_normal((n, rank)).astype(np.float32) * scale.astype(np.float32)
    return out


@dataclass
class Structure:
    """Squared norms of the parts (they sum to 1) and the spectra's shape."""

    common: float  # |m|^2: the unrelated pairs' mean cosine
    description: float  # |c|^2: added by sharing a description
    source: float  # |a|^2: added by sharing a source
    group: float  # |g|^2: added by sharing both
    noise: float  # |e|^2: what a seed alone carries
    alpha: float = 1.0  # spectrum decay of content and noise (variance of the k-th direction ~ k^-alpha)
    content_rank: int = 256  # directions the content manifold spans
    topic_share: float = 0.5  # of the description part, the share its topic carries

    @classmethod
    def from_cosines(cls, unrelated: float, same_description: float, same_source: float, same_group: float,
                     **rest) -> "Structure":
        """The parts' squared norms from the four mean cosines (each level adds its part)."""
        common = max(unrelated, 0.0)
        description = max(same_description - common, 0.0)
        source = max(same_source - common, 0.0)
        group = max(same_group - common - description - source, 0.0)
        noise = max(1.0 - common - description - source - group, 1e-3)
        return cls(common, description, source, group, noise, **rest)

    def to_dict(self) -> dict:
        return asdict(self)


# Fitted by `bench_realistic.py check` to DINOv2-small block-6 features of the real-weight GAN sets
# (gan-one, gan-labels): unrelated 0.964, same source 0.984, same group 0.984; a shared description
# (a class label there) adds nothing; within-source effective dimension 8.5 -> alpha 1.25.
MEASURED = Structure(common=0.9637, description=0.0, source=0.0207, group=0.0, noise=0.0156, alpha=1.25)


def generate(n: int, dim: int, structure: Structure, *, sources: int = 20, seeds: int = 4, seed: int = 0,
             queries: int = 0, chunk: int = 65536) -> tuple[np.ndarray, np.ndarray, dict]:
    """(stored (n, dim) float32, queries (queries, dim) float32, layout) drawn from `structure`.

    The store holds `sources` generators x n/(sources*seeds) descriptions x `seeds` resyntheses each,
    in that order. Half the queries are a new seed of a stored (source, description), half are a stored
    source rendering a new description of a stored topic (neighbours by content only). Same seed, same
    vectors, on any machine; memory is the output plus one chunk."""
    rng = np.random.default_rng(seed)
    per_description = sources * seeds
    descriptions = max(1, -(-n // per_description))
    topics = max(1, descriptions // TOPICS_PER_DESCRIPTIONS)
    s = structure
    rotation, _ = np.linalg.qr(rng.standard_normal((dim, dim)))  # the spectra's axes: fixed, random
    rotation = rotation.astype(np.float32)
    common = rng.standard_normal(dim).astype(np.float32)
    common *= np.sqrt(s.common) / np.linalg.norm(common)
    source_dirs = rng.standard_normal((sources, dim)).astype(np.float32)
    source_dirs *= np.sqrt(s.source / dim)
    topic_part = _power_directions(rng, topics, dim, s.content_rank, s.alpha) @ rotation
    topic_part *= np.sqrt(s.description * s.topic_share)
    topic_of = rng.integers(0, topics, descriptions + queries)
    own = _power_directions(rng, descriptions + queries, dim, s.content_rank, s.alpha) @ rotation
    centres = topic_part[topic_of] + own * np.float32(np.sqrt(s.description * (1 - s.topic_share)))
    del own

    def draw(rows: np.ndarray, desc: np.ndarray, src: np.ndarray, noise_rng: np.random.Generator) -> np.ndarray:
        # g[(s, t)] drawn from a generator keyed by the pair, so a query of a stored pair shares it
        key = (desc.astype(np.int64) * sources + src).astype(np.uint64)
        g = _keyed_normal(key, dim, seed) * np.float32(np.sqrt(s.group / dim))
        e = _power_directions(noise_rng, len(rows), dim, dim, s.alpha) @ rotation
        v = common + centres[desc] + source_dirs[src] + g + e * np.float32(np.sqrt(s.noise))
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        return v.astype(np.float32)

    stored = np.empty((n, dim), np.float32)
    noise_rng = np.random.default_rng([seed, 1])
    for start in range(0, n, chunk):
        rows = np.arange(start, min(n, start + chunk))
        stored[rows] = draw(rows, rows // per_description, (rows // seeds) % sources, noise_rng)
    query_rng = np.random.default_rng([seed, 2])
    half = queries // 2
    q_desc = np.concatenate([query_rng.integers(0, descriptions, half), descriptions + np.arange(queries - half)])
    q_src = query_rng.integers(0, sources, queries)
    q = draw(np.arange(queries), q_desc, q_src, query_rng) if queries else np.zeros((0, dim), np.float32)
    layout = {"sources": sources, "seeds": seeds, "descriptions": descriptions, "topics": topics,
              "query_kinds": {"stored description, new seed": half,
                              "new description of a stored topic": queries - half}}
    return stored, q, layout


def _keyed_normal(keys: np.ndarray, dim: int, seed: int) -> np.ndarray:
    """One standard normal vector per key, the same for the same key in any call (a counter-based draw)."""
    out = np.empty((len(keys), dim), np.float32)
    unique, inverse = np.unique(keys, return_inverse=True)
    block = np.empty((len(unique), dim), np.float32)
    for row, key in enumerate(unique.tolist()):
        block[row] = np.random.default_rng([seed, 3, key]).standard_normal(dim, dtype=np.float32)
    out[:] = block[inverse]
    return out


def labels_of(n: int, sources: int = 20, seeds: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """(description, source) of each stored row of `generate`."""
    rows = np.arange(n)
    return rows // (sources * seeds), (rows // seeds) % sources


# ----------------------------------------------------------------------------------- measuring

def level_cosines(vectors: np.ndarray, source: np.ndarray, description: np.ndarray) -> dict:
    """Mean cosine (and count) of pairs: same (source, description), same source only, same description
    only, neither."""
    v = np.asarray(vectors, np.float64)
    sims = v @ v.T
    same_s = source[:, None] == source[None, :]
    same_d = description[:, None] == description[None, :]
    off = ~np.eye(len(v), dtype=bool)
    out = {}
    for name, mask in (("same_group", same_s & same_d & off), ("same_source", same_s & ~same_d),
                       ("same_description", ~same_s & same_d), ("unrelated", ~same_s & ~same_d)):
        out[name] = {"mean": float(sims[mask].mean()) if mask.any() else None,
                     "std": float(sims[mask].std()) if mask.any() else None, "pairs": int(mask.sum() // 2)}
    return out


def effective_dimension(vectors: np.ndarray) -> float:
    """Participation ratio of the centred covariance's eigenvalues: (sum l)^2 / sum l^2."""
    v = np.asarray(vectors, np.float64)
    v = v - v.mean(0)
    eig = np.clip(np.linalg.svd(v, compute_uv=False) ** 2, 0, None)
    return float(eig.sum() ** 2 / (eig ** 2).sum())


def neighbour_composition(vectors: np.ndarray, source: np.ndarray, description: np.ndarray, k: int = 5) -> dict:
    """Of each vector's k nearest others: the share in its group, its source only, its description only."""
    v = np.asarray(vectors, np.float64)
    sims = v @ v.T
    np.fill_diagonal(sims, -np.inf)
    k = min(k, len(v) - 1)
    top = np.argsort(-sims, axis=1)[:, :k]
    same_s = source[top] == source[:, None]
    same_d = description[top] == description[:, None]
    return {"k": k, "group": float((same_s & same_d).mean()), "source_only": float((same_s & ~same_d).mean()),
            "description_only": float((~same_s & same_d).mean()), "neither": float((~same_s & ~same_d).mean())}


def structure(vectors: np.ndarray, source: np.ndarray, description: np.ndarray) -> dict:
    """Every statistic the generator is fitted to or checked against, for one labelled set."""
    cos = level_cosines(vectors, source, description)
    groups = np.unique(np.stack([source, description], 1), axis=0, return_counts=True)[1]
    return {"vectors": int(len(vectors)), "dim": int(vectors.shape[1]), "cosines": cos,
            "effective_dimension": effective_dimension(vectors),
            "within_source_effective_dimension": effective_dimension(
                vectors - np.stack([vectors[source == s].mean(0) for s in source])),
            "neighbours": neighbour_composition(vectors, source, description),
            "sizes": {"sources": int(len(np.unique(source))), "descriptions": int(len(np.unique(description))),
                      "group_size_mean": float(groups.mean()), "group_size_max": int(groups.max())}}

"""Gene embeddings of a checkpoint (the published gene-embedding tutorial): ``ricefm genes``.

A gene's embedding is the model's token encoder without any cell context,
LayerNorm(Embedding(gene)) with ``encoder.embedding`` and ``encoder.enc_norm``. It is computed
here in NumPy from the checkpoint's arrays, so it is the same for every backend. Genes are
compared by cosine similarity, and the pairs above a threshold are drawn as a network.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from ricefm.atomic import staged_dir
from ricefm.errors import RiceFMInputError
from ricefm.vocab import GeneVocab

EMBEDDING, NORM = "encoder.embedding.weight", "encoder.enc_norm"


def read_gene_list(spec: str) -> list[str]:
    """Genes from a file (one per line, or the first column of a .csv / .tsv; ``#`` starts a comment)
    or a comma-separated list; order kept, duplicates dropped."""
    path = Path(spec)
    if path.is_file():
        sep = "," if path.suffix == ".csv" else "\t"
        genes = []
        for line in path.read_text().splitlines():
            field = line.split("#", 1)[0].split(sep)[0].strip()
            if field:
                genes.append(field)
    elif os.sep in spec or spec.endswith((".txt", ".csv", ".tsv")):
        raise RiceFMInputError(f"--genes {spec}: file not found")
    else:
        genes = [g.strip() for g in spec.split(",") if g.strip()]
    genes = list(dict.fromkeys(genes))
    if not genes:
        raise RiceFMInputError(f"--genes {spec!r}: no gene ids (a file with one per line, or A,B,C)")
    return genes


@dataclass
class ResolvedGenes:
    names: list[str]  # as given
    vocab_genes: list[str]  # the vocabulary's id for each (after the gene map)
    ids: np.ndarray
    unknown: list[str]  # given genes that are not in the vocabulary (after the gene map)


def resolve_genes(genes: Sequence[str], vocab: GeneVocab, gene_map: Mapping[str, str] | None = None) -> ResolvedGenes:
    targets = [gene_map.get(g, g) if gene_map is not None else g for g in genes]
    found = vocab.lookup(targets)
    names, vocab_genes, ids, unknown = [], [], [], []
    for g, target, i in zip(genes, targets, found.tolist()):
        if i < 0:
            unknown.append(g)
        else:
            names.append(g)
            vocab_genes.append(target)
            ids.append(i)
    return ResolvedGenes(names, vocab_genes, np.asarray(ids, np.int64), unknown)


def token_embeddings(state: Mapping[str, np.ndarray], ids: np.ndarray, eps: float) -> np.ndarray:
    """LayerNorm(Embedding(ids)) in float64, as float32 (the model's token encoder without cell context)."""
    x = np.asarray(state[EMBEDDING], np.float64)[ids]
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    y = (x - mean) / np.sqrt(var + eps) * state[f"{NORM}.weight"] + state[f"{NORM}.bias"]
    return y.astype(np.float32)


def cosine_similarity(e: np.ndarray) -> np.ndarray:
    unit = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
    return np.clip(unit @ unit.T, -1.0, 1.0)


def network_png(sim: np.ndarray, names: Sequence[str], threshold: float, path: Path, title: str) -> int:
    """A graph of the gene pairs with cosine similarity >= ``threshold`` (edge width by similarity;
    genes without such a pair are drawn unconnected); returns the number of edges."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import networkx as nx

    g = nx.Graph()
    g.add_nodes_from(names)
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            if sim[i, j] >= threshold:
                g.add_edge(names[i], names[j], weight=float(sim[i, j]))
    size = 4 + 0.25 * len(names) ** 0.5 * 4
    fig, ax = plt.subplots(figsize=(size, size))
    pos = nx.spring_layout(g, seed=0, weight="weight")
    widths = [1 + 4 * (d["weight"] - threshold) / max(1e-6, 1 - threshold) for *_, d in g.edges(data=True)]
    nx.draw_networkx_edges(g, pos, ax=ax, width=widths, edge_color="#7a9cc6", alpha=0.8)
    nx.draw_networkx_nodes(g, pos, ax=ax, node_size=120, node_color="#2d6a4f")
    nx.draw_networkx_labels(g, pos, ax=ax, font_size=7, verticalalignment="bottom")
    ax.set_title(title)
    ax.margins(0.15)  # room for the labels of genes at the edge
    ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return g.number_of_edges()


def write_gene_report(output: str | Path, genes: ResolvedGenes, emb: np.ndarray, threshold: float,
                      info: dict[str, Any]) -> dict[str, Any]:
    """``output/`` (swapped in when complete): embeddings.tsv, similarity.tsv, pairs.tsv (pairs at or
    above the threshold, most similar first), network.png, unknown_genes.txt and summary.json."""
    if not -1 <= float(threshold) <= 1:
        raise RiceFMInputError(f"--threshold {threshold}: a cosine similarity between -1 and 1")
    sim = cosine_similarity(emb)
    label = [n if n == v else f"{n} ({v})" for n, v in zip(genes.names, genes.vocab_genes)]
    i, j = np.triu_indices(len(label), k=1)
    above = sim[i, j] >= threshold
    pairs = pd.DataFrame({"gene_a": np.asarray(genes.names, dtype=object)[i[above]],
                          "gene_b": np.asarray(genes.names, dtype=object)[j[above]],
                          "cosine": sim[i, j][above]}).sort_values("cosine", ascending=False)
    summary = {**info, "genes_given": len(genes.names) + len(genes.unknown), "genes_found": len(genes.names),
               "unknown_genes": genes.unknown, "threshold": float(threshold), "pairs_at_or_above": int(above.sum())}
    with staged_dir(Path(output)) as folder:
        table = pd.DataFrame(emb, index=pd.Index(genes.names, name="gene"),
                             columns=[f"dim{k}" for k in range(emb.shape[1])])
        table.insert(0, "vocab_gene", genes.vocab_genes)
        table.to_csv(folder / "embeddings.tsv", sep="\t", float_format="%.6g")
        pd.DataFrame(sim, index=genes.names, columns=genes.names).to_csv(folder / "similarity.tsv", sep="\t",
                                                                         float_format="%.6f")
        pairs.to_csv(folder / "pairs.tsv", sep="\t", index=False, float_format="%.6f")
        (folder / "unknown_genes.txt").write_text("".join(f"{g}\n" for g in genes.unknown))
        network_png(sim, genes.names, threshold, folder / "network.png",
                    f"gene embedding cosine >= {threshold:g} ({int(above.sum())} pairs, {len(genes.names)} genes)")
        (folder / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary

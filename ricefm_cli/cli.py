"""The ``ricefm`` command line. Bad input ends with one line on stderr and exit code 2
(``ricefm verify`` exits 1 when it finds damage).

The top layer (DESIGN.md section 1): it reaches the backends through the registry
(``ricefm.backends``) and checkpoints through ``converters``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from ricefm.backends import BACKENDS
from ricefm.errors import RiceFMInputError

DEVICE_HELP = "auto | npu | cuda | tpu | cpu (torch: npu, cuda, cpu; jax: cuda, tpu, cpu); auto picks the best one"


def _build_data(args: argparse.Namespace) -> None:
    from ricefm.shards.build import BuildOptions, build_dataset, format_summary

    opts = BuildOptions(
        layer=args.layer, gene_column=args.gene_column, modality=args.modality,
        keep_obs=tuple(c for c in (args.keep_obs or "").split(",") if c),
        cells_per_shard=args.cells_per_shard, gene_map=args.gene_map,
        min_gene_fraction=args.min_gene_fraction, build_vocab=args.build_vocab, allow_non_counts=args.allow_non_counts)
    manifest = build_dataset(args.inputs, args.output, vocab_path=args.vocab, options=opts, progress=not args.quiet)
    if args.build_vocab and args.vocab:
        _export_vocab(args.output, args.vocab)
    print(format_summary(manifest, args.output))


def _export_vocab(dataset: str, path: str) -> None:
    """--build-vocab with --vocab PATH also writes the new vocabulary to PATH (never a different one over it)."""
    from pathlib import Path

    from ricefm.storage import Location
    from ricefm.vocab import GeneVocab

    loc = Location.parse(dataset)
    built = GeneVocab.from_json(loc.read("vocab.json") or b"", loc.show("vocab.json"))
    if Path(path).exists():
        if GeneVocab.load(path) != built:
            raise RiceFMInputError(f"{path}: exists with different contents; --build-vocab will not overwrite it, choose another --vocab path")
        return
    built.save(path)


def _embed(args: argparse.Namespace) -> None:
    from ricefm.embed import check_embed_settings, check_output_file, embed_h5ad, load_embedder

    check_embed_settings(args.batch_size, args.max_seq_len)
    check_output_file(args.input, args.output)
    embedder = load_embedder(args.backend, args.checkpoint, device=args.device)
    info = embed_h5ad(args.input, args.output, embedder, batch_size=args.batch_size, max_seq_len=args.max_seq_len,
                      selection=args.selection, layer=args.layer, gene_column=args.gene_column,
                      gene_map=args.gene_map, modality=args.modality, min_gene_fraction=args.min_gene_fraction,
                      progress=not args.quiet)
    print(f"{args.output}: obsm['X_ricefm'] for {info['cells']:,} cells ({info['backend']}, max_seq_len "
          f"{info['max_seq_len']}, {info['genes_matched']:,} genes in the vocabulary; "
          f"{info['cells_without_vocab_genes']:,} cells without any, embedded from <cls> alone)")


def _convert(args: argparse.Namespace) -> None:
    from converters.formats import convert

    ckpt = convert(args.src, args.dst, args.to)
    print(f"{args.src} ({ckpt.format}) -> {args.dst} ({args.to}): {len(ckpt.state)} tensors, "
          f"{sum(v.size for v in ckpt.state.values()):,} parameters, vocabulary {len(ckpt.vocab):,}")


def _benchmark(args: argparse.Namespace) -> None:
    from ricefm.evaluate.annotation import annotation_config
    from ricefm.evaluate.datasets import resolve_dataset
    from ricefm.evaluate.report import markdown
    from ricefm.embed import check_embed_settings
    from ricefm_cli.benchmark import run_benchmark

    check_embed_settings(args.batch_size, args.max_seq_len)
    if Path(args.output).exists() and not Path(args.output).is_dir():
        raise RiceFMInputError(f"--output {args.output}: is a file; the report is a folder, choose another name")
    exclude = None if args.exclude_labels is None else tuple(x for x in args.exclude_labels.split(",") if x)
    dataset = resolve_dataset(args.dataset, args.label_key, exclude)
    backends = [b for b in args.backends.split(",") if b]
    unknown = sorted(set(backends) - set(BACKENDS))
    if unknown or not backends:
        raise RiceFMInputError(f"--backends {args.backends!r}: a comma-separated list of {' and '.join(BACKENDS)}")
    annotation = annotation_config(args.annotation)
    annotation.enabled = annotation.enabled and not args.no_annotation
    report = run_benchmark(args.checkpoint, dataset, backends, args.output, batch_size=args.batch_size,
                           max_seq_len=args.max_seq_len, device=args.device, progress=not args.quiet,
                           annotation=annotation)
    print(markdown(report))
    print(f"wrote {args.output}/: " + ", ".join(sorted(p.name for p in Path(args.output).iterdir())))


def _finetune(args: argparse.Namespace) -> None:
    from converters.formats import Checkpoint, check_destination, save_checkpoint
    from ricefm.evaluate.annotation import annotation_config, load_finetuner, validate_config
    from ricefm.finetune import finetune, read_reference

    cfg = annotation_config(args.config_overrides, flag="--config")
    validate_config(cfg, "--config")
    if not Path(args.input).is_file():
        raise RiceFMInputError(f"--input {args.input}: input file not found")
    check_destination(args.output)
    ft = load_finetuner(args.backend, args.checkpoint, args.device)
    exclude = tuple(x for x in (args.exclude_labels or "").split(",") if x)
    ref = read_reference(args.input, args.label_key, ft.vocab, cfg, exclude, args.layer, args.gene_column,
                         args.gene_map, args.modality, args.min_gene_fraction, progress=not args.quiet)
    state, record = finetune(ft, ref, cfg, progress=not args.quiet)
    save_checkpoint(Checkpoint(state, ft.model_config, ft.vocab, "seed", finetune=record), args.output, "seed")
    v = record["validation"]
    left_out = record["reference"]["classes_left_out"]
    print(f"{args.output}: {len(record['class_names'])} classes, {record['train_cells']:,} training + "
          f"{record['valid_cells']:,} validation cells ({ft.description}); best epoch {record['best_epoch']}: "
          f"validation macro-F1 {v['macro_f1']:.3f}, accuracy {v['accuracy']:.3f}"
          + (f"; left out (under {cfg.min_cells_per_class} cells): {', '.join(left_out)}" if left_out else ""))


def _annotate(args: argparse.Namespace) -> None:
    import json

    from ricefm.annotate import UNASSIGNED, annotate_h5ad, load_classifier, score_against_labels
    from ricefm.embed import check_embed_settings, check_output_file

    check_embed_settings(args.batch_size, args.max_seq_len)
    check_output_file(args.input, args.output)
    if not 0 <= args.min_confidence <= 1:
        raise RiceFMInputError(f"--min-confidence {args.min_confidence}: a probability between 0 and 1")
    clf = load_classifier(args.backend, args.checkpoint, device=args.device)
    pred, info, truth = annotate_h5ad(args.input, args.output, clf, batch_size=args.batch_size,
                                      max_seq_len=args.max_seq_len, min_confidence=args.min_confidence,
                                      layer=args.layer, gene_column=args.gene_column, gene_map=args.gene_map,
                                      modality=args.modality, min_gene_fraction=args.min_gene_fraction,
                                      label_key=args.label_key, progress=not args.quiet)
    print(f"{args.output}: obs['ricefm_label'] for {info['cells']:,} cells ({len(pred.class_names)} classes, "
          f"{info['unassigned']:,} {UNASSIGNED} below confidence {args.min_confidence:g}; {info['backend']})")
    if truth is not None:
        from ricefm.atomic import write_json_atomic
        from ricefm.evaluate.annotation import confusion_png

        scores = score_against_labels(pred, truth)
        stem = Path(args.output).with_suffix("")
        write_json_atomic(f"{stem}.metrics.json", scores)
        png = Path(f"{stem}.confusion.png")
        tmp = png.with_name(f".{png.name}.tmp.png")
        confusion_png({clf.description: scores["confusion"]}, pred.class_names, tmp,
                      f"{Path(args.input).name}: {scores['cells_scored']:,} cells with a known label")
        tmp.replace(png)
        print(f"against obs[{args.label_key!r}] ({scores['cells_scored']:,} cells; {scores['cells_not_scored']:,} "
              f"with other labels not scored): accuracy {scores['accuracy']:.3f}, macro-F1 {scores['macro_f1']:.3f}; "
              f"wrote {stem}.metrics.json and {png}")
        if scores["labels_not_in_checkpoint"]:
            print("labels not among the checkpoint's classes: " + json.dumps(scores["labels_not_in_checkpoint"]))


def _genes(args: argparse.Namespace) -> None:
    from converters.formats import load_checkpoint
    from ricefm.gene_embeddings import read_gene_list, resolve_genes, token_embeddings, write_gene_report
    from ricefm.gene_maps import load_gene_map

    genes = read_gene_list(args.genes)
    if not -1 <= args.threshold <= 1:
        raise RiceFMInputError(f"--threshold {args.threshold}: a cosine similarity between -1 and 1")
    if Path(args.output).exists() and not Path(args.output).is_dir():
        raise RiceFMInputError(f"--output {args.output}: is a file; the report is a folder, choose another name")
    ckpt = load_checkpoint(args.checkpoint)
    resolved = resolve_genes(genes, ckpt.vocab, load_gene_map(args.gene_map) if args.gene_map else None)
    if len(resolved.names) < 2:
        raise RiceFMInputError(f"--genes: {len(resolved.names)} of {len(genes)} genes are in the checkpoint's "
                               f"vocabulary (unknown: {', '.join(resolved.unknown[:10])}); need at least 2"
                               + ("" if args.gene_map else "; RAP-DB ids need --gene-map rap-to-msu"))
    emb = token_embeddings(ckpt.state, resolved.ids, float(ckpt.model.layer_norm_eps))
    summary = write_gene_report(args.output, resolved, emb, args.threshold,
                                {"checkpoint": str(args.checkpoint), "gene_map": args.gene_map,
                                 "d_model": int(emb.shape[1])})
    print(f"{args.output}/: {summary['genes_found']} genes, {summary['pairs_at_or_above']} pairs with cosine >= "
          f"{args.threshold:g}" + (f"; not in the vocabulary ({len(resolved.unknown)}): "
                                   f"{', '.join(resolved.unknown[:10])}{' ...' if len(resolved.unknown) > 10 else ''}"
                                   if resolved.unknown else ""))


def _verify(args: argparse.Namespace) -> int:
    from ricefm_cli.verify import format_report, verify

    report = verify(args.path, progress=not args.quiet)
    print(format_report(report))
    return 1 if report["problems"] else 0


def _doctor(args: argparse.Namespace) -> None:
    from ricefm_cli.doctor import format_report, report

    print(format_report(report(args.device)))


def _h5ad_input_options(p: argparse.ArgumentParser) -> None:
    """How an .h5ad's counts and genes are read (embed, finetune, annotate), as for build-data."""
    from ricefm.gene_maps import GENE_MAP_NAMES
    from ricefm.shards.build import DEFAULT_MIN_GENE_FRACTION

    p.add_argument("--layer", default=None, help="read counts from layers[NAME] instead of X")
    p.add_argument("--gene-column", default=None, help="var column holding gene ids (default: var_names)")
    p.add_argument("--gene-map", default=None, choices=GENE_MAP_NAMES, help="translate gene ids with a shipped table")
    p.add_argument("--modality", default="scrna", help="scrna | spatial | obs:COLUMN")
    p.add_argument("--min-gene-fraction", type=float, default=DEFAULT_MIN_GENE_FRACTION)


def make_parser() -> argparse.ArgumentParser:
    from ricefm.gene_maps import GENE_MAP_NAMES
    from ricefm.shards.build import DEFAULT_CELLS_PER_SHARD, DEFAULT_MIN_GENE_FRACTION

    p = argparse.ArgumentParser(prog="ricefm", description="riceFM: data shards, checkpoints, embeddings, evaluation")
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build-data", help="AnnData (.h5ad) files -> TensorStore cell shards")
    b.add_argument("inputs", nargs="+", metavar="INPUT", help=".h5ad files with raw counts")
    b.add_argument("--output", required=True,
                   help="dataset to create: a folder, or s3://BUCKET/PREFIX, gs://BUCKET/PREFIX (credentials and "
                        "endpoint from the AWS_* / Google environment)")
    b.add_argument("--vocab", default=None,
                   help="vocab.json (gene -> id, <pad>/<cls>/<eoc> after the genes); default: shipped rice MSU7 vocabulary. "
                        "With --build-vocab: where to also write the built vocabulary")
    b.add_argument("--build-vocab", action="store_true", help="build the vocabulary from the inputs' genes (sorted)")
    b.add_argument("--layer", default=None, help="read counts from layers[NAME] instead of X")
    b.add_argument("--gene-column", default=None, help="var column holding gene ids (default: var_names)")
    b.add_argument("--gene-map", default=None, choices=GENE_MAP_NAMES, help="translate gene ids with a shipped table first")
    b.add_argument("--modality", default="scrna", help="scrna | spatial | obs:COLUMN (values scrna/spatial or 0/1)")
    b.add_argument("--keep-obs", default="", help="comma-separated obs columns to store as integer codes")
    b.add_argument("--cells-per-shard", type=int, default=DEFAULT_CELLS_PER_SHARD)
    b.add_argument("--min-gene-fraction", type=float, default=DEFAULT_MIN_GENE_FRACTION,
                   help="error if fewer than this fraction of a file's genes are in the vocabulary")
    b.add_argument("--allow-non-counts", action="store_true",
                   help="build from non-integer (normalized or log) values instead of refusing them; recorded in the manifest")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    b.set_defaults(func=_build_data)

    e = sub.add_parser("embed", help="cell embeddings of an .h5ad into obsm['X_ricefm']")
    e.add_argument("--checkpoint", required=True, help="published, torch or Flax checkpoint folder")
    e.add_argument("--input", required=True, help=".h5ad with raw counts")
    e.add_argument("--output", required=True, help=".h5ad to write (the input plus the embeddings)")
    e.add_argument("--backend", default="torch", choices=tuple(BACKENDS))
    e.add_argument("--batch-size", type=int, default=64)
    e.add_argument("--device", default="auto", help=DEVICE_HELP)
    e.add_argument("--max-seq-len", type=int, default=None,
                   help="tokens per cell, <cls> included (default 3001: <cls> + up to 3,000 genes, the published "
                        "inference protocol, whatever the training length)")
    e.add_argument("--selection", default="highest", choices=("highest", "first", "random"),
                   help="genes kept when a cell has more than max_seq_len-1: highest counts (default), first, random")
    _h5ad_input_options(e)
    e.add_argument("--quiet", action="store_true")
    e.set_defaults(func=_embed)

    c = sub.add_parser("convert", help="convert a checkpoint between the published, torch and Flax formats")
    c.add_argument("src", help="checkpoint folder (format detected)")
    c.add_argument("dst", help="new folder")
    c.add_argument("--to", required=True, choices=("seed", "torch", "flax"))
    c.set_defaults(func=_convert)

    k = sub.add_parser("benchmark", help="zero-shot scib metrics and annotation fine-tuning per backend next to PCA; "
                                            "JSON + Markdown + PNG")
    k.add_argument("--checkpoint", required=True)
    k.add_argument("--dataset", required=True,
                   help="rice_root | rice_root_atlas (prepared once, see README) | pbmc68k_reduced | path to an .h5ad")
    k.add_argument("--label-key", default=None, help="obs column with cell types (registered datasets know theirs)")
    k.add_argument("--exclude-labels", default=None, metavar="A,B",
                   help="labels left out of all metrics (registered datasets know theirs, e.g. unlabeled)")
    k.add_argument("--backends", default="jax,torch")
    k.add_argument("--output", default="benchmark_out")
    k.add_argument("--batch-size", type=int, default=64)
    k.add_argument("--max-seq-len", type=int, default=None, help="embedding length (default 3001, as ricefm embed)")
    k.add_argument("--device", default="auto", help=DEVICE_HELP)
    k.add_argument("--annotation", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field of configs/annotation.py (repeatable), e.g. freeze_encoder=true, seeds=0,1,2")
    k.add_argument("--no-annotation", action="store_true", help="zero-shot metrics only (no fine-tuning)")
    k.add_argument("--quiet", action="store_true")
    k.set_defaults(func=_benchmark)

    f = sub.add_parser("finetune", help="fine-tune the encoder + a cell-type head on a labelled reference .h5ad; "
                                        "writes a published-format checkpoint with the class names")
    f.add_argument("--checkpoint", required=True, help="pretrained checkpoint folder (any format)")
    f.add_argument("--input", required=True, help="labelled reference .h5ad with raw counts")
    f.add_argument("--label-key", required=True, help="obs column with the cell types")
    f.add_argument("--output", required=True, help="new folder for the fine-tuned checkpoint")
    f.add_argument("--backend", default="torch", choices=tuple(BACKENDS))
    f.add_argument("--device", default="auto", help=DEVICE_HELP)
    f.add_argument("--exclude-labels", default=None, metavar="A,B", help="labels not to learn (e.g. unlabeled)")
    _h5ad_input_options(f)
    f.add_argument("--quiet", action="store_true")
    f.set_defaults(func=_finetune, takes_config=True)

    a = sub.add_parser("annotate", help="label the cells of a query .h5ad with a fine-tuned checkpoint "
                                        "(obs ricefm_label / ricefm_confidence, obsm ricefm_proba / X_ricefm)")
    a.add_argument("--checkpoint", required=True, help="fine-tuned checkpoint folder (from ricefm finetune)")
    a.add_argument("--input", required=True, help="query .h5ad with raw counts")
    a.add_argument("--output", required=True, help=".h5ad to write (the input plus the annotation)")
    a.add_argument("--backend", default="torch", choices=tuple(BACKENDS))
    a.add_argument("--device", default="auto", help=DEVICE_HELP)
    a.add_argument("--min-confidence", type=float, default=0.5,
                   help="cells whose top class probability is below this are 'unassigned'")
    a.add_argument("--label-key", default=None, help="obs column with known labels: also print accuracy / macro-F1 "
                                                     "and write OUTPUT.metrics.json and OUTPUT.confusion.png")
    a.add_argument("--batch-size", type=int, default=64)
    a.add_argument("--max-seq-len", type=int, default=None, help="default: the length the checkpoint was fine-tuned at")
    _h5ad_input_options(a)
    a.add_argument("--quiet", action="store_true")
    a.set_defaults(func=_annotate)

    g = sub.add_parser("genes", help="gene embeddings (token encoder, no cell context), their cosine similarities "
                                     "and a network of the most similar pairs")
    g.add_argument("--checkpoint", required=True)
    g.add_argument("--genes", required=True, help="a file (one gene id per line, or first column of .csv/.tsv) "
                                                  "or A,B,C")
    g.add_argument("--output", required=True, help="folder for embeddings.tsv, similarity.tsv, pairs.tsv, network.png")
    g.add_argument("--gene-map", default=None, choices=GENE_MAP_NAMES, help="translate the given ids first")
    g.add_argument("--threshold", type=float, default=0.4, help="draw pairs with cosine similarity at least this")
    g.set_defaults(func=_genes)

    v = sub.add_parser("verify", help="check every file of a dataset or checkpoint against its recorded SHA-256 "
                                      "digests (exit 1 when something differs)")
    v.add_argument("path", help="dataset folder or URL (manifest.json), or checkpoint folder")
    v.add_argument("--quiet", action="store_true")
    v.set_defaults(func=_verify)

    d = sub.add_parser("doctor", help="what this machine offers each backend: versions, CUDA/NPU/CANN, JAX devices, "
                                      "and the attention and precision training and embedding would use")
    d.add_argument("--device", default="auto", help="auto | npu | cuda | tpu | cpu: the device to report on")
    d.set_defaults(func=_doctor)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser()
    args, extra = parser.parse_known_args(argv)
    overrides = [e[len("--config."):] for e in extra if e.startswith("--config.")]
    if len(overrides) != len(extra) or (overrides and not getattr(args, "takes_config", False)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.config_overrides = overrides
    try:
        return int(args.func(args) or 0)
    except RiceFMInputError as e:
        print(f"ricefm {args.command}: error: {e}", file=sys.stderr)
        return 2


def console_main() -> int:
    """The ``ricefm`` command: :func:`main` in a process that keeps its freed memory (``ricefm.host_memory``)."""
    from ricefm.host_memory import keep_freed_memory

    keep_freed_memory()
    return main()


if __name__ == "__main__":
    sys.exit(console_main())

"""`medray data import folder|csv|npz|dicom|slides`, `medray data synth`, `medray data show`:
parse, call medray.data, print the counts (read, kept, quarantined) and why files were
quarantined."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from medray.cli import output
from medray.data.config import SynthConfig

SYNTH = SynthConfig()
"""Defaults shown in `data synth --help` (the options stay None so a -c file can set them)."""

group = typer.Typer(
    help="Build the manifest: import images (folder, CSV, npz, DICOM, slides) or synthesise tiles.",
    no_args_is_help=True,
)
importer = typer.Typer(
    help="Import an image collection into <workdir>/data/.", no_args_is_help=True
)

WorkdirOpt = Annotated[
    str, typer.Option("--workdir", "-w", help="Local path or s3://bucket/prefix.")
]
ConfigOpt = Annotated[
    str | None, typer.Option("--config", "-c", help="Data config YAML (configs/data.yaml).")
]
OverridesArg = Annotated[
    list[str] | None,
    typer.Argument(
        help="key.sub=value overrides, e.g. splits.val=0.2; for a source with its own splits "
        "splits.rename.val=test splits.carve_val=0.15 (the file's val becomes test, val is "
        "cut from train)"
    ),
]


def register(app: typer.Typer) -> None:
    group.add_typer(importer, name="import")
    app.add_typer(group, name="data")


def _config(config: str | None, overrides: list[str] | None, workdir: str, **extra):
    from medray.config import load_config
    from medray.data import DataConfig

    return load_config(DataConfig, config, overrides or [], workdir=workdir, **extra)


def print_import(result, workdir: str, title: str = "import") -> None:
    from medray.data import read_quarantine

    output.print_result(title, result)
    output.console.print(
        f"read {result.read}, kept {result.kept}, quarantined {result.quarantined}"
    )
    if result.quarantined:
        frame = read_quarantine(workdir)
        table = Table(title=f"quarantined ({result.quarantine})", title_justify="left")
        table.add_column("file")
        table.add_column("reason")
        for row in frame.head(20).itertuples():
            table.add_row(row.uri, row.reason)
        output.console.print(table)


@group.command("synth")
def synth_cmd(
    workdir: WorkdirOpt,
    overrides: OverridesArg = None,
    n: Annotated[
        int | None, typer.Option("--n", help=f"Number of tiles.  \\[default: {SYNTH.n}]")
    ] = None,
    multi_label: Annotated[
        bool | None,
        typer.Option(
            "--multi-label/--single-label",
            help="Several tissue components per tile, or one class.  \\[default: single-label]",
        ),
    ] = None,
    size: Annotated[
        int | None, typer.Option("--size", help=f"Tile side in pixels.  \\[default: {SYNTH.size}]")
    ] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Seed.  \\[default: 0]")] = None,
    config: ConfigOpt = None,
) -> None:
    """Seeded histology-like tiles (classes differ in nuclei, fibres, empty areas)."""
    from medray.data import synth

    with output.errors_as_exit():
        extra = [f"synth.{k}={v}" for k, v in (("n", n), ("size", size)) if v is not None]
        if multi_label is not None:
            extra.append(f"synth.multi_label={str(multi_label).lower()}")
        cfg = _config(config, (overrides or []) + extra, workdir, seed=seed)
        if cfg.splits.adjusts_source():
            raise ValueError(
                "splits.rename / splits.carve_val: synthetic tiles have no splits of their own "
                "to adjust; splits.train/val/test divide them"
            )
        s = cfg.synth
        result = synth(cfg.workdir, s.n, s.multi_label, cfg.seed, s.size, cfg=cfg)
        print_import(result, cfg.workdir, title="synth")


@importer.command("folder")
def import_folder_cmd(
    source: Annotated[str, typer.Argument(help="SRC/<class>/<image>; local or s3://.")],
    workdir: WorkdirOpt,
    overrides: OverridesArg = None,
    patient_regex: Annotated[
        str | None,
        typer.Option(help="Regex pulling a patient id from each relative path (group 1)."),
    ] = None,
    config: ConfigOpt = None,
) -> None:
    """One subfolder per class."""
    from medray.data import import_folder

    with output.errors_as_exit():
        cfg = _config(config, overrides, workdir)
        print_import(import_folder(source, cfg, patient_regex=patient_regex), cfg.workdir)


@importer.command("csv")
def import_csv_cmd(
    table: Annotated[str, typer.Argument(help="CSV or Parquet file; local or s3://.")],
    workdir: WorkdirOpt,
    overrides: OverridesArg = None,
    path_column: Annotated[str, typer.Option(help="Column with image paths.")] = "path",
    label: Annotated[
        list[str] | None,
        typer.Option(
            "--label",
            "-l",
            help="Label column (repeat). Several, or 1/0/-1/blank values: findings "
            "(multi-label); one column of names: classes.",
        ),
    ] = None,
    patient_column: Annotated[str | None, typer.Option(help="Patient id column.")] = None,
    uncertain: Annotated[
        str, typer.Option(help="-1 findings: ones, zeros or ignore (masked out).")
    ] = "ignore",
    root: Annotated[
        str | None, typer.Option(help="Base for relative paths (default: the table's folder).")
    ] = None,
    split_column: Annotated[
        str | None, typer.Option(help="Column with train/val/test to keep the table's splits.")
    ] = None,
    config: ConfigOpt = None,
) -> None:
    """A path column and label columns (CheXpert-style findings or one class column)."""
    from medray.data import import_csv

    with output.errors_as_exit():
        if not label:
            raise ValueError("give at least one --label column")
        cfg = _config(config, overrides, workdir)
        result = import_csv(
            table,
            cfg,
            path_column=path_column,
            label_columns=label,
            patient_column=patient_column,
            uncertain=uncertain,  # type: ignore[arg-type]
            root=root,
            split_column=split_column,
        )
        print_import(result, cfg.workdir)


@importer.command("npz")
def import_npz_cmd(
    source: Annotated[str, typer.Argument(help="MedMNIST-style .npz; local or s3://.")],
    workdir: WorkdirOpt,
    overrides: OverridesArg = None,
    label_names: Annotated[
        str | None, typer.Option(help="Comma-separated names for label indices 0, 1, ...")
    ] = None,
    config: ConfigOpt = None,
) -> None:
    """Arrays train_images/train_labels, val_*, test_* written out as PNGs; splits kept.

    No test split? `splits.rename.val=test splits.carve_val=0.15`: val is cut from train."""
    from medray.data import import_npz

    with output.errors_as_exit():
        cfg = _config(config, overrides, workdir)
        names = [s.strip() for s in label_names.split(",")] if label_names else None
        print_import(import_npz(source, cfg, label_names=names), cfg.workdir)


LabelOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--label",
        "-l",
        help="Label column of --labels (repeat). Several, or 1/0/-1/blank values: findings "
        "(multi-label); one column of names: classes.",
    ),
]
UncertainOpt = Annotated[str, typer.Option(help="-1 findings: ones, zeros or ignore (masked out).")]


@importer.command("dicom")
def import_dicom_cmd(
    source: Annotated[str, typer.Argument(help="Folder or s3:// prefix, searched recursively.")],
    workdir: WorkdirOpt,
    overrides: OverridesArg = None,
    frames: Annotated[
        str | None,
        typer.Option(help="Multi-frame objects: first, middle (default) or every frame."),
    ] = None,
    labels: Annotated[
        str | None, typer.Option(help="CSV or Parquet table of labels to join on the images.")
    ] = None,
    on: Annotated[
        str,
        typer.Option(
            help="Join --labels on sop_uid, accession, study_uid, series_uid or path "
            "(relative to SOURCE)."
        ),
    ] = "sop_uid",  # fmt: skip
    key_column: Annotated[
        str | None,
        typer.Option(
            help="--labels column holding the join key (default: SOPInstanceUID, "
            "AccessionNumber, StudyInstanceUID, SeriesInstanceUID or path)."
        ),
    ] = None,  # fmt: skip
    label: LabelOpt = None,
    uncertain: UncertainOpt = "ignore",
    patient_salt: Annotated[
        str | None,
        typer.Option(
            envvar="MEDRAY_PATIENT_SALT",
            help="Store sha256(salt + Patient ID) instead of the Patient ID (keep it secret).",
        ),
    ] = None,
    config: ConfigOpt = None,
) -> None:
    """DICOM objects: windowed 8-bit images, header UIDs as columns; non-images quarantined."""
    from medray.data import DicomLabels, import_dicom

    with output.errors_as_exit():
        extra = [f"dicom.frames={frames}"] if frames else []
        cfg = _config(config, (overrides or []) + extra, workdir)
        join = None
        if labels:
            if not label:
                raise ValueError("--labels needs at least one --label column")
            join = DicomLabels(labels, label, on, key_column, uncertain)  # type: ignore[arg-type]
        elif label:
            raise ValueError("--label needs --labels TABLE")
        result = import_dicom(source, cfg, labels=join, patient_salt=patient_salt)
        print_import(result, cfg.workdir)


@importer.command("slides")
def import_slides_cmd(
    source: Annotated[str, typer.Argument(help="Folder or s3:// prefix, searched recursively.")],
    workdir: WorkdirOpt,
    overrides: OverridesArg = None,
    tile_size: Annotated[int | None, typer.Option(help="Tile side in pixels.")] = None,
    mpp: Annotated[float | None, typer.Option(help="Target microns per pixel.")] = None,
    level: Annotated[
        int | None, typer.Option(help="Pyramid level to tile instead of a target mpp.")
    ] = None,
    max_tiles_per_slide: Annotated[
        int | None, typer.Option(help="Most tissue tiles kept per slide (0: all).")
    ] = None,
    labels: Annotated[
        str | None, typer.Option(help="CSV or Parquet table of slide-level labels.")
    ] = None,
    slide_column: Annotated[
        str, typer.Option(help="--labels column naming the slide (path, file name or stem).")
    ] = "slide",
    patient_column: Annotated[
        str | None, typer.Option(help="--labels column with patient ids (else: per slide).")
    ] = None,
    label: LabelOpt = None,
    uncertain: UncertainOpt = "ignore",
    write_tiles: Annotated[
        bool, typer.Option(help="Also write tiles as PNGs (default: read from the slide).")
    ] = False,
    config: ConfigOpt = None,
) -> None:
    """Whole-slide images (OpenSlide) into tissue tiles with coordinates."""
    from medray.data import SlideLabels, import_slides

    with output.errors_as_exit():
        values = {"tile_size": tile_size, "mpp": mpp, "level": level,
                  "max_tiles_per_slide": max_tiles_per_slide}  # fmt: skip
        extra = [f"slides.{k}={v}" for k, v in values.items() if v is not None]
        if write_tiles:
            extra.append("slides.write_tiles=true")
        cfg = _config(config, (overrides or []) + extra, workdir)
        join = None
        if labels:
            if not label:
                raise ValueError("--labels needs at least one --label column")
            join = SlideLabels(labels, label, slide_column, patient_column, uncertain)  # type: ignore[arg-type]
        elif label:
            raise ValueError("--label needs --labels TABLE")
        print_import(import_slides(source, cfg, labels=join), cfg.workdir)


@group.command("show")
def show_cmd(workdir: WorkdirOpt) -> None:
    """Counts of the workdir's manifest: labels, splits, patients, quarantined."""
    from medray.data import read_dataset_info
    from medray.data.manifest import SPLITS

    with output.errors_as_exit():
        info = read_dataset_info(workdir)
        counts = dict(info["counts"])
        stored = counts.get("splits") or {}  # dataset.json sorts keys: show train, val, test
        counts["splits"] = {s: stored[s] for s in SPLITS if s in stored}
        output.print_result("dataset", {"source": info["source"], **counts})

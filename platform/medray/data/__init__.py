"""The data layer: one decoder, the manifest (docs/contracts.md), importers and synthetic tiles.

`medray data import folder|csv|npz` and `medray data synth` write <workdir>/data/:
manifest.parquet (id, uri, labels, patient_id, split, uncertain_labels), quarantine.parquet
(uri, reason, stage) and dataset.json (label names, counts, manifest hash).
"""

from medray.data.config import DataConfig, SplitConfig, SynthConfig
from medray.data.decode import DecodeError, decode_image, to_rgb8
from medray.data.importers import import_csv, import_folder
from medray.data.manifest import (
    ImportResult,
    ManifestError,
    read_dataset_info,
    read_manifest,
    read_quarantine,
    write_manifest,
)
from medray.data.npz import import_npz
from medray.data.splits import assign_splits
from medray.data.synth import synth

__all__ = [
    "DataConfig",
    "DecodeError",
    "ImportResult",
    "ManifestError",
    "SplitConfig",
    "SynthConfig",
    "assign_splits",
    "decode_image",
    "import_csv",
    "import_folder",
    "import_npz",
    "read_dataset_info",
    "read_manifest",
    "read_quarantine",
    "synth",
    "to_rgb8",
    "write_manifest",
]

"""The data layer: one decoder, the manifest (docs/contracts.md), importers and synthetic tiles.

Every stage reads a manifest row's pixels with `read_image(uri)`: a file (PNG, JPEG, TIFF,
DICOM, ...), one frame of a DICOM object or a tile of a whole-slide image.
`medray data import folder|csv|npz|dicom|slides` and `medray data synth` write <workdir>/data/:
manifest.parquet (id, uri, labels, patient_id, split, uncertain_labels), quarantine.parquet
(uri, reason, stage) and dataset.json (label names, counts, manifest hash).
"""

from medray.data.config import DataConfig, SplitConfig, SynthConfig
from medray.data.decode import DecodeError, decode_image, read_image, to_rgb8
from medray.data.dicom_import import DicomLabels, import_dicom
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
from medray.data.slides_import import SlideLabels, import_slides
from medray.data.splits import assign_splits
from medray.data.synth import synth

__all__ = [
    "DataConfig",
    "DecodeError",
    "DicomLabels",
    "ImportResult",
    "ManifestError",
    "SlideLabels",
    "SplitConfig",
    "SynthConfig",
    "assign_splits",
    "decode_image",
    "import_csv",
    "import_dicom",
    "import_folder",
    "import_npz",
    "import_slides",
    "read_dataset_info",
    "read_image",
    "read_manifest",
    "read_quarantine",
    "synth",
    "to_rgb8",
    "write_manifest",
]

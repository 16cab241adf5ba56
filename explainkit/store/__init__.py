"""The HDF5 prediction store, ``RUN/predictions.h5`` (schema in docs/store-format.md).

The store holds what analyzers need so they never touch the dataset: the evaluation images,
targets and source indices, optional object masks, per-epoch logits and the training history.
A head file written once, then one file per committed epoch.

- :mod:`~explainkit.store.schema`: names, types, shapes and settings (per task)
- :mod:`~explainkit.store.validate`: the checks on open and before a writer changes a store
- :mod:`~explainkit.store.writer`: :class:`StoreBuilder`, :func:`append_epoch`, ...
- :mod:`~explainkit.store.reader`: :class:`StoreReader`, :func:`open_store`
"""

from explainkit.store.reader import StoreReader, open_store
from explainkit.store.schema import (
    DATASETS,
    DEFAULT_TASK,
    EPOCH_ATTRIBUTES,
    EPOCH_DATASETS,
    EPOCH_FORMAT_NAME,
    FORMAT_NAME,
    HISTORY_COLUMNS,
    HISTORY_DTYPE,
    OPTIONAL_HISTORY_COLUMNS,
    ROOT_ATTRIBUTES,
    SCHEMA_VERSION,
    TASKS,
    epoch_file,
    epochs_folder,
)
from explainkit.store.writer import StoreBuilder, append_epoch, create_store, truncate_store

__all__ = [
    "DATASETS",
    "DEFAULT_TASK",
    "EPOCH_ATTRIBUTES",
    "EPOCH_DATASETS",
    "EPOCH_FORMAT_NAME",
    "FORMAT_NAME",
    "HISTORY_COLUMNS",
    "HISTORY_DTYPE",
    "OPTIONAL_HISTORY_COLUMNS",
    "ROOT_ATTRIBUTES",
    "SCHEMA_VERSION",
    "TASKS",
    "StoreBuilder",
    "StoreReader",
    "append_epoch",
    "create_store",
    "epoch_file",
    "epochs_folder",
    "open_store",
    "truncate_store",
]

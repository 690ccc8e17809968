"""The prediction task: what a label is, and how predictions are trained, scored and decided.

One object owns what differs between kinds of target: the loss, the output activation, the
key the folds are stratified on, the metric set and the decision rule. `base` holds the
contract (`Task`), `single` the binary and multi-class tasks, `multilabel` the task of several
findings per image (each positive, negative, uncertain or missing), and `factory` which task a
data set is. The split follows torchmetrics' Binary/Multiclass/Multilabel AUROC classes and
MedMNIST's per-data-set `task` field (`medmnist/info.py`). A task is plain, frozen data, so it
crosses Ray's process boundaries as it is.

The names below are the package's public API (`from distmed.task import BinaryTask`, as
before the split into modules); distmed's own modules import a name from the module that owns it.
"""

from __future__ import annotations

from distmed.task.base import Curve, Task
from distmed.task.factory import AnyTask, PolicySetting, multilabel_task, task_for, task_of_index
from distmed.task.multilabel import (
    FINDING_AUC_PREFIX,
    MISSING_POLICIES,
    MULTILABEL_LOSS_REFUSAL,
    NEGATIVE,
    POSITIVE,
    UNCERTAIN,
    UNCERTAIN_POLICIES,
    MultilabelTask,
    finding_auc_key,
)
from distmed.task.single import BinaryTask, MulticlassTask

__all__ = [
    "FINDING_AUC_PREFIX",
    "MISSING_POLICIES",
    "MULTILABEL_LOSS_REFUSAL",
    "NEGATIVE",
    "POSITIVE",
    "UNCERTAIN",
    "UNCERTAIN_POLICIES",
    "AnyTask",
    "BinaryTask",
    "Curve",
    "MulticlassTask",
    "MultilabelTask",
    "PolicySetting",
    "Task",
    "finding_auc_key",
    "multilabel_task",
    "task_for",
    "task_of_index",
]

"""Preference fine-tuning: DPO, IPO, SimPO and ORPO as Lightning components.

``lightning_ft preference fit --config configs/preference_quickstart.yaml`` runs it from the command line.
"""

from lightning_ft.preference.data import PairCollator, PreferencePair, collate_pairs, encode_pair, read_pairs, scan_pairs
from lightning_ft.preference.datamodule import PreferenceDataModule
from lightning_ft.preference.losses import PreferenceLoss, dpo_loss, ipo_loss, orpo_loss, preference_loss, simpo_loss
from lightning_ft.preference.module import PreferenceModule

__all__ = [
    "PairCollator",
    "PreferenceDataModule",
    "PreferenceLoss",
    "PreferenceModule",
    "PreferencePair",
    "collate_pairs",
    "dpo_loss",
    "encode_pair",
    "ipo_loss",
    "orpo_loss",
    "preference_loss",
    "read_pairs",
    "scan_pairs",
    "simpo_loss",
]

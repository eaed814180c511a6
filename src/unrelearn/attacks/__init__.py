"""Relearning attacks: the attacker's data sets and the fine-tuning attack."""

from unrelearn.attacks.data import AttackData, build_attack_data, dataset_names, load_image_folder, register_dataset
from unrelearn.attacks.finetune import AttackConfig, attack, parse_eval_at, plot_curves

__all__ = [
    "AttackConfig", "AttackData", "attack", "build_attack_data", "dataset_names", "load_image_folder",
    "parse_eval_at", "plot_curves", "register_dataset",
]  # fmt: skip

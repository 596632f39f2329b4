"""Plug-ins for the training loops users already have: transformers Trainer, Lightning.

Import the one you need (`softmask_peft.integrations.trainer`, `...lightning`); each imports
its host library, which is an optional dependency.
"""

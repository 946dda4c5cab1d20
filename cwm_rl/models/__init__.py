"""Models made locally (no model hub): tokenizer, presets, chat template, template checks.

Importing this package is light (no torch, no transformers); `init_model` imports them when called.
"""

from cwm_rl.models.chat_template import CHAT_TEMPLATE, CWM_CHAT_TEMPLATE, TemplateError, detect_end_of_turn, render, render_delta
from cwm_rl.models.create import count_parameters, init_model
from cwm_rl.models.presets import PRESETS, ModelPreset
from cwm_rl.models.template_check import check_template

__all__ = [
    "CHAT_TEMPLATE",
    "CWM_CHAT_TEMPLATE",
    "PRESETS",
    "ModelPreset",
    "TemplateError",
    "check_template",
    "count_parameters",
    "detect_end_of_turn",
    "init_model",
    "render",
    "render_delta",
]

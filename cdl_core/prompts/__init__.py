"""Prompt methods, one per module, registered by name in PROMPT_METHODS."""
from cdl_core.prompts import apt, coda, dualprompt, l2p, none  # noqa: F401  (registration)
from cdl_core.prompts.base import PROMPT_METHODS, PromptMethod, PromptOutput, build_prompt_method

__all__ = ["PROMPT_METHODS", "PromptMethod", "PromptOutput", "build_prompt_method"]

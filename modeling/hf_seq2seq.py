"""Hugging Face encoder-decoder families (T5, BART, Marian) as our ModelConfig.
Registered into hf_import.FAMILIES."""

from __future__ import annotations

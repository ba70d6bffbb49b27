"""Hugging Face encoder-only families (BERT, RoBERTa, DistilBERT, ELECTRA) as our ModelConfig.
Registered into hf_import.FAMILIES."""

from __future__ import annotations

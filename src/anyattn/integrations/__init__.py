"""Adapters that plug anyattn into other libraries. Each submodule imports its library lazily:
`anyattn.integrations.transformers` (Hugging Face transformers' `AttentionInterface`)."""

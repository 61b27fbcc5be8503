"""Evaluation: perplexity and zero-shot metrics (``metrics``), the transformers and vLLM backends
(``backends``) and the vLLM worker that runs in vLLM's own environment (``vllm_worker``)."""

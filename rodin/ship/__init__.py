"""Stage 4, ship: a trained run made into what people run.

The Hugging Face form (hf), GGUF for llama.cpp and Ollama (gguf_export), the check of both
against our own model (verify), the model card (modelcard) and the release on the Hub (publish).

Imports: rodin.model, rodin.config, rodin.io, rodin.data, rodin.train (its checkpoint reader),
rodin.spot, and each other; never eval.
"""

"""Stage 1, data: what reads and prepares text and tokens.

Raw documents and their cursor (records, text), French repair and quality rules (quality),
duplicates (dedup), the mixture of sources (mixture), the tokenizer (tokenizer), token shards
(shards) and the batches cut from them (batches), and SFT's conversations in the chat format
(chatml, sft_rows). The scripts in data/ run these as the pipeline's stages.

Imports: rodin.model, rodin.config, rodin.io, and each other; never train, spot, ship or eval.
"""

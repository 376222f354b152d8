"""int8 and the Hugging Face Hub.

download       fetch a checkpoint (one weights format, config, tokenizer, card), offline from the cache
upload         `int8 push`: verify's quick checks, then one commit (LFS, resumable)
errors         the one table of client exceptions -> int8 errors, per operation (fetching, publishing)
timeouts       bounds on every request of an int8 operation, through huggingface_hub's client factory
card           the model card: metadata, and the values that fill card_template.md
redact         URL credentials never appear in a message
"""

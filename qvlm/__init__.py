"""qvlm: the quantization method and formats, in pure PyTorch.

Owns all numerics: quantizers, model structure (units), dependency mining, block partition, block
search, mixed precision, and the one-process driver `quantize`. Must never import ray, boto3, or any
of the sibling packages (`workers`, `cluster`, `jobs`).
"""

"""workers: thin Ray actors and tasks around `qvlm` (load a shard, capture, search a block, write a shard).

May import `qvlm` and ray; must not import `cluster` or `jobs`.
"""

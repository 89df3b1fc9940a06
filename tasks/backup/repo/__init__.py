"""The repository inside a blob store, restic-like and Prefect-free: its format and keys
(repository.py, keys.py, ids.py, locks.py), block and tree maps (blockmap.py), the index of stored
chunks (index.py), keep rules with forget and prune (retention.py), staging blobs (staging.py) and
verify (verify.py).
docs/repository.md is its specification."""

"""Control plane: what is stored where (keys, index, eviction, statistics). No tensors here."""

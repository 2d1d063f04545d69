"""The data path: where files live, how a corpus is read, split and cached, and the code-shard format.

``storage`` (local paths and object-store URLs), ``images`` (encoded files <-> pixel arrays),
``keys`` (sample keys and their splits), ``corpus`` (an image corpus as a Ray Dataset),
``image_cache`` (decoded images at the training size), ``epochs`` (what a training worker reads
each epoch), ``shards`` (the code-shard format), ``code_union`` (several code datasets as one) and
``demo_data`` (the generated demo corpus).
"""

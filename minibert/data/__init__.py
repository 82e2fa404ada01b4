"""The data room: the corpus (mirrors, checksums, the user's own text), the vocabulary, tokenizing into
id shards, NSP pairs with MLM masks, and cutting batches into micro-batches."""

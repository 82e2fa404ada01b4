"""The training room: the pretrain run from set-up to publishing (pretrain), the loop (loop), resumable
checkpoints, launching DDP (distributed), and CPU threads and malloc settings (cpus, heap)."""
